// Decode kernels: matrix-vector products y = x W^T + b for a few rows of x (float32 or bfloat16 weights: gemv;
// int8 or int4 weight-only codes: gemv_quant), a decode step's attention fused with its KV-cache writes
// (cached_attention), and a decode step's whole stack of layers in one call (decode_layers).
//
// At one row a Linear reads each weight once and does one multiply-add with it, so its speed is the
// rate at which the weight streams from memory. BLAS GEMV and oneDNN read it at 40-75% of the rate a
// plain sum of the same bytes reaches on these CPUs (benchmarks/linear_read_rate.py); this kernel
// reads each output's weight row front to back, one sequential stream per thread, with four vector
// accumulators so the multiply-adds never wait on each other, asking for the bytes 4 KB ahead, and
// reaches the sum's rate.
//
// Built on first use by gptlab/kernels/__init__.py for the CPU at hand (-march=native) and registered
// as torch.ops.gptlab.<name>; the threads are PyTorch's own (at::parallel_for), so they share its pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

using namespace gptlab_simd;

// How far ahead of its reads a dot product asks for the weight's next bytes. The hardware prefetcher alone left
// two threads at ~36 GB/s in float32 where a plain sum reads ~43; asking 4 KB ahead reached 42-43 (AMD EPYC).
constexpr int64_t kPrefetchBytes = 4096;

// a prefetch for each 64-byte cache line of the `bytes` that start kPrefetchBytes past p
template <int64_t bytes>
inline void prefetch_ahead(const void* p) {
  const char* c = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// sum_k w[k] * x[k] in float32
template <typename W>
float dot(const W* w, const float* x, int64_t K) {
  f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    prefetch_ahead<64 * sizeof(W)>(w + k);
    a0 += load16(w + k) * load16(x + k);
    a1 += load16(w + k + 16) * load16(x + k + 16);
    a2 += load16(w + k + 32) * load16(x + k + 32);
    a3 += load16(w + k + 48) * load16(x + k + 48);
  }
  for (; k + 16 <= K; k += 16) a0 += load16(w + k) * load16(x + k);
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; k < K; ++k) s += to_float(w[k]) * x[k];
  return s;
}

// out (M, N) = x (M, K) w (N, K)^T + b (N); x already float32. Each thread takes a block of output
// columns, so of weight rows, and does all M rows of x with each weight row while it is in L1.
#if defined(__AVX512BF16__)
// sum_k w[k] * x[k] for bfloat16 w and x with the CPU's bfloat16 dot-product instruction (vdpbf16ps: 32 products a
// pair at a time into 16 float32 sums): one instruction where widening w to float32 takes three, which matters on
// CPUs that run 512-bit instructions as two halves (Zen 4). Products and sums in float32, denormals flushed.
inline float dot(const uint16_t* w, const uint16_t* x, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  auto bh = [](const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); };
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    prefetch_ahead<256>(w + k);
    a0 = _mm512_dpbf16_ps(a0, bh(w + k), bh(x + k));
    a1 = _mm512_dpbf16_ps(a1, bh(w + k + 32), bh(x + k + 32));
    a2 = _mm512_dpbf16_ps(a2, bh(w + k + 64), bh(x + k + 64));
    a3 = _mm512_dpbf16_ps(a3, bh(w + k + 96), bh(x + k + 96));
  }
  for (; k + 32 <= K; k += 32) a0 = _mm512_dpbf16_ps(a0, bh(w + k), bh(x + k));
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; k < K; ++k) s += to_float(w[k]) * to_float(x[k]);
  return s;
}
#endif

// X: float32 inputs, or bfloat16 ones where the bfloat16 dot product above exists
template <typename W, typename X, typename O>
void gemv_rows(const W* w, const X* x, const W* b, O* out, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float bias = b ? to_float(b[r]) : 0.f;
      for (int64_t m = 0; m < M; ++m) out[m * N + r] = O(dot(w + r * K, x + m * K, K) + bias);
    }
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "gemv: weight must be a contiguous (out, in) matrix, got sizes ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gemv: float32 or bfloat16 weights, got ", dtype);
  TORCH_CHECK(x.scalar_type() == dtype && x.is_contiguous() && x.dim() >= 1 && x.size(-1) == K, "gemv: x must be contiguous ", dtype,
              " (..., ", K, "), got ", x.scalar_type(), " ", x.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == N), "gemv: bias must be ", dtype, " (", N, ")");
  const int64_t M = x.numel() / K;
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());  // (..., N)
  if (dtype == at::kFloat) {
    gemv_rows(weight.data_ptr<float>(), x.data_ptr<float>(), has_bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K);
  } else {
    // the sums round to bfloat16 once, at the end, as oneDNN's do
    const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
    const auto* b = has_bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>()) : nullptr;
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
#if defined(__AVX512BF16__)
    gemv_rows(w, xb, b, out.data_ptr<at::BFloat16>(), M, N, K);
#else
    std::vector<float> xf(M * K);  // the M x K inputs once in float32 (a few KB)
    for (int64_t i = 0; i < M * K; ++i) xf[i] = to_float(xb[i]);
    gemv_rows(w, xf.data(), b, out.data_ptr<at::BFloat16>(), M, N, K);
#endif
  }
  return out;
}

// acc[0:n] += p * v[0:n], v float32 or bfloat16
template <typename V>
inline void axpy(float* acc, float p, const V* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    f32x16 a = load16(acc + i) + p * load16(v + i);
    std::memcpy(acc + i, &a, sizeof a);
  }
  for (; i < n; ++i) acc[i] += p * to_float(v[i]);
}

// scores[0:L] <- e^(scores - top), -inf (masked) giving 0, 16 lanes at a time (scores has room for L rounded up
// to 16); returns 1 / their sum. Shifted by the largest score, so nothing overflows (Milakov & Gimelshein 2018).
inline float exp_scores(float* scores, int64_t L, float top) {
  const int64_t L16 = (L + 15) / 16 * 16;
  std::fill(scores + L, scores + L16, -INFINITY);
  f32x16 total = {};
  for (int64_t j = 0; j < L16; j += 16) {
    f32x16 e = exp16(load16(scores + j) - top);
    std::memcpy(scores + j, &e, sizeof e);
    total += e;
  }
  return 1.f / hsum(total);
}

// softmax(scale q k^T, where mask) v for one (row, head, query): q (hs) float32, keys and values L rows of hs at
// k + j * sk; scores (L rounded up to 16) is scratch, the result goes to acc (hs). A query that sees no key gets zeros.
template <typename T>
void attend_one(const float* q, const T* k, const T* v, int64_t sk, int64_t sv, const bool* mask, int64_t sm, int64_t L, int64_t hs,
                float scale, float* scores, float* acc) {
  float top = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    scores[j] = mask[j * sm] ? scale * dot(k + j * sk, q, hs) : -INFINITY;
    top = std::max(top, scores[j]);
  }
  std::fill(acc, acc + hs, 0.f);
  if (top == -INFINITY) return;
  const float inv = exp_scores(scores, L, top);
  for (int64_t j = 0; j < L; ++j)
    if (scores[j] != 0.f) axpy(acc, scores[j], v + j * sv, hs);
  for (int64_t i = 0; i < hs; ++i) acc[i] *= inv;
}

// attend_one for a head size of 16 * NV: q, the sums and the output stay in registers (a generic loop keeps the
// output in memory, and each key's update then waits on the last one's store: 2x slower for 12 heads of 64)
template <int NV, typename T>
void attend_fixed(const float* q, const T* k, const T* v, int64_t sk, int64_t sv, const bool* mask, int64_t sm, int64_t L, float scale,
                  float* scores, float* out) {
  f32x16 qv[NV];
  for (int c = 0; c < NV; ++c) qv[c] = load16(q + 16 * c) * scale;  // the scale folded into q once
  float top = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    if (!mask[j * sm]) {
      scores[j] = -INFINITY;
      continue;
    }
    f32x16 a = qv[0] * load16(k + j * sk);
    for (int c = 1; c < NV; ++c) a += qv[c] * load16(k + j * sk + 16 * c);
    scores[j] = hsum(a);
    top = std::max(top, scores[j]);
  }
  if (top == -INFINITY) {
    std::fill(out, out + 16 * NV, 0.f);
    return;
  }
  const float inv = exp_scores(scores, L, top);
  f32x16 acc[NV] = {};
  for (int64_t j = 0; j < L; ++j) {
    const float p = scores[j];
    if (p == 0.f) continue;
    for (int c = 0; c < NV; ++c) acc[c] += p * load16(v + j * sv + 16 * c);
  }
  for (int c = 0; c < NV; ++c) {
    f32x16 o = acc[c] * inv;
    std::memcpy(out + 16 * c, &o, sizeof o);
  }
}

// softmax attention for one (row, head, query), by the fixed-size version where the head size allows
template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t sk, int64_t sv, const bool* mask, int64_t sm, int64_t L, int64_t hs, float scale,
            float* scores, float* acc) {
  switch (hs) {
    case 16: return attend_fixed<1>(q, k, v, sk, sv, mask, sm, L, scale, scores, acc);
    case 32: return attend_fixed<2>(q, k, v, sk, sv, mask, sm, L, scale, scores, acc);
    case 64: return attend_fixed<4>(q, k, v, sk, sv, mask, sm, L, scale, scores, acc);
    case 128: return attend_fixed<8>(q, k, v, sk, sv, mask, sm, L, scale, scores, acc);
    default: return attend_one(q, k, v, sk, sv, mask, sm, L, hs, scale, scores, acc);
  }
}

// a 4-d array with its last dim contiguous: element (i, j, k, :) at p + i * s0 + j * s1 + k * s2
template <typename T>
struct Strided {
  T* p;
  int64_t s0, s1, s2;
  T* at(int64_t i, int64_t j, int64_t k) const { return p + i * s0 + j * s1 + k * s2; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t, T* p) {
  return {p, t.stride(0), t.stride(1), t.stride(2)};
}

// The work of one layer's attention in a decode step (see cached_attention below for what it computes): the new keys
// and values kn, vn (B, T, nkv) written into the layer's cache ck, cv (B, nkv, S) at slots (B, T), then each query q
// (B, nh, T) attending over the first L slots where mask (element (b, t, j) at mask + b * m0 + t * m2 + j * m3) allows.
// Output (B, T, nh, hs), contiguous.
template <typename E, typename O>
void attention_core(Strided<const E> q, Strided<const E> kn, Strided<const E> vn, Strided<E> ck, Strided<E> cv, const int64_t* slots,
                    const bool* mask, int64_t m0, int64_t m2, int64_t m3, int64_t B, int64_t nh, int64_t nkv, int64_t T, int64_t L, int64_t hs,
                    float scale, O* out) {
  for (int64_t b = 0; b < B; ++b)  // the writes: B * T * nkv rows of hs, a few KB
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < nkv; ++h) {
        std::memcpy(ck.at(b, h, slots[b * T + t]), kn.at(b, t, h), hs * sizeof(E));
        std::memcpy(cv.at(b, h, slots[b * T + t]), vn.at(b, t, h), hs * sizeof(E));
      }
  const int64_t group = nh / nkv;  // query heads per key/value head (grouped-query attention)
  // one task per (row, head, query): 12-ish for a batch-1 step, each a few us of work
  at::parallel_for(0, B * nh * T, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(hs), acc(hs), scores((L + 15) / 16 * 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (nh * T), h = i / T % nh, t = i % T, g = h / group;  // g: the key/value head this query head reads
      const E* qi = q.at(b, h, t);
      for (int64_t d = 0; d < hs; ++d) qf[d] = to_float(qi[d]);
      attend(qf.data(), ck.at(b, g, 0), cv.at(b, g, 0), ck.s2, cv.s2, mask + b * m0 + t * m2, m3, L, hs, scale, scores.data(), acc.data());
      O* o = out + ((b * T + t) * nh + h) * hs;
      for (int64_t d = 0; d < hs; ++d) store(o + d, acc[d]);
    }
  });
}

// One layer's attention in a decode step, as CacheStep.update followed by F.scaled_dot_product_attention with a
// boolean mask: the step's new keys and values k_new, v_new (B, T, nkv, hs) are written into the layer's cache
// cache_k, cache_v (B, nkv, S, hs) at slots (B, T), then each query q (B, nh, T, hs) attends over the first L slots
// where mask (B, 1, T, L) allows, query head h reading key/value head h / (nh / nkv) (grouped-query attention). At
// decode shapes SDPA's CPU kernels spend most of their time on set-up (~20 us a layer in float32, ~110 in bfloat16,
// for 12 heads over 144 keys) and the cache writes are two index_put calls; here it is one call. Sums in float32. Any
// strides with the head dim contiguous. Returns (B, nh, T, hs), laid out as (B, T, nh, hs) so that the caller's
// transpose back to (B, T, nh * hs) is a view.
at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& cache_k,
                            const at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_new.dim() == 4 && v_new.dim() == 4 && cache_k.dim() == 4 && mask.dim() == 4, "attention: 4-d tensors");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hs = q.size(3), nkv = cache_k.size(1), S = cache_k.size(2), L = mask.size(3);
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "attention: ", nh, " query heads cannot share ", nkv, " key/value heads");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "attention: float32 or bfloat16, got ", dtype);
  for (const at::Tensor* t : {&q, &k_new, &v_new, &cache_k, &cache_v})
    TORCH_CHECK(t->scalar_type() == dtype && t->stride(3) == 1, "attention: q, k, v and the cache in one dtype, head dim contiguous");
  TORCH_CHECK(k_new.sizes() == at::IntArrayRef({B, T, nkv, hs}) && v_new.sizes() == k_new.sizes(), "attention: new keys and values must be (",
              B, ", ", T, ", ", nkv, ", ", hs, "), got ", k_new.sizes(), " and ", v_new.sizes());
  TORCH_CHECK(cache_k.size(0) == B && cache_k.size(3) == hs && cache_v.sizes() == cache_k.sizes(), "attention: the cache must be (", B,
              ", n_kv, S, ", hs, "), got ", cache_k.sizes(), " and ", cache_v.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.sizes() == at::IntArrayRef({B, T}), "attention: slots must be int64 (", B, ", ", T, ")");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == T && L <= S,
              "attention: mask must be bool (", B, ", 1, ", T, ", L <= ", S, "), got ", mask.scalar_type(), " ", mask.sizes());
  const at::Tensor slot = slots.contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) TORCH_CHECK(0 <= sp[i] && sp[i] < S, "attention: slot ", sp[i], " outside a cache of ", S);
  at::Tensor out = at::empty({B, T, nh, hs}, q.options());  // (B, T, nh, hs)
  auto run = [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    auto ptr = [](const at::Tensor& t) { return static_cast<E*>(t.data_ptr()); };
    attention_core<E, E>(strided<const E>(q, ptr(q)), strided<const E>(k_new, ptr(k_new)), strided<const E>(v_new, ptr(v_new)),
                         strided<E>(cache_k, ptr(cache_k)), strided<E>(cache_v, ptr(cache_v)), sp, mask.data_ptr<bool>(), mask.stride(0),
                         mask.stride(2), mask.stride(3), B, nh, nkv, T, L, hs, float(scale), ptr(out));
  };
  if (dtype == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<uint16_t*>(nullptr));
  return out.transpose(1, 2);  // (B, nh, T, hs)
}

// ----------------------------------------------------------------------------- weight-only quantized products

// the 32 int4 codes of 16 bytes as float32: the low nibbles (even columns), then the high ones (odd columns)
inline void widen_int4(const uint8_t* p, f32x16& lo, f32x16& hi) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), nibble = _mm_set1_epi8(0x0F);
  const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, nibble)));
  const __m512 h = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), nibble)));
  std::memcpy(&lo, &l, sizeof lo);
  std::memcpy(&hi, &h, sizeof hi);
#else
  int32_t l[16], h[16];
  for (int i = 0; i < 16; ++i) l[i] = p[i] & 15, h[i] = p[i] >> 4;
  lo = to_f32x16(l), hi = to_f32x16(h);
#endif
}

// a prefetch for each cache line of the `bytes` that start kPrefetchBytes past p (a row's worth, where the
// float dot products ask as they go: a quantized row is a few hundred bytes)
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// dot (int8 codes) for MR rows of x (K apart) at once: each 16 codes widened once and used MR times (the widening, not the
// multiply-adds, bounds it at several rows); the rows' sums are independent, so one accumulator each
template <int MR>
inline void dot_int8_rows(const int8_t* q, const float* x, int64_t K, float* out) {
  f32x16 a[MR] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const f32x16 w = load16(q + k);
    for (int m = 0; m < MR; ++m) a[m] += w * load16(x + m * K + k);
  }
  for (int m = 0; m < MR; ++m) {
    out[m] = hsum(a[m]);
    for (int64_t t = k; t < K; ++t) out[m] += float(q[t]) * x[m * K + t];
  }
}

// One row of an int4 weight (quantize.py's layout: two codes a byte, the even column in the low nibble; per group of
// G inputs a scale s and a zero point z, w = q s + z) times x: sum_g s_g (sum_{k in g} q_k x_k) + z_g (sum_{k in g} x_k).
// xp is x with each 32 columns reordered as the nibbles come, [the 16 even columns, the 16 odd ones], so that a byte's
// low and high nibbles multiply two plain loads; xs (K/G) holds each group's sum of x. G is a multiple of 32.
inline float dot_int4(const uint8_t* q, const float* s, const float* z, const float* xp, const float* xs, int64_t K, int64_t G) {
  f32x16 acc[2] = {};
  float zsum = 0.f;
  for (int64_t g = 0; g < K / G; ++g) {
    f32x16 v = {};
    for (int64_t j = 0; j < G / 2; j += 16) {  // 16 bytes: 32 codes
      f32x16 lo, hi;
      widen_int4(q + g * G / 2 + j, lo, hi);
      const float* xj = xp + g * G + 2 * j;
      v += lo * load16(xj) + hi * load16(xj + 16);
    }
    acc[g & 1] += s[g] * v;  // two sums, so that one group's scaling does not wait on the last one's
    zsum += z[g] * xs[g];
  }
  return hsum(acc[0] + acc[1]) + zsum;
}

#if defined(__AVX512BF16__)
// dot_int4 through the CPU's bfloat16 dot product, for K a multiple of 64 and G 32 or a multiple of 64: widening 32 codes to float32 takes ~11
// instructions, which on two cores bounds int4 below the memory's rate (18 of ~45 GB/s, AMD EPYC); here 64 codes take
// ~7. A code c becomes the bfloat16 128 + c by setting the bits 0x4300 around it (128 = 2^7, and c fills the low bits of
// the 7-bit mantissa), so x . (128 + c) = x . c + 128 sum(x), and the group's x sum takes the 128 back out:
// sum_g s_g (x_g . (128 + c_g)) + z_g sum(x_g) - 128 s_g sum(x_g). xb: x in bfloat16, each 64 columns reordered as
// [the 32 even columns, the 32 odd ones] (a byte's two nibbles); xs: each group's sum of those bfloat16 values.
inline float dot_int4_bf16(const uint8_t* q, const float* s, const float* z, const uint16_t* xb, const float* xs, int64_t K, int64_t G) {
  const __m512i nibble = _mm512_set1_epi16(0x000F), bits = _mm512_set1_epi16(0x4300);
  // the 64 codes of chunk c times their inputs, added to lo_sum and hi_sum: float lane j takes columns 4j..4j+3, so
  // lanes 0-7 hold the chunk's first 32 columns and lanes 8-15 its last 32
  auto products = [&](int64_t c, __m512& lo_sum, __m512& hi_sum) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * 32)));  // a byte a 16-bit lane
    const __m512i lo = _mm512_ternarylogic_epi32(w, nibble, bits, 0xEA);  // (w & 0xF) | 0x4300
    const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), bits);  // the high nibble; the lane's top byte is 0
    lo_sum = _mm512_dpbf16_ps(lo_sum, (__m512bh)lo, (__m512bh)_mm512_loadu_si512(xb + c * 64));
    hi_sum = _mm512_dpbf16_ps(hi_sum, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xb + c * 64 + 32));
  };
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  if (G == 32) {  // two groups a chunk: its lanes 0-7 scaled by group 2c's scale, 8-15 by group 2c + 1's
    for (int64_t c = 0; c < K / 64; ++c) {
      __m512 lo_sum = _mm512_setzero_ps(), hi_sum = _mm512_setzero_ps();
      products(c, lo_sum, hi_sum);
      const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[2 * c]), _mm512_set1_ps(s[2 * c + 1]));
      acc[c & 1] = _mm512_fmadd_ps(scale, _mm512_add_ps(lo_sum, hi_sum), acc[c & 1]);
    }
  } else {  // a group of G / 64 chunks: their products summed, then scaled once
    for (int64_t g = 0; g < K / G; ++g) {
      __m512 lo_sum = _mm512_setzero_ps(), hi_sum = _mm512_setzero_ps();
      for (int64_t c = g * (G / 64); c < (g + 1) * (G / 64); ++c) products(c, lo_sum, hi_sum);
      acc[g & 1] = _mm512_fmadd_ps(_mm512_set1_ps(s[g]), _mm512_add_ps(lo_sum, hi_sum), acc[g & 1]);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + dot(z, xs, K / G) - 128.f * dot(s, xs, K / G);
}

// dot_int4_bf16 for MR rows of inputs at once (xb MR rows K apart, xs MR rows K/G apart): each chunk's 64 codes
// unpacked once and used MR times, its two halves scaled by their groups' scales chunk by chunk
template <int MR>
inline void dot_int4_bf16_rows(const uint8_t* q, const float* s, const float* z, const uint16_t* xb, const float* xs, int64_t K, int64_t G,
                               float* out) {
  const __m512i nibble = _mm512_set1_epi16(0x000F), bits = _mm512_set1_epi16(0x4300);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t halves = G / 32;  // 32-column halves of a chunk a group spans
  int64_t g = 0, left = halves;  // the group of the next half, and how many of its halves are left (no division in the loop)
  auto next_group = [&] {
    const int64_t at = g;
    if (--left == 0) ++g, left = halves;
    return at;
  };
  for (int64_t c = 0; c < K / 64; ++c) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * 32)));
    const __m512i lo = _mm512_ternarylogic_epi32(w, nibble, bits, 0xEA);
    const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), bits);
    const float first = s[next_group()];
    const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(first), _mm512_set1_ps(s[next_group()]));
    for (int m = 0; m < MR; ++m) {
      const uint16_t* x = xb + m * K + c * 64;
      const __m512 p = _mm512_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, (__m512bh)_mm512_loadu_si512(x)),
                                     _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)hi, (__m512bh)_mm512_loadu_si512(x + 32)));
      acc[m] = _mm512_fmadd_ps(scale, p, acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(acc[m]) + dot(z, xs + m * (K / G), K / G) - 128.f * dot(s, xs + m * (K / G), K / G);
}
#endif

// the sum of x[0:n] and of its squares about `shift`, 16 lanes at a time
inline std::pair<float, float> sums(const float* x, int64_t n, float shift) {
  f32x16 s = {}, q = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x16 d = load16(x + i) - shift;
    s += d;
    q += d * d;
  }
  float a = hsum(s), b = hsum(q);
  for (; i < n; ++i) a += x[i] - shift, b += (x[i] - shift) * (x[i] - shift);
  return {a, b};
}

// x (M, K) float32 reordered for dot_int4 into xp (M, K), with each group's sum in xs (M, K/G)
inline void int4_inputs(const float* x, float* xp, float* xs, int64_t M, int64_t K, int64_t G) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 32)
      for (int64_t i = 0; i < 16; ++i) xp[m * K + c + i] = x[m * K + c + 2 * i], xp[m * K + c + 16 + i] = x[m * K + c + 2 * i + 1];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / G; ++g) xs[m * (K / G) + g] = sums(x + m * K + g * G, G, 0.f).first;
}

// A Linear for decode_layers and gemv_quant: float32 or bfloat16 weights (E), or int8 codes with a scale a row, or
// int4 codes with a scale and a zero point a group (float32 scales and zero points); the bias in E, or none.
template <typename E>
struct Weights {
  at::ScalarType kind;  // the weight's: kFloat / kBFloat16, kChar (int8), kByte (int4, two a byte)
  const void* w;
  const float* scales;
  const float* zeros;
  int64_t group;
  const E* bias;
};

// out (M, N) = x (M, K) W^T + b in float32, for any of Weights' kinds; scratch: room for M * (K + K / 32) floats.
// bfloat16 weights take their inputs rounded to bfloat16 (as PyTorch's bf16 Linear has them) for the CPU's bfloat16
// dot product where it has one; int8 and int4 codes are widened to float32 and meet float32 inputs.
template <typename E>
void project(const Weights<E>& W, const float* x, float* out, int64_t M, int64_t N, int64_t K, float* scratch) {
  if (W.kind == at::kFloat || W.kind == at::kBFloat16) {
    const E* w = static_cast<const E*>(W.w);
#if defined(__AVX512BF16__)
    if constexpr (!std::is_same_v<E, float>) {
      uint16_t* xb = reinterpret_cast<uint16_t*>(scratch);
      for (int64_t i = 0; i < M * K; ++i) store(xb + i, x[i]);
      gemv_rows(w, xb, W.bias, out, M, N, K);
      return;
    }
#endif
    gemv_rows(w, x, W.bias, out, M, N, K);
    return;
  }
  if (W.kind == at::kChar) {
    const int8_t* q = static_cast<const int8_t*>(W.w);
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      float sums[4];
      for (int64_t r = r0; r < r1; ++r) {
        prefetch_row(q + r * K, K);
        const float bias = W.bias ? to_float(W.bias[r]) : 0.f;
        for (int64_t m = 0; m < M; m += 4) {  // rows four at a time; one alone by dot's four accumulators
          const int64_t n = std::min<int64_t>(4, M - m);
          const int8_t* row = q + r * K;
          if (n == 4) dot_int8_rows<4>(row, x + m * K, K, sums);
          else if (n == 3) dot_int8_rows<3>(row, x + m * K, K, sums);
          else if (n == 2) dot_int8_rows<2>(row, x + m * K, K, sums);
          else sums[0] = dot(row, x + m * K, K);
          for (int64_t i = 0; i < n; ++i) out[(m + i) * N + r] = W.scales[r] * sums[i] + bias;
        }
      }
    });
    return;
  }
  const uint8_t* q = static_cast<const uint8_t*>(W.w);
  const int64_t G = W.group, nG = K / G;
  float* xp = scratch;
  float* xs = scratch + M * K;
#if defined(__AVX512BF16__)
  if (K % 64 == 0 && (G == 32 || G % 64 == 0)) {  // whole 64-column chunks, each in one group or split between two
    uint16_t* xb = reinterpret_cast<uint16_t*>(scratch);  // (M, K) bfloat16 in the first half of xp's room
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < K; c += 64)
        for (int64_t i = 0; i < 32; ++i) store(xb + m * K + c + i, x[m * K + c + 2 * i]), store(xb + m * K + c + 32 + i, x[m * K + c + 2 * i + 1]);
      for (int64_t g = 0; g < nG; ++g) {
        float sum = 0.f;  // of the rounded values, so that the 128 offsets cancel exactly
        for (int64_t i = 0; i < G; ++i) {
          uint16_t r;
          store(&r, x[m * K + g * G + i]);
          sum += to_float(r);
        }
        xs[m * nG + g] = sum;
      }
    }
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      float sums[4];
      for (int64_t r = r0; r < r1; ++r) {
        prefetch_row(q + r * K / 2, K / 2);
        const float bias = W.bias ? to_float(W.bias[r]) : 0.f;
        const uint8_t* row = q + r * K / 2;
        const float *sc = W.scales + r * nG, *zr = W.zeros + r * nG;
        for (int64_t m = 0; m < M; m += 4) {  // rows four at a time
          const int64_t n = std::min<int64_t>(4, M - m);
          if (n == 4) dot_int4_bf16_rows<4>(row, sc, zr, xb + m * K, xs + m * nG, K, G, sums);
          else if (n == 3) dot_int4_bf16_rows<3>(row, sc, zr, xb + m * K, xs + m * nG, K, G, sums);
          else if (n == 2) dot_int4_bf16_rows<2>(row, sc, zr, xb + m * K, xs + m * nG, K, G, sums);
          else sums[0] = dot_int4_bf16(row, sc, zr, xb + m * K, xs + m * nG, K, G);
          for (int64_t i = 0; i < n; ++i) out[(m + i) * N + r] = sums[i] + bias;
        }
      }
    });
    return;
  }
#endif
  int4_inputs(x, xp, xs, M, K, G);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      prefetch_row(q + r * K / 2, K / 2);
      const float bias = W.bias ? to_float(W.bias[r]) : 0.f;
      for (int64_t m = 0; m < M; ++m)
        out[m * N + r] = dot_int4(q + r * K / 2, W.scales + r * nG, W.zeros + r * nG, xp + m * K, xs + m * nG, K, G) + bias;
    }
  });
}

// The Weights of a Linear from K inputs to N outputs: weight (N, K) in E's dtype `dtype`; or int8 (N, K) with float32
// scales (N,); or uint8 (N, K/2) with float32 scales and zeros (N, K/G), G a multiple of 32. bias: (N,) in `dtype`.
// `what` names the Linear in errors.
template <typename E>
Weights<E> weights(const at::Tensor& w, const at::Tensor& bias, const at::Tensor& scales, const at::Tensor& zeros, int64_t N, int64_t K,
                   at::ScalarType dtype, const std::string& what) {
  TORCH_CHECK(w.defined() && w.is_contiguous(), what, ": a contiguous weight is required");
  const auto kind = w.scalar_type();
  TORCH_CHECK(!bias.defined() || (bias.scalar_type() == dtype && bias.is_contiguous() && bias.sizes() == at::IntArrayRef({N})), what,
              ": the bias must be ", dtype, " (", N, ")");
  Weights<E> W{kind, w.data_ptr(), nullptr, nullptr, 0, bias.defined() ? static_cast<const E*>(bias.data_ptr()) : nullptr};
  if (kind == dtype) {
    TORCH_CHECK(w.sizes() == at::IntArrayRef({N, K}) && !scales.defined() && !zeros.defined(), what, ": weight must be [", N, ", ", K, "], got ",
                w.sizes());
    return W;
  }
  TORCH_CHECK(kind == at::kChar || kind == at::kByte, what, ": weights are ", dtype, ", int8 or packed int4 (uint8), got ", kind);
  TORCH_CHECK(scales.defined() && scales.scalar_type() == at::kFloat && scales.is_contiguous(), what, ": quantized weights need float32 scales");
  W.scales = scales.data_ptr<float>();
  if (kind == at::kChar) {
    TORCH_CHECK(w.sizes() == at::IntArrayRef({N, K}) && scales.sizes() == at::IntArrayRef({N}) && !zeros.defined(), what,
                ": int8 codes must be [", N, ", ", K, "] with scales [", N, "], got ", w.sizes(), " and ", scales.sizes());
    return W;
  }
  const int64_t nG = scales.dim() == 2 ? scales.size(1) : 0;
  TORCH_CHECK(w.sizes() == at::IntArrayRef({N, K / 2}) && scales.dim() == 2 && scales.size(0) == N && nG > 0 && K % nG == 0 && (K / nG) % 32 == 0,
              what, ": int4 codes must be [", N, ", ", K / 2, "] with scales [", N, ", groups] for groups of a multiple of 32 inputs, got ",
              w.sizes(), " and ", scales.sizes());
  TORCH_CHECK(zeros.defined() && zeros.scalar_type() == at::kFloat && zeros.is_contiguous() && zeros.sizes() == scales.sizes(), what,
              ": int4 codes need float32 zero points shaped like their scales");
  W.zeros = zeros.data_ptr<float>();
  W.group = K / nG;
  return W;
}

// A weight-only quantized Linear at decode shapes (QuantLinear's native kernel): y = x W^T + b for x (..., K) float32 or
// bfloat16, W int8 codes (N, K) with scales (N,) (no zeros), or int4 codes packed two a byte (N, K/2) with scales and
// zeros (N, K/G); float32 sums, the result in x's dtype. torch's packed kernels take bfloat16 activations and, on the
// AMD EPYC, read the codes at a fraction of the memory's rate at one row; this reads each row once, front to back.
at::Tensor gemv_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      const std::optional<at::Tensor>& bias) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.is_contiguous() && x.dim() >= 1, "gemv_quant: x must be contiguous float32 or bfloat16");
  TORCH_CHECK(qweight.dim() == 2 && (qweight.scalar_type() == at::kChar || qweight.scalar_type() == at::kByte),
              "gemv_quant: int8 or packed int4 (uint8) codes, 2-d, got ", qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0), K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  const at::Tensor none;
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());  // (..., N)
  std::vector<float> xf(M * K), y(M * N), scratch(M * (K + K / 32));
  auto run = [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    const Weights<E> W = weights<E>(qweight, bias.value_or(none), scales, zeros.value_or(none), N, K, dtype, "gemv_quant");
    const E* xp = static_cast<const E*>(x.data_ptr());
    for (int64_t i = 0; i < M * K; ++i) xf[i] = to_float(xp[i]);
    project(W, xf.data(), y.data(), M, N, K, scratch.data());
    E* o = static_cast<E*>(out.data_ptr());
    for (int64_t i = 0; i < M * N; ++i) store(o + i, y[i]);
  };
  if (dtype == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<uint16_t*>(nullptr));
  return out;
}

// ----------------------------------------------------------------------------- a whole decode step's layers

// f applied to x[0:n] in place, 16 lanes at a time (the last few through a zero-padded copy)
template <typename F>
inline void map16(float* x, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    f32x16 v = f(load16(x + i));
    std::memcpy(x + i, &v, sizeof v);
  }
  if (i < n) {
    float t[16] = {};
    std::memcpy(t, x + i, (n - i) * sizeof(float));
    f32x16 v = f(load16(t));
    std::memcpy(x + i, &v, (n - i) * sizeof(float));
  }
}

enum class Act { gelu_tanh, gelu, silu, relu, relu2 };

Act parse_activation(std::string_view name) {
  if (name == "gelu_tanh") return Act::gelu_tanh;
  if (name == "gelu") return Act::gelu;
  if (name == "silu") return Act::silu;
  if (name == "relu") return Act::relu;
  TORCH_CHECK(name == "relu2", "decode_layers: no activation named ", std::string(name));
  return Act::relu2;
}

// the MLP activations of model.py, 16 lanes at a time, through exp16 (each within a few float32 ulps of PyTorch's)
inline f32x16 activate(f32x16 x, Act act) {
  switch (act) {
    case Act::gelu_tanh: {  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel 2016, eq. 2)
      const f32x16 u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      const f32x16 e = exp16(-2.f * abs16(u));  // tanh |u| = (1 - e^-2|u|) / (1 + e^-2|u|), never overflowing
      const f32x16 th = (1.f - e) / (1.f + e);
      return 0.5f * x * (1.f + (u < 0.f ? -th : th));
    }
    case Act::gelu: {  // 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7)
      const f32x16 z = abs16(x * 0.7071067811865476f);
      const f32x16 t = 1.f / (1.f + 0.3275911f * z);
      f32x16 p = 1.061405429f * t - 1.453152027f;
      p = p * t + 1.421413741f;
      p = p * t - 0.284496736f;
      p = p * t + 0.254829592f;
      const f32x16 erf = 1.f - p * t * exp16(-z * z);
      return 0.5f * x * (1.f + (x < 0.f ? -erf : erf));
    }
    case Act::silu: {  // x sigmoid(x), the exponent taken of -|x| so that it never overflows
      const f32x16 e = exp16(-abs16(x));
      return x * ((x < 0.f ? e : f32x16{} + 1.f) / (1.f + e));
    }
    case Act::relu: return x < 0.f ? f32x16{} : x;
    case Act::relu2: {  // relu(x)^2 (So et al. 2021)
      const f32x16 r = x < 0.f ? f32x16{} : x;
      return r * r;
    }
  }
  return x;
}

// y = LayerNorm(x) (x - mean) / sqrt(var + eps) * w + b, or RMSNorm x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich
// 2019), over n features; y may be x. w, b: the norm's parameters (b null for none).
template <typename W>
void normalize(const float* x, float* y, int64_t n, const W* w, const W* b, float eps, bool rms) {
  float mean = 0.f, var;
  if (rms) {
    var = sums(x, n, 0.f).second / n;
  } else {
    mean = sums(x, n, 0.f).first / n;
    var = sums(x, n, mean).second / n;  // two passes: no cancellation when the mean is large against the spread
  }
  const float r = 1.f / std::sqrt(var + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * r * to_float(w[i]) + (b ? to_float(b[i]) : 0.f);
}

// x and y from apply_rope: each head's pairs (i, i + hs/2) rotated by the row's angles, cos and sin (hs) as rope_angles gives them
inline void rotate(float* x, const float* cos, const float* sin, int64_t hs) {
  const int64_t half = hs / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], c = x[i + half];
    x[i] = a * cos[i] - c * sin[i];
    x[i + half] = c * cos[i + half] + a * sin[i + half];
  }
}

// the parameters of one layer in decode_layers' list, in this order (absent ones None): the norms' weights and biases,
// then each Linear's weight, bias, scales and zero points (the last two for quantized weights only)
enum Param { ln1_w, ln1_b, qn_w, qn_b, kn_w, kn_b, ln2_w, ln2_b, attn, attn_proj = attn + 4, fc = attn + 8, mlp_proj = attn + 12, kPerLayer = attn + 16 };

// decode_layers for weights and cache of element type E (float, or uint16_t holding bfloat16)
template <typename E>
void run_layers(const at::Tensor& x, const std::vector<at::Tensor>& p, const at::Tensor& cache_k, const at::Tensor& cache_v, const int64_t* slots,
                const at::Tensor& mask, const float* cos, const float* sin, at::ArrayRef<double> scales, int64_t nh, bool rms, Act act,
                bool gated, bool pre_ln, float eps, at::Tensor& out) {
  const auto dtype = x.scalar_type();
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), M = B * T, nL = int64_t(scales.size());
  const int64_t nkv = cache_k.size(2), hs = cache_k.size(4), L = mask.size(3);
  const int64_t Q = nh * hs, W = Q + 2 * nkv * hs;  // query width; q, k and v side by side
  // the MLP's width: mlp.c_proj's inputs (its weight's columns, twice as many codes as bytes for int4)
  const at::Tensor& down = p[mlp_proj];
  TORCH_CHECK(down.defined() && down.dim() == 2, "decode_layers: layer 0 mlp.c_proj: a 2-d weight is required");
  const int64_t F = down.size(1) * (down.scalar_type() == at::kByte ? 2 : 1), Fw = gated ? 2 * F : F;
  // every Linear's Weights, checked: layer l's attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
  std::vector<std::array<Weights<E>, 4>> lin(nL);
  const std::array<std::tuple<int, int64_t, int64_t, const char*>, 4> shapes = {
      std::tuple{attn, W, C, "attn.c_attn"}, {attn_proj, C, Q, "attn.c_proj"}, {fc, Fw, C, "mlp.c_fc"}, {mlp_proj, C, F, "mlp.c_proj"}};
  for (int64_t l = 0; l < nL; ++l)
    for (int i = 0; i < 4; ++i) {
      const auto [first, N, K, name] = shapes[i];
      const int64_t o = l * kPerLayer + first;
      lin[l][i] = weights<E>(p[o], p[o + 1], p[o + 2], p[o + 3], N, K, dtype, "decode_layers: layer " + std::to_string(l) + " " + name);
    }
  auto ptr = [&](int64_t l, int i) -> const E* { const at::Tensor& t = p[l * kPerLayer + i]; return t.defined() ? static_cast<const E*>(t.data_ptr()) : nullptr; };
  const int64_t widest = std::max({C, Q, F});
  std::vector<float> h(M * C), a(M * C), qkv(M * W), y(M * Q), f(M * Fw), o(M * C), scratch(M * (widest + widest / 32));
  std::vector<E> qkv_e(std::is_same_v<E, float> ? 0 : M * W);
  const E* xp = static_cast<const E*>(x.data_ptr());
  for (int64_t i = 0; i < M * C; ++i) h[i] = to_float(xp[i]);
  auto norm_rows = [&](const float* in, float* res, const E* w, const E* b) {
    for (int64_t m = 0; m < M; ++m) normalize(in + m * C, res + m * C, C, w, b, eps, rms);
  };
  const bool* mp = mask.data_ptr<bool>();
  for (int64_t l = 0; l < nL; ++l) {
    // attention: x + proj(attend(heads(norm(x)))) pre-LN, norm(x + proj(attend(heads(x)))) post-LN
    if (pre_ln) norm_rows(h.data(), a.data(), ptr(l, ln1_w), ptr(l, ln1_b));
    project(lin[l][0], pre_ln ? a.data() : h.data(), qkv.data(), M, W, C, scratch.data());  // (M, W)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t head = 0; head < nh + nkv; ++head) {  // the query heads, then the key heads
        float* v = qkv.data() + m * W + head * hs;
        const bool query = head < nh;
        if (ptr(l, qn_w)) normalize(v, v, hs, ptr(l, query ? qn_w : kn_w), ptr(l, query ? qn_b : kn_b), eps, rms);
        if (cos) rotate(v, cos + m * hs, sin + m * hs, hs);
      }
    const E* heads;  // q, k, v in the cache's element type
    if constexpr (std::is_same_v<E, float>) {
      heads = qkv.data();
    } else {
      for (int64_t i = 0; i < M * W; ++i) store(&qkv_e[i], qkv[i]);
      heads = qkv_e.data();
    }
    auto layer = [&](const at::Tensor& c) { return Strided<E>{static_cast<E*>(c.data_ptr()) + l * c.stride(0), c.stride(1), c.stride(2), c.stride(3)}; };
    // q (B, nh, T) heads at row b * T + t, k and v (B, T, nkv) after them
    attention_core<E, float>({heads, T * W, hs, W}, {heads + Q, T * W, W, hs}, {heads + Q + nkv * hs, T * W, W, hs}, layer(cache_k), layer(cache_v),
                             slots, mp, mask.stride(0), mask.stride(2), mask.stride(3), B, nh, nkv, T, L, hs, float(scales[l]), y.data());
    project(lin[l][1], y.data(), o.data(), M, C, Q, scratch.data());  // (M, C)
    for (int64_t i = 0; i < M * C; ++i) h[i] += o[i];
    if (!pre_ln) norm_rows(h.data(), h.data(), ptr(l, ln1_w), ptr(l, ln1_b));
    // MLP: x + proj(act(fc(norm(x)))), gated proj(act(gate) * up)
    if (pre_ln) norm_rows(h.data(), a.data(), ptr(l, ln2_w), ptr(l, ln2_b));
    project(lin[l][2], pre_ln ? a.data() : h.data(), f.data(), M, Fw, C, scratch.data());  // (M, Fw)
    for (int64_t m = 0; m < M; ++m) {
      float* row = f.data() + m * Fw;
      map16(row, F, [&](f32x16 v) { return activate(v, act); });
      if (gated)  // [gate, up] side by side: act(gate) * up, packed to the front so that the rows are F apart
        for (int64_t i = 0; i < F; ++i) f[m * F + i] = row[i] * row[F + i];
    }
    project(lin[l][3], f.data(), o.data(), M, C, F, scratch.data());  // (M, C)
    for (int64_t i = 0; i < M * C; ++i) h[i] += o[i];
    if (!pre_ln) norm_rows(h.data(), h.data(), ptr(l, ln2_w), ptr(l, ln2_b));
  }
  if (p[nL * kPerLayer].defined()) norm_rows(h.data(), h.data(), ptr(nL, 0), ptr(nL, 1));  // the final norm
  E* res = static_cast<E*>(out.data_ptr());
  for (int64_t i = 0; i < M * C; ++i) store(res + i, h[i]);
}

// Every layer of a decode step and the final norm in one call: what GPT._trunk computes from the embedded tokens x
// (B, T, C), with the step's keys and values stored at slots (B, T) of the KV cache (n_layer, B, nkv, S, hs) and
// attention under mask (B, 1, T, L). Batch-1 decoding reads each weight once, so its speed is the rate the weights
// stream at; what is left is the layers' small work (norms, activations, residual adds, RoPE, cache writes), which in
// PyTorch is ~15 operator calls a layer, each a few microseconds of dispatch for a microsecond of work: 1.3-2.9 ms a
// token for the 124M shape (AMD EPYC), 10-20% of the step. Here it runs in place in float32 buffers between the
// matrix-vector products. params: kPerLayer tensors (or None) per layer in Param's order, then the final norm's weight
// and bias; the Linears' weights in x's dtype, or int8 / int4 codes with their float32 scales (and zero points) as
// QuantLinear stores them. scales: each layer's attention scale; cos, sin (B, T, hs) float32: RoPE's angles, None
// without RoPE; norm: "layernorm" or "rmsnorm" (the QK-norm too); activation as model.py names it; gated: c_fc gives
// [gate, up]; pre_ln: GPT-2's placement, else GPT-1's. Hidden states stay in float32 between layers (PyTorch's bfloat16
// path rounds them to bfloat16 after each op); the inputs of bfloat16 products and the cached keys and values are
// rounded to bfloat16. Returns (B, T, C) in x's dtype.
at::Tensor decode_layers(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& params, const at::Tensor& cache_k, const at::Tensor& cache_v,
                         const at::Tensor& slots, const at::Tensor& mask, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                         at::ArrayRef<double> scales, int64_t n_head, std::string_view norm, std::string_view activation, bool gated, bool pre_ln,
                         double eps) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_layers: float32 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "decode_layers: x must be contiguous (B, T, C), got ", x.sizes());
  TORCH_CHECK(norm == "layernorm" || norm == "rmsnorm", "decode_layers: no norm named ", std::string(norm));
  const Act act = parse_activation(activation);
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), nL = int64_t(scales.size());
  TORCH_CHECK(nL > 0 && int64_t(params.size()) == nL * kPerLayer + 2, "decode_layers: ", nL * kPerLayer + 2, " parameters for ", nL, " layers, got ",
              params.size());
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.size(0) == nL && cache_k.size(1) == B && cache_v.sizes() == cache_k.sizes() && cache_k.stride(4) == 1 &&
                  cache_v.stride(4) == 1 && cache_k.scalar_type() == dtype && cache_v.scalar_type() == dtype,
              "decode_layers: the cache must be ", dtype, " (", nL, ", ", B, ", n_kv, S, hs) with the head dim contiguous, got ", cache_k.sizes());
  const int64_t nkv = cache_k.size(2), S = cache_k.size(3), hs = cache_k.size(4);
  TORCH_CHECK(nkv > 0 && n_head % nkv == 0, "decode_layers: ", n_head, " query heads cannot share ", nkv, " key/value heads");
  std::vector<at::Tensor> p(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> t = params.get(i);
    if (t.has_value() && t->defined()) p[i] = *t;
  }
  // the norms' weights and biases (the Linears are checked by weights())
  auto norm_param = [&](size_t i, int64_t n, bool needed) {
    TORCH_CHECK(p[i].defined() ? p[i].scalar_type() == dtype && p[i].is_contiguous() && p[i].sizes() == at::IntArrayRef({n}) : !needed,
                "decode_layers: parameter ", i, " (a norm's) must be ", dtype, " [", n, "], got ", p[i].defined() ? p[i].sizes() : at::IntArrayRef({}));
  };
  for (int64_t l = 0; l < nL; ++l) {
    const size_t o = l * kPerLayer;
    const bool qk = p[o + qn_w].defined();
    norm_param(o + ln1_w, C, true), norm_param(o + ln1_b, C, false), norm_param(o + ln2_w, C, true), norm_param(o + ln2_b, C, false);
    norm_param(o + qn_w, hs, qk), norm_param(o + qn_b, hs, false), norm_param(o + kn_w, hs, qk), norm_param(o + kn_b, hs, false);
  }
  norm_param(nL * kPerLayer, C, false), norm_param(nL * kPerLayer + 1, C, false);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.sizes() == at::IntArrayRef({B, T}), "decode_layers: slots must be int64 (", B, ", ", T, ")");
  TORCH_CHECK(mask.dim() == 4 && mask.scalar_type() == at::kBool && mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == T && mask.size(3) <= S,
              "decode_layers: mask must be bool (", B, ", 1, ", T, ", L <= ", S, "), got ", mask.sizes());
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_layers: RoPE needs both cos and sin");
  at::Tensor c, s;
  if (cos.has_value()) {
    c = cos->contiguous(), s = sin->contiguous();
    TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && c.numel() == B * T * hs && s.numel() == B * T * hs && hs % 2 == 0,
                "decode_layers: cos and sin must be float32 (", B, ", ", T, ", ", hs, ")");
  }
  const at::Tensor slot = slots.contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) TORCH_CHECK(0 <= sp[i] && sp[i] < S, "decode_layers: slot ", sp[i], " outside a cache of ", S);
  at::Tensor out = at::empty({B, T, C}, x.options());  // (B, T, C)
  const float* cp = c.defined() ? c.data_ptr<float>() : nullptr;
  const float* snp = s.defined() ? s.data_ptr<float>() : nullptr;
  if (dtype == at::kFloat)
    run_layers<float>(x, p, cache_k, cache_v, sp, mask, cp, snp, scales, n_head, norm == "rmsnorm", act, gated, pre_ln, float(eps), out);
  else
    run_layers<uint16_t>(x, p, cache_k, cache_v, sp, mask, cp, snp, scales, n_head, norm == "rmsnorm", act, gated, pre_ln, float(eps), out);
  return out;
}

}  // namespace

TORCH_LIBRARY(gptlab, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cached_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, Tensor mask, float scale) -> Tensor");
  m.def("gemv_quant(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor?[] params, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, Tensor mask, Tensor? cos, Tensor? sin, "
        "float[] scales, int n_head, str norm, str activation, bool gated, bool pre_ln, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("cached_attention", cached_attention);
  m.impl("gemv_quant", gemv_quant);
  m.impl("decode_layers", decode_layers);
}
