// Counter-based random bits for stochastic rounding (SR): a pure function of (key, element index).
//
// Definition (mirrored bit for bit by training/precision.py:sr_bits, which the tests compare against):
//   mix32(x)  = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16   (uint32 arithmetic;
//               the "lowbias32" constants published with C. Wellons' hash-prospector, a bijection on 32 bits)
//   k0, k1    = low and high 32 bits of the 63-bit key (training.precision.sr_tensor_key: run seed, optimizer
//               step, SR stream and the tensor's index in its parameter group)
//   h(c)      = mix32(mix32(c ^ k0) ^ k1)                    one 32-bit draw serves two elements
//   r(i)      = (h(i >> 1) >> (16 * (i & 1))) & 0xffff       element i of the tensor (row-major logical index)
// Nothing depends on how the index range is split between threads, so results are identical for any thread
// count, and two tensor-parallel replicas that share a key round identically.
#pragma once
#include <cstdint>
#include <cstring>

namespace llama_native {

constexpr int64_t kMaxSrElements = int64_t(1) << 33;   // i >> 1 must fit the 32-bit counter

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t counter_hash(uint32_t c, uint32_t k0, uint32_t k1) { return mix32(mix32(c ^ k0) ^ k1); }

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The SR rule of training/precision.py: the high 16 bits of (bits(x) + r); NaN -> the canonical quiet NaN 0x7fc0.
inline uint16_t sr_round(float x, uint32_t r) {
  const uint32_t u = f32_bits(x);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return nan ? uint16_t(0x7fc0) : uint16_t((u + r) >> 16);
}

// Round to nearest even, as torch's float -> bfloat16 cast for every non-NaN value.
inline uint16_t rne_bf16(float x) {
  const uint32_t u = f32_bits(x);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return nan ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t b) { return f32_from_bits(uint32_t(b) << 16); }

}  // namespace llama_native
