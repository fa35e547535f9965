// Vector helpers shared by gptlab's native kernels (decode.cpp, train.cpp): 16 float32 lanes, loads that widen
// bfloat16 and int8 to them, a horizontal sum and maximum, |x|, e^x for x <= 0, and rounding stores back to bfloat16.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gptlab_simd {

// 16 float32 lanes: one AVX-512 register, two AVX2 ones; the compiler lowers it to what -march allows
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

// bfloat16 is the top half of a float32: widen to 32 bits and shift left 16
inline f32x16 load16(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline float to_float(float w) { return w; }

inline float to_float(uint16_t w) {
  uint32_t u = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline f32x16 to_f32x16(const int32_t* w) {
  f32x16 v;
  for (int i = 0; i < 16; ++i) v[i] = float(w[i]);
  return v;
}

// int8 codes widened to float32. Compilers (GCC 12) turn a vector conversion from 8-bit lanes into 16 scalar ones, so
// the widening is spelled out with the CPU's instructions where it has them.
inline f32x16 load16(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  f32x16 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
#else
  int32_t w[16];
  for (int i = 0; i < 16; ++i) w[i] = p[i];
  return to_f32x16(w);
#endif
}

inline float to_float(int8_t w) { return float(w); }

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// the sum of the 16 lanes, by halves (a few shuffles, where a lane-by-lane loop is 16 dependent adds)
inline float hsum(f32x16 v) {
  f32x8 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<char*>(&v) + 32, 32);
  f32x8 e = lo + hi;
  f32x4 a, b;
  std::memcpy(&a, &e, 16);
  std::memcpy(&b, reinterpret_cast<char*>(&e) + 16, 16);
  f32x4 f = a + b;
  return (f[0] + f[2]) + (f[1] + f[3]);
}

// e^x for 16 lanes of x <= 0 (scores less their maximum), to ~1 float32 ulp: e^x = 2^n e^r with n = round(x / ln 2)
// and r = x - n ln 2 taken in two parts (Cody & Waite 1980), e^r by its degree-6 Taylor polynomial on |r| <= ln(2)/2.
// Below -87, where float32's normal range ends, and at -inf (a masked score) the result is 0.
inline f32x16 exp16(f32x16 x) {
  const i32x16 under = x < -87.f;
  x = under ? f32x16{} - 87.f : x;
  // float -> int conversion truncates toward zero, so for y <= 0 trunc(y - 0.5) rounds y to nearest
  const i32x16 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x16);
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  const f32x16 r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4, the first part exact in float32
  f32x16 p = f32x16{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const i32x16 bits = (n + 127) << 23;  // 2^n: n + 127 in a float32's exponent field
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return under ? f32x16{} : p * scale;
}

inline void store(float* p, float v) { *p = v; }

// float32 -> bfloat16 rounded to nearest even, as PyTorch rounds (a NaN stays a NaN)
inline void store(uint16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40) : uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

inline f32x16 abs16(f32x16 x) { return x < 0.f ? -x : x; }

// 16 lanes stored as float32, or as bfloat16 rounded to nearest even (finite values: this is for probabilities)
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

inline void store16(uint16_t* p, f32x16 v) {
#if defined(__AVX512BF16__)
  __m512 w;
  std::memcpy(&w, &v, sizeof w);
  const __m256bh h = _mm512_cvtneps_pbh(w);  // the CPU's own float32 -> bfloat16 rounding, nearest even
  std::memcpy(p, &h, sizeof h);
#else
  u32x16 u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
#if defined(__AVX512F__)
  __m512i w;
  std::memcpy(&w, &u, sizeof w);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(w));  // GCC 12 scalarises the generic narrowing
#else
  const u16x16 h = __builtin_convertvector(u, u16x16);
  std::memcpy(p, &h, sizeof h);
#endif
#endif
}

// the largest of the 16 lanes, by halves as hsum
inline float hmax(f32x16 v) {
  f32x8 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<char*>(&v) + 32, 32);
  const f32x8 e = lo > hi ? lo : hi;
  float m = e[0];
  for (int i = 1; i < 8; ++i) m = e[i] > m ? e[i] : m;
  return m;
}

}  // namespace gptlab_simd
