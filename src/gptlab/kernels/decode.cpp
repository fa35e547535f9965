// Decode kernels: matrix-vector products y = x W^T + b for a few rows of x (float32 or bfloat16), and a decode
// step's attention fused with its KV-cache writes (cached_attention, below).
//
// At one row a Linear reads each weight once and does one multiply-add with it, so its speed is the
// rate at which the weight streams from memory. BLAS GEMV and oneDNN read it at 40-75% of the rate a
// plain sum of the same bytes reaches on these CPUs (benchmarks/linear_read_rate.py); this kernel
// reads each output's weight row front to back, one sequential stream per thread, with four vector
// accumulators so the multiply-adds never wait on each other, asking for the bytes 4 KB ahead, and
// reaches the sum's rate.
//
// Built on first use by gptlab/kernels/__init__.py for the CPU at hand (-march=native) and registered
// as torch.ops.gptlab.gemv and torch.ops.gptlab.cached_attention; the threads are PyTorch's own
// (at::parallel_for), so they share its pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

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

inline void store(float* p, float v) { *p = v; }

// float32 -> bfloat16 rounded to nearest even, as PyTorch rounds (a NaN stays a NaN)
inline void store(uint16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40) : uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
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

inline f32x16 abs16(f32x16 x) { return x < 0.f ? -x : x; }

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

// the parameters of one layer in decode_layers' list, in this order (absent ones None)
enum Param { ln1_w, ln1_b, attn_w, attn_b, qn_w, qn_b, kn_w, kn_b, attn_proj_w, attn_proj_b, ln2_w, ln2_b, fc_w, fc_b, mlp_proj_w, mlp_proj_b, kPerLayer };

// decode_layers for weights and cache of element type E (float, or uint16_t holding bfloat16)
template <typename E>
void run_layers(const at::Tensor& x, const std::vector<at::Tensor>& p, const at::Tensor& cache_k, const at::Tensor& cache_v, const int64_t* slots,
                const at::Tensor& mask, const float* cos, const float* sin, at::ArrayRef<double> scales, int64_t nh, bool rms, Act act,
                bool gated, bool pre_ln, float eps, at::Tensor& out) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), M = B * T, nL = int64_t(scales.size());
  const int64_t nkv = cache_k.size(2), hs = cache_k.size(4), L = mask.size(3);
  const int64_t Q = nh * hs, W = Q + 2 * nkv * hs;  // query width; q, k and v side by side
  const int64_t F = p[mlp_proj_w].size(1), Fw = p[fc_w].size(0);  // MLP width; c_fc's outputs (2F gated)
  auto ptr = [&](int64_t l, int i) -> const E* { const at::Tensor& t = p[l * kPerLayer + i]; return t.defined() ? static_cast<const E*>(t.data_ptr()) : nullptr; };
  std::vector<float> h(M * C), a(M * C), qkv(M * W), y(M * Q), f(M * Fw), o(M * C);
  std::vector<uint16_t> xb(M * std::max({C, Q, F})), qkv_e(std::is_same_v<E, float> ? 0 : M * W);
  const E* xp = static_cast<const E*>(x.data_ptr());
  for (int64_t i = 0; i < M * C; ++i) h[i] = to_float(xp[i]);
  // out (M, N) = in (M, K) w^T + bias, in float32; bfloat16 weights read with the bfloat16 dot product where the CPU has it
  auto project = [&](const E* w, const E* bias, const float* in, float* res, int64_t N, int64_t K) {
#if defined(__AVX512BF16__)
    if constexpr (!std::is_same_v<E, float>) {
      for (int64_t i = 0; i < M * K; ++i) store(&xb[i], in[i]);  // the inputs rounded to bfloat16, as PyTorch's bf16 Linear has them
      gemv_rows(w, xb.data(), bias, res, M, N, K);
      return;
    }
#endif
    gemv_rows(w, in, bias, res, M, N, K);
  };
  auto norm_rows = [&](const float* in, float* res, const E* w, const E* b) {
    for (int64_t m = 0; m < M; ++m) normalize(in + m * C, res + m * C, C, w, b, eps, rms);
  };
  const bool* mp = mask.data_ptr<bool>();
  for (int64_t l = 0; l < nL; ++l) {
    // attention: x + proj(attend(heads(norm(x)))) pre-LN, norm(x + proj(attend(heads(x)))) post-LN
    if (pre_ln) norm_rows(h.data(), a.data(), ptr(l, ln1_w), ptr(l, ln1_b));
    project(ptr(l, attn_w), ptr(l, attn_b), pre_ln ? a.data() : h.data(), qkv.data(), W, C);  // (M, W)
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
    project(ptr(l, attn_proj_w), ptr(l, attn_proj_b), y.data(), o.data(), C, Q);  // (M, C)
    for (int64_t i = 0; i < M * C; ++i) h[i] += o[i];
    if (!pre_ln) norm_rows(h.data(), h.data(), ptr(l, ln1_w), ptr(l, ln1_b));
    // MLP: x + proj(act(fc(norm(x)))), gated proj(act(gate) * up)
    if (pre_ln) norm_rows(h.data(), a.data(), ptr(l, ln2_w), ptr(l, ln2_b));
    project(ptr(l, fc_w), ptr(l, fc_b), pre_ln ? a.data() : h.data(), f.data(), Fw, C);  // (M, Fw)
    for (int64_t m = 0; m < M; ++m) {
      float* row = f.data() + m * Fw;
      map16(row, F, [&](f32x16 v) { return activate(v, act); });
      if (gated)  // [gate, up] side by side: act(gate) * up, packed to the front so that the rows are F apart
        for (int64_t i = 0; i < F; ++i) f[m * F + i] = row[i] * row[F + i];
    }
    project(ptr(l, mlp_proj_w), ptr(l, mlp_proj_b), f.data(), o.data(), C, F);  // (M, C)
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
// and bias; scales: each layer's attention scale; cos, sin (B, T, hs) float32: RoPE's angles, None without RoPE; norm:
// "layernorm" or "rmsnorm" (the QK-norm too); activation as model.py names it; gated: c_fc gives [gate, up]; pre_ln:
// GPT-2's placement, else GPT-1's. Hidden states stay in float32 between layers (PyTorch's bfloat16 path rounds them
// to bfloat16 after each op); the inputs of every product and the cached keys and values are rounded to the weights'
// dtype. Returns (B, T, C) in x's dtype.
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
  TORCH_CHECK(int64_t(params.size()) == nL * kPerLayer + 2, "decode_layers: ", nL * kPerLayer + 2, " parameters for ", nL, " layers, got ", params.size());
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.size(0) == nL && cache_k.size(1) == B && cache_v.sizes() == cache_k.sizes() && cache_k.stride(4) == 1 &&
                  cache_v.stride(4) == 1 && cache_k.scalar_type() == dtype && cache_v.scalar_type() == dtype,
              "decode_layers: the cache must be ", dtype, " (", nL, ", ", B, ", n_kv, S, hs) with the head dim contiguous, got ", cache_k.sizes());
  const int64_t nkv = cache_k.size(2), S = cache_k.size(3), hs = cache_k.size(4), Q = n_head * hs;
  TORCH_CHECK(nkv > 0 && n_head % nkv == 0, "decode_layers: ", n_head, " query heads cannot share ", nkv, " key/value heads");
  std::vector<at::Tensor> p(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> t = params.get(i);
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(), "decode_layers: parameter ", i, " must be contiguous ", dtype);
    p[i] = *t;
  }
  auto expect = [&](size_t i, std::vector<int64_t> shape, bool needed) {
    TORCH_CHECK(p[i].defined() ? p[i].sizes() == at::IntArrayRef(shape) : !needed, "decode_layers: parameter ", i, " must be ", at::IntArrayRef(shape),
                ", got ", p[i].defined() ? p[i].sizes() : at::IntArrayRef({}));
  };
  const int64_t F = p[mlp_proj_w].defined() ? p[mlp_proj_w].size(1) : 0, Fw = gated ? 2 * F : F;
  for (int64_t l = 0; l < nL; ++l) {
    const size_t o = l * kPerLayer;
    const bool qk = p[o + qn_w].defined();
    for (auto [w, b] : {std::pair{ln1_w, ln1_b}, std::pair{ln2_w, ln2_b}}) expect(o + w, {C}, true), expect(o + b, {C}, false);
    for (auto [w, b] : {std::pair{qn_w, qn_b}, std::pair{kn_w, kn_b}}) expect(o + w, {hs}, qk), expect(o + b, {hs}, false);
    expect(o + attn_w, {Q + 2 * nkv * hs, C}, true), expect(o + attn_b, {Q + 2 * nkv * hs}, false);
    expect(o + attn_proj_w, {C, Q}, true), expect(o + attn_proj_b, {C}, false);
    expect(o + fc_w, {Fw, C}, true), expect(o + fc_b, {Fw}, false);
    expect(o + mlp_proj_w, {C, F}, true), expect(o + mlp_proj_b, {C}, false);
  }
  expect(nL * kPerLayer, {C}, false), expect(nL * kPerLayer + 1, {C}, false);
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
  m.def("decode_layers(Tensor x, Tensor?[] params, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, Tensor mask, Tensor? cos, Tensor? sin, "
        "float[] scales, int n_head, str norm, str activation, bool gated, bool pre_ln, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("cached_attention", cached_attention);
  m.impl("decode_layers", decode_layers);
}
