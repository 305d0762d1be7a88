// The native CPU ops, registered in the project's op namespace `llama_kernels` (the Python custom ops of
// kernels/ops.py live there too; every name here starts with `native_`). Shape / dtype checks, allocation and
// threading live here; the arithmetic is in kernels_isa.cpp. Fake (meta) kernels for torch.compile are
// registered from Python (kernels/native/__init__.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <string>

#include "counter_rng.h"
#include "kernels.h"

namespace llama_native {
namespace {

using at::Tensor;

// The requested variant, or the best one below it that was compiled and that this CPU can run.
const Kernels* variant(const std::string& isa) {
#ifdef LLAMA_NATIVE_HAVE_AVX512
  if (isa == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return kernels_AVX512();
#endif
#ifdef LLAMA_NATIVE_HAVE_AVX2
  if ((isa == "AVX512" || isa == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return kernels_AVX2();
#endif
  return kernels_DEFAULT();
}

const Kernels* g_kernels = nullptr;   // chosen once by native_select_isa (the loader passes PyTorch's own choice)

const Kernels& K() {
  if (!g_kernels) g_kernels = variant("DEFAULT");
  return *g_kernels;
}

std::string select_isa(std::string requested) {
  if (!requested.empty()) g_kernels = variant(requested);
  return K().isa;
}

// Elements (or rows) per task: small tensors stay on one thread, where a fork would cost more than it saves.
constexpr int64_t kGrainElements = 32768;

void check_float_or_bf16(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "llama_kernels::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "llama_kernels::", op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

std::pair<uint32_t, uint32_t> key_halves(int64_t key) {
  const uint64_t k = uint64_t(key);
  return {uint32_t(k & 0xffffffffu), uint32_t(k >> 32)};
}

// ---------------------------------------------------------------------------------------------- SR cast

Tensor sr_bf16(const Tensor& x, int64_t key) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "llama_kernels::native_sr_bf16: x must be a float32 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.numel() < kMaxSrElements, "llama_kernels::native_sr_bf16: x has ", x.numel(),
              " elements; the SR counter allows fewer than 2^33");
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* src = xc.const_data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const auto [k0, k1] = key_halves(key);
  const Kernels& k = K();
  at::parallel_for(0, x.numel(), kGrainElements, [&](int64_t b, int64_t e) { k.sr_bf16(src, dst, b, e, k0, k1); });
  return out;
}

// ---------------------------------------------------------------------------------------------- AdamW + SR

void adamw_sr_(Tensor param, const Tensor& grad, Tensor exp_avg, Tensor exp_avg_sq, double lr, double beta1,
               double beta2, double eps, double weight_decay, double bias_correction1, double bias_correction2,
               int64_t key) {
  const char* op = "native_adamw_sr_";
  TORCH_CHECK(param.device().is_cpu() && param.scalar_type() == at::kBFloat16, "llama_kernels::", op,
              ": param must be a bfloat16 CPU tensor, got ", param.scalar_type(), " on ", param.device());
  check_float_or_bf16(grad, op, "grad");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "llama_kernels::", op,
                ": exp_avg / exp_avg_sq must be float32 CPU tensors, got ", t->scalar_type());
  for (const Tensor* t : std::initializer_list<const Tensor*>{&grad, &exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->sizes() == param.sizes(), "llama_kernels::", op, ": param has shape ", param.sizes(),
                " but grad / exp_avg / exp_avg_sq has shape ", t->sizes());
  TORCH_CHECK(param.numel() < kMaxSrElements, "llama_kernels::", op, ": param has ", param.numel(),
              " elements; the SR counter allows fewer than 2^33");
  TORCH_CHECK(1.0 - beta1 < 0.5, "llama_kernels::", op, ": beta1 = ", beta1,
              " must be > 0.5 (the update mirrors torch.lerp's small-weight formula)");
  // Non-contiguous tensors are updated through contiguous copies (element i is the row-major logical index).
  Tensor p = param.contiguous(), m = exp_avg.contiguous(), v = exp_avg_sq.contiguous();
  const Tensor g = grad.contiguous();
  AdamwArgs a{};
  a.param = reinterpret_cast<uint16_t*>(p.mutable_data_ptr<at::BFloat16>());
  a.grad = g.const_data_ptr();
  a.grad_bf16 = g.scalar_type() == at::kBFloat16;
  a.exp_avg = m.mutable_data_ptr<float>();
  a.exp_avg_sq = v.mutable_data_ptr<float>();
  a.lerp_w = float(1.0 - beta1);
  a.beta2 = float(beta2);
  a.one_minus_beta2 = float(1.0 - beta2);
  a.apply_decay = weight_decay != 0.0;
  a.decay = float(1.0 - lr * weight_decay);
  a.bias_correction2 = float(bias_correction2);
  a.step_scale = float(-lr / bias_correction1);
  a.eps = float(eps);
  std::tie(a.k0, a.k1) = key_halves(key);
  const Kernels& k = K();
  at::parallel_for(0, p.numel(), kGrainElements, [&](int64_t b, int64_t e) { k.adamw_sr(a, b, e); });
  if (!p.is_same(param)) param.copy_(p);
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
}

// ---------------------------------------------------------------------------------------------- RMSNorm

void check_rms(const Tensor& x, const Tensor& w, const char* op) {
  check_float_or_bf16(x, op, "x");
  check_float_or_bf16(w, op, "weight");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "llama_kernels::", op, ": x must have a non-empty last dim, got ",
              x.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "llama_kernels::", op, ": weight has shape ", w.sizes(),
              ", expected (", x.size(-1), ",) to match x ", x.sizes());
}

int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, hidden)); }

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const Tensor& weight, double eps) {
  check_rms(x, weight, "native_rms_norm_fwd");
  TORCH_CHECK(eps > 0.0, "llama_kernels::native_rms_norm_fwd: eps must be > 0, got ", eps);
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t h = x.size(-1), rows = x.numel() / h;
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  RmsArgs a{};
  a.x = xc.const_data_ptr(); a.x_bf16 = x.scalar_type() == at::kBFloat16;
  a.w = wc.const_data_ptr(); a.w_bf16 = weight.scalar_type() == at::kBFloat16;
  a.y = y.mutable_data_ptr(); a.rstd = rstd.mutable_data_ptr<float>();
  a.hidden = h; a.eps = float(eps);
  const Kernels& k = K();
  at::parallel_for(0, rows, row_grain(h), [&](int64_t b, int64_t e) { k.rms_fwd(a, b, e); });
  return {y, rstd};
}

// Rows per dw block: a function of the row count only, so the dw summation order never depends on threads.
int64_t rms_block_rows(int64_t rows) { return std::max<int64_t>(16, (rows + 255) / 256); }

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd) {
  const char* op = "native_rms_norm_bwd";
  check_rms(x, weight, op);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "llama_kernels::", op, ": dy ",
              dy.sizes(), " ", dy.scalar_type(), " must match x ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() * x.size(-1) == x.numel(), "llama_kernels::", op,
              ": rstd must be float32 with one value per row of x ", x.sizes(), ", got ", rstd.sizes(), " ",
              rstd.scalar_type());
  const Tensor xc = x.contiguous(), dyc = dy.contiguous(), wc = weight.contiguous(), rc = rstd.contiguous();
  const int64_t h = x.size(-1), rows = x.numel() / h;
  const int64_t block_rows = rms_block_rows(rows), blocks = (rows + block_rows - 1) / block_rows;
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor partial = at::empty({blocks, h}, x.options().dtype(at::kFloat));
  RmsArgs a{};
  a.x = xc.const_data_ptr(); a.x_bf16 = x.scalar_type() == at::kBFloat16;
  a.w = wc.const_data_ptr(); a.w_bf16 = weight.scalar_type() == at::kBFloat16;
  a.dy = dyc.const_data_ptr(); a.y = dx.mutable_data_ptr();
  a.rstd = const_cast<float*>(rc.const_data_ptr<float>());
  a.dw_partial = partial.mutable_data_ptr<float>();
  a.hidden = h;
  const Kernels& k = K();
  at::parallel_for(0, blocks, std::max<int64_t>(1, row_grain(h) / block_rows), [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) k.rms_bwd_block(a, blk * block_rows, std::min(rows, (blk + 1) * block_rows), blk);
  });
  // dw = the block partials summed in block order (fixed), per column; then one rounding to weight's dtype.
  Tensor dw32 = at::empty({h}, x.options().dtype(at::kFloat));
  float* out = dw32.mutable_data_ptr<float>();
  const float* part = partial.const_data_ptr<float>();
  at::parallel_for(0, h, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, blocks)), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) out[j] = 0.f;
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t j = b; j < e; ++j) out[j] += part[blk * h + j];
  });
  return {dx, weight.scalar_type() == at::kFloat ? dw32 : dw32.to(weight.scalar_type())};
}

// ---------------------------------------------------------------------------------------------- SwiGLU

void check_swiglu(const Tensor& gate, const Tensor& up, const char* op) {
  check_float_or_bf16(gate, op, "gate");
  TORCH_CHECK(up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type(), "llama_kernels::", op, ": up ",
              up.sizes(), " ", up.scalar_type(), " must match gate ", gate.sizes(), " ", gate.scalar_type());
}

SwigluArgs swiglu_args(const Tensor& gate, const Tensor& up) {
  SwigluArgs a{};
  a.gate = gate.const_data_ptr(); a.up = up.const_data_ptr();
  a.bf16 = gate.scalar_type() == at::kBFloat16;
  const int64_t step = 2 * K().vector_width();      // torch's vectorised loop steps two vectors at a time
  a.scalar_from = gate.numel() - gate.numel() % step;
  return a;
}

Tensor swiglu_fwd(const Tensor& gate, const Tensor& up) {
  check_swiglu(gate, up, "native_swiglu_fwd");
  const Tensor g = gate.contiguous(), u = up.contiguous();
  Tensor out = at::empty(gate.sizes(), gate.options());
  SwigluArgs a = swiglu_args(g, u);
  a.out = out.mutable_data_ptr();
  const Kernels& k = K();
  at::parallel_for(0, g.numel(), kGrainElements, [&](int64_t b, int64_t e) { k.swiglu_fwd(a, b, e); });
  return out;
}

std::tuple<Tensor, Tensor> swiglu_bwd(const Tensor& dout, const Tensor& gate, const Tensor& up) {
  const char* op = "native_swiglu_bwd";
  check_swiglu(gate, up, op);
  TORCH_CHECK(dout.sizes() == gate.sizes() && dout.scalar_type() == gate.scalar_type(), "llama_kernels::", op,
              ": dout ", dout.sizes(), " ", dout.scalar_type(), " must match gate ", gate.sizes(), " ",
              gate.scalar_type());
  const Tensor g = gate.contiguous(), u = up.contiguous(), d = dout.contiguous();
  Tensor dgate = at::empty(gate.sizes(), gate.options()), dup = at::empty(up.sizes(), up.options());
  SwigluArgs a = swiglu_args(g, u);
  a.dout = d.const_data_ptr(); a.dgate = dgate.mutable_data_ptr(); a.dup = dup.mutable_data_ptr();
  const Kernels& k = K();
  at::parallel_for(0, g.numel(), kGrainElements, [&](int64_t b, int64_t e) { k.swiglu_bwd(a, b, e); });
  return {dgate, dup};
}

}  // namespace
}  // namespace llama_native

TORCH_LIBRARY_FRAGMENT(llama_kernels, m) {
  m.def("native_select_isa(str requested) -> str");
  m.def("native_sr_bf16(Tensor x, int key) -> Tensor");
  m.def("native_adamw_sr_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, float bias_correction1, float bias_correction2, "
        "int key) -> ()");
  m.def("native_rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("native_rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("native_swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("native_swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.impl("native_select_isa", &llama_native::select_isa);
}

TORCH_LIBRARY_IMPL(llama_kernels, CPU, m) {
  m.impl("native_sr_bf16", &llama_native::sr_bf16);
  m.impl("native_adamw_sr_", &llama_native::adamw_sr_);
  m.impl("native_rms_norm_fwd", &llama_native::rms_norm_fwd);
  m.impl("native_rms_norm_bwd", &llama_native::rms_norm_bwd);
  m.impl("native_swiglu_fwd", &llama_native::swiglu_fwd);
  m.impl("native_swiglu_bwd", &llama_native::swiglu_bwd);
}
