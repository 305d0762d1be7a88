// Interface between the operator layer (ops.cpp: checks, allocation, threads) and the per-ISA kernels
// (kernels_isa.cpp, compiled once per instruction set: DEFAULT, AVX2, AVX512). Kernels work on raw pointers of
// contiguous fp32 / bf16 (uint16_t) data over an index range, so that ops.cpp can split the range between
// threads with at::parallel_for; no kernel result depends on the split.
#pragma once
#include <cstdint>

namespace llama_native {

struct AdamwArgs {
  uint16_t* param;          // bf16, updated in place
  const void* grad;         // bf16 (grad_bf16) or fp32
  bool grad_bf16;
  float* exp_avg;
  float* exp_avg_sq;
  // Scalars exactly as training.optim.SRAdamW hands them to its torch ops (each rounded once to fp32).
  float lerp_w;             // 1 - beta1
  float beta2, one_minus_beta2;
  float decay;              // 1 - lr * weight_decay (1 when weight_decay == 0: the multiply is skipped)
  bool apply_decay;
  float bias_correction2;   // 1 - beta2^t
  float step_scale;         // -lr / (1 - beta1^t)
  float eps;
  uint32_t k0, k1;          // SR key halves (counter_rng.h)
};

// A row-wise op's tensors: rows x hidden, contiguous. `*_bf16` says whether that tensor is bf16 (else fp32).
struct RmsArgs {
  const void* x; bool x_bf16;
  const void* w; bool w_bf16;
  const void* dy;           // backward only; dtype of x
  void* y;                  // forward output (dtype of x) / backward dx (dtype of x)
  float* rstd;              // [rows]
  float* dw_partial;        // backward: [blocks, hidden] fp32 partial sums of dy * x_hat
  int64_t hidden;
  float eps;
};

struct SwigluArgs {
  const void* gate; const void* up; const void* dout;
  void* out; void* dgate; void* dup;
  bool bf16;                // all tensors bf16, else all fp32
  int64_t scalar_from;      // elements from here on use the scalar formula (kernels_isa.cpp)
};

struct Kernels {
  const char* isa;
  void (*sr_bf16)(const float* x, uint16_t* out, int64_t begin, int64_t end, uint32_t k0, uint32_t k1);
  void (*adamw_sr)(const AdamwArgs& a, int64_t begin, int64_t end);
  void (*rms_fwd)(const RmsArgs& a, int64_t row_begin, int64_t row_end);
  // Rows [row_begin, row_end) form one block: dx for those rows and the block's dw partial sum (sequential).
  void (*rms_bwd_block)(const RmsArgs& a, int64_t row_begin, int64_t row_end, int64_t block);
  void (*swiglu_fwd)(const SwigluArgs& a, int64_t begin, int64_t end);
  void (*swiglu_bwd)(const SwigluArgs& a, int64_t begin, int64_t end);
  int64_t (*vector_width)();   // floats per at::vec::Vectorized<float> of this variant
};

const Kernels* kernels_DEFAULT();
const Kernels* kernels_AVX2();     // only linked when the compiler accepts -mavx2 -mfma (LLAMA_NATIVE_HAVE_AVX2)
const Kernels* kernels_AVX512();   // only linked when the compiler accepts -mavx512* (LLAMA_NATIVE_HAVE_AVX512)

}  // namespace llama_native
