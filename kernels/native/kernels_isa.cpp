// The kernels, compiled once per instruction set (CMakeLists.txt: DEFAULT, AVX2, AVX512; CPU_CAPABILITY names the
// variant, as in PyTorch's own per-ISA kernels, so that at::vec picks its matching implementation and the
// symbols of the variants do not collide). ops.cpp picks one variant at run time.
//
// Numerics (the casting order of kernels/reference.py and training/optim.py; fp32 arithmetic, no FMA
// contraction: CMake passes -ffp-contract=off, and an FMA appears only where the PyTorch op being mirrored uses one):
//   integer / bit work (hashing, bf16 <-> fp32) is written as plain loops the compiler vectorises; exp and the row
//   reductions use at::vec::Vectorized<float> (whose exp is the same SLEEF routine PyTorch's CPU kernels call).
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/cpu/vec/vec.h>

#include "counter_rng.h"

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must name the variant (DEFAULT, AVX2, AVX512)"
#endif
#define LLAMA_CAT2(a, b) a##b
#define LLAMA_CAT(a, b) LLAMA_CAT2(a, b)
#define LLAMA_STR2(a) #a
#define LLAMA_STR(a) LLAMA_STR2(a)

namespace llama_native {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 512;                 // elements per inner block (buffers live on the stack)

// r(i) for i in [start, start + n), start even, n <= kBlock (counter_rng.h).
inline void fill_random(uint16_t* r, int64_t start, int64_t n, uint32_t k0, uint32_t k1) {
  uint32_t h[kBlock / 2];
  const uint32_t c0 = uint32_t(start >> 1);
  const int64_t pairs = (n + 1) >> 1;
  for (int64_t j = 0; j < pairs; ++j) h[j] = counter_hash(c0 + uint32_t(j), k0, k1);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  std::memcpy(r, h, size_t(n) * 2);             // low half first: element 2c, then 2c + 1
#else
  for (int64_t j = 0; j < n; ++j) r[j] = uint16_t(h[j >> 1] >> (16 * (j & 1)));
#endif
}

inline void load_f32(const void* src, bool bf16, int64_t off, int64_t n, float* dst) {
  if (bf16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_f32(s[j]);
  } else {
    const float* s = static_cast<const float*>(src) + off;
    for (int64_t j = 0; j < n; ++j) dst[j] = s[j];
  }
}

inline void store_f32(void* dst, bool bf16, int64_t off, int64_t n, const float* src) {
  if (bf16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t j = 0; j < n; ++j) d[j] = rne_bf16(src[j]);
  } else {
    float* d = static_cast<float*>(dst) + off;
    for (int64_t j = 0; j < n; ++j) d[j] = src[j];
  }
}

// Round through bf16 and back (the reference's cast to x.dtype in the middle of RMSNorm); identity for fp32.
inline void round_trip(bool bf16, int64_t n, float* v) {
  if (!bf16) return;
  for (int64_t j = 0; j < n; ++j) v[j] = bf16_to_f32(rne_bf16(v[j]));
}

// sum_j a[j] * b[j] in the order of torch's CPU sum over a contiguous last dim (its "cascade sum": the row read
// as vectors, the vectors as rows of 4, each column of 4 summed with 4-level cascading every 16 rows, the 4
// columns combined in order, leftover vectors into column 0; then the scalar tail and the vector's lanes added in
// order to a scalar). Mirroring it makes rstd, and hence RMSNorm's y and dx, equal the reference bit for bit.
// Depends only on n and the vector width (the ISA), never on threads.
template <typename T, typename Load>
T cascade_row_sum(const Load& load, int64_t size) {
  constexpr int64_t kIlp = 4, kLevels = 4, kLevelPower = 4, kLevelStep = 1 << kLevelPower;
  constexpr int64_t kLevelMask = kLevelStep - 1;
  const int64_t rows = size / kIlp;
  T acc[kLevels][kIlp];
  for (auto& level : acc)
    for (auto& v : level) v = T(0.f);
  int64_t i = 0;
  while (i + kLevelStep <= rows) {
    for (int64_t j = 0; j < kLevelStep; ++j, ++i)
      for (int64_t k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + load(i * kIlp + k);
    for (int64_t j = 1; j < kLevels; ++j) {
      for (int64_t k = 0; k < kIlp; ++k) {
        acc[j][k] = acc[j][k] + acc[j - 1][k];
        acc[j - 1][k] = T(0.f);
      }
      if ((i & (kLevelMask << (j * kLevelPower))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int64_t k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + load(i * kIlp + k);
  for (int64_t j = 1; j < kLevels; ++j)
    for (int64_t k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + acc[j][k];
  for (int64_t e = rows * kIlp; e < size; ++e) acc[0][0] = acc[0][0] + load(e);
  for (int64_t k = 1; k < kIlp; ++k) acc[0][0] = acc[0][0] + acc[0][k];
  return acc[0][0];
}

// torch's CPU sum kernels read 8 floats per vector whatever the capability (measured: an AVX512 build sums like
// its AVX2 and DEFAULT builds), so the row sums here use a fixed 8-lane vector, which the compiler maps to the
// ISA's registers; plain lane-wise adds, so every variant gives the same bits.
struct Lanes8 {
  float v[8];
  explicit Lanes8(float x) { for (float& e : v) e = x; }
  Lanes8() = default;
  friend Lanes8 operator+(const Lanes8& a, const Lanes8& b) {
    Lanes8 r;
    for (int k = 0; k < 8; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
};

inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t L = 8;
  if (n < L) return cascade_row_sum<float>([&](int64_t e) { return a[e] * b[e]; }, n);
  const int64_t nv = n / L;
  const Lanes8 acc = cascade_row_sum<Lanes8>([&](int64_t q) {
    Lanes8 r;
    for (int64_t k = 0; k < L; ++k) r.v[k] = a[q * L + k] * b[q * L + k];
    return r;
  }, nv);
  float s = 0.f;
  for (int64_t e = nv * L; e < n; ++e) s = s + a[e] * b[e];
  for (int64_t k = 0; k < L; ++k) s = s + acc.v[k];
  return s;
}

// ---------------------------------------------------------------------------------------------- SR cast

void sr_bf16(const float* x, uint16_t* out, int64_t begin, int64_t end, uint32_t k0, uint32_t k1) {
  uint16_t r[kBlock];
  for (int64_t s = begin & ~int64_t(1); s < end; s += kBlock) {
    const int64_t lo = std::max(s, begin), hi = std::min(s + kBlock, end);
    fill_random(r, s, hi - s, k0, k1);
    for (int64_t i = lo; i < hi; ++i) out[i] = sr_round(x[i], r[i - s]);
  }
}

// ---------------------------------------------------------------------------------------------- AdamW + SR

// One element of training.optim.SRAdamW.step, op for op (the FMAs are where torch's lerp_ and addcmul_ fuse):
//   m <- lerp(m, g, 1 - b1)             = fma(1 - b1, g - m, m)
//   v <- v * b2 + (1 - b2) g^2          = fma((1 - b2) * g, g, v * b2)
//   p <- p * (1 - lr wd)                (skipped when wd == 0)
//   p <- p + (-lr / bc1) * m / (sqrt(v / bc2) + eps)
template <typename G>
void adamw_block(const AdamwArgs& a, const G* grad, int64_t lo, int64_t hi, int64_t s, const uint16_t* r) {
  uint16_t* __restrict p = a.param;
  float* __restrict m = a.exp_avg;
  float* __restrict v = a.exp_avg_sq;
  for (int64_t i = lo; i < hi; ++i) {
    float g;
    if constexpr (sizeof(G) == 2) g = bf16_to_f32(grad[i]); else g = grad[i];
    const float mi = std::fma(a.lerp_w, g - m[i], m[i]);
    const float vi = std::fma(a.one_minus_beta2 * g, g, v[i] * a.beta2);
    float pi = bf16_to_f32(p[i]);
    if (a.apply_decay) pi = pi * a.decay;
    const float denom = std::sqrt(vi / a.bias_correction2) + a.eps;
    pi = pi + (a.step_scale * mi) / denom;
    m[i] = mi;
    v[i] = vi;
    p[i] = sr_round(pi, r[i - s]);
  }
}

void adamw_sr(const AdamwArgs& a, int64_t begin, int64_t end) {
  uint16_t r[kBlock];
  for (int64_t s = begin & ~int64_t(1); s < end; s += kBlock) {
    const int64_t lo = std::max(s, begin), hi = std::min(s + kBlock, end);
    fill_random(r, s, hi - s, a.k0, a.k1);
    if (a.grad_bf16)
      adamw_block(a, static_cast<const uint16_t*>(a.grad), lo, hi, s, r);
    else
      adamw_block(a, static_cast<const float*>(a.grad), lo, hi, s, r);
  }
}

// ---------------------------------------------------------------------------------------------- RMSNorm

struct RowBuffers {
  std::vector<float> x, dy, w, t;
  explicit RowBuffers(int64_t h) : x(h), dy(h), w(h), t(h) {}
};

// kernels/reference.py rms_norm_ref: rstd = 1 / sqrt(sum(x^2) / H + eps); x_hat = cast(x * rstd); y = cast(x_hat * w)
void rms_fwd(const RmsArgs& a, int64_t row_begin, int64_t row_end) {
  const int64_t h = a.hidden;
  RowBuffers b(h);
  load_f32(a.w, a.w_bf16, 0, h, b.w.data());
  for (int64_t row = row_begin; row < row_end; ++row) {
    float* x = b.x.data();
    load_f32(a.x, a.x_bf16, row * h, h, x);
    const float r = 1.0f / std::sqrt(dot(x, x, h) / float(h) + a.eps);
    for (int64_t j = 0; j < h; ++j) x[j] = x[j] * r;
    round_trip(a.x_bf16, h, x);
    for (int64_t j = 0; j < h; ++j) x[j] = x[j] * b.w[j];
    store_f32(a.y, a.x_bf16, row * h, h, x);
    a.rstd[row] = r;
  }
}

// kernels/reference.py rms_norm_bwd_ref, with x_hat = x * rstd and g = dy * w:
//   dx = (g - x_hat * (sum(g * x_hat) / H)) * rstd;   dw partial of this block = sum over its rows of dy * x_hat
void rms_bwd_block(const RmsArgs& a, int64_t row_begin, int64_t row_end, int64_t block) {
  const int64_t h = a.hidden;
  RowBuffers b(h);
  load_f32(a.w, a.w_bf16, 0, h, b.w.data());
  float* dwp = a.dw_partial + block * h;
  for (int64_t j = 0; j < h; ++j) dwp[j] = 0.f;
  for (int64_t row = row_begin; row < row_end; ++row) {
    float *x = b.x.data(), *dy = b.dy.data(), *g = b.t.data();
    load_f32(a.x, a.x_bf16, row * h, h, x);
    load_f32(a.dy, a.x_bf16, row * h, h, dy);
    const float r = a.rstd[row];
    for (int64_t j = 0; j < h; ++j) {
      x[j] = x[j] * r;                          // x_hat
      g[j] = dy[j] * b.w[j];
      dwp[j] = dwp[j] + dy[j] * x[j];
    }
    const float mean = dot(g, x, h) / float(h);
    for (int64_t j = 0; j < h; ++j) g[j] = (g[j] - x[j] * mean) * r;
    store_f32(a.y, a.x_bf16, row * h, h, g);
  }
}

// ---------------------------------------------------------------------------------------------- SwiGLU

// torch's CPU elementwise loops run the vector formula over whole double vectors and a scalar (std::exp) formula on
// the last numel % (2 * vector width) elements; the kernels do the same from a.scalar_from on, so that they agree
// with the reference bit for bit (whenever torch ran the tensor as one chunk: up to 32768 elements or 1 thread).
inline float silu_scalar(float g) { return g / (1.f + std::exp(-g)); }
inline float sigmoid_scalar(float g) { return 1.f / (1.f + std::exp(-g)); }

// kernels/reference.py swiglu_ref: silu(g) * u with silu(g) = g / (1 + exp(-g)) (torch's CPU silu), fp32.
void swiglu_fwd(const SwigluArgs& a, int64_t begin, int64_t end) {
  alignas(64) float g[kBlock], u[kBlock], o[kBlock];
  const Vec one(1.f);
  for (int64_t s = begin; s < end; s += kBlock) {
    const int64_t n = std::min(kBlock, end - s);
    load_f32(a.gate, a.bf16, s, n, g);
    load_f32(a.up, a.bf16, s, n, u);
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t c = std::min<int64_t>(Vec::size(), n - j);
      const Vec gv = Vec::loadu(g + j, c), uv = Vec::loadu(u + j, c);
      ((gv / (one + gv.neg().exp())) * uv).store(o + j, c);
    }
    for (int64_t i = std::max(s, a.scalar_from); i < s + n; ++i) o[i - s] = silu_scalar(g[i - s]) * u[i - s];
    store_f32(a.out, a.bf16, s, n, o);
  }
}

// kernels/reference.py swiglu_bwd_ref: s = sigmoid(g) = 1 / (1 + exp(-g));
//   dup = (d * g) * s;   dgate = ((d * u) * s) * (1 + g * (1 - s))
void swiglu_bwd(const SwigluArgs& a, int64_t begin, int64_t end) {
  alignas(64) float g[kBlock], u[kBlock], d[kBlock], dg[kBlock], du[kBlock];
  const Vec one(1.f);
  for (int64_t s = begin; s < end; s += kBlock) {
    const int64_t n = std::min(kBlock, end - s);
    load_f32(a.gate, a.bf16, s, n, g);
    load_f32(a.up, a.bf16, s, n, u);
    load_f32(a.dout, a.bf16, s, n, d);
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t c = std::min<int64_t>(Vec::size(), n - j);
      const Vec gv = Vec::loadu(g + j, c), uv = Vec::loadu(u + j, c), dv = Vec::loadu(d + j, c);
      const Vec sig = (one + gv.neg().exp()).reciprocal();
      ((dv * uv) * sig * (one + gv * (one - sig))).store(dg + j, c);
      ((dv * gv) * sig).store(du + j, c);
    }
    for (int64_t i = std::max(s, a.scalar_from); i < s + n; ++i) {
      const int64_t j = i - s;
      const float sig = sigmoid_scalar(g[j]);
      dg[j] = (d[j] * u[j]) * sig * (1.f + g[j] * (1.f - sig));
      du[j] = (d[j] * g[j]) * sig;
    }
    store_f32(a.dgate, a.bf16, s, n, dg);
    store_f32(a.dup, a.bf16, s, n, du);
  }
}

}  // namespace

int64_t vector_width() { return Vec::size(); }

const Kernels table{LLAMA_STR(CPU_CAPABILITY), sr_bf16, adamw_sr, rms_fwd, rms_bwd_block, swiglu_fwd, swiglu_bwd, vector_width};

}  // namespace CPU_CAPABILITY

const Kernels* LLAMA_CAT(kernels_, CPU_CAPABILITY)() { return &CPU_CAPABILITY::table; }

}  // namespace llama_native
