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

// One layer's attention in a decode step, as CacheStep.update followed by F.scaled_dot_product_attention with a
// boolean mask: the step's new keys and values k_new, v_new (B, T, nkv, hs) are written into the layer's cache
// cache_k, cache_v (B, nkv, S, hs) at slots (B, T), then each query q (B, nh, T, hs) attends over the first L slots
// where mask (B, 1, T, L) allows, query head h reading key/value head h / (nh / nkv) (grouped-query attention). At decode shapes SDPA's CPU kernels spend most of their time on set-up (~20 us a
// layer in float32, ~110 in bfloat16, for 12 heads over 144 keys) and the cache writes are two index_put calls;
// here it is one call. Sums in float32. Any strides with the head dim contiguous. Returns (B, nh, T, hs), laid out as
// (B, T, nh, hs) so that the caller's transpose back to (B, T, nh * hs) is a view.
at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& cache_k,
                            const at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_new.dim() == 4 && v_new.dim() == 4 && cache_k.dim() == 4 && mask.dim() == 4, "attention: 4-d tensors");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hs = q.size(3), nkv = cache_k.size(1), S = cache_k.size(2), L = mask.size(3);
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "attention: ", nh, " query heads cannot share ", nkv, " key/value heads");
  const int64_t group = nh / nkv;  // query heads per key/value head (grouped-query attention)
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "attention: float32 or bfloat16, got ", dtype);
  for (const at::Tensor* t : {&k_new, &v_new, &cache_k, &cache_v})
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
  const bool* m = mask.data_ptr<bool>();
  auto run = [&](auto* qp, auto* knp, auto* vnp, auto* kp, auto* vp, auto* op) {
    using E = std::remove_pointer_t<decltype(kp)>;
    for (int64_t b = 0; b < B; ++b)  // the writes: B * T * nh rows of hs, a few KB
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < nkv; ++h) {
          const int64_t src = b * k_new.stride(0) + t * k_new.stride(1) + h * k_new.stride(2);
          const int64_t dst = b * cache_k.stride(0) + h * cache_k.stride(1) + sp[b * T + t] * cache_k.stride(2);
          std::memcpy(kp + dst, knp + src, hs * sizeof(E));
          std::memcpy(vp + b * cache_v.stride(0) + h * cache_v.stride(1) + sp[b * T + t] * cache_v.stride(2),
                      vnp + b * v_new.stride(0) + t * v_new.stride(1) + h * v_new.stride(2), hs * sizeof(E));
        }
    // one task per (row, head, query): 12-ish for a batch-1 step, each a few us of work
    at::parallel_for(0, B * nh * T, 4, [&](int64_t i0, int64_t i1) {
      std::vector<float> qf(hs), acc(hs), scores((L + 15) / 16 * 16);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / (nh * T), h = i / T % nh, t = i % T;
        const E* qi = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
        for (int64_t d = 0; d < hs; ++d) qf[d] = to_float(qi[d]);
        const int64_t g = h / group;  // the key/value head this query head reads
        attend(qf.data(), kp + b * cache_k.stride(0) + g * cache_k.stride(1), vp + b * cache_v.stride(0) + g * cache_v.stride(1),
                   cache_k.stride(2), cache_v.stride(2), m + b * mask.stride(0) + t * mask.stride(2), mask.stride(3), L, hs, float(scale),
                   scores.data(), acc.data());
        auto* o = op + ((b * T + t) * nh + h) * hs;
        for (int64_t d = 0; d < hs; ++d) o[d] = std::remove_pointer_t<decltype(op)>(acc[d]);
      }
    });
  };
  if (dtype == at::kFloat) {
    run(q.data_ptr<float>(), k_new.data_ptr<float>(), v_new.data_ptr<float>(), cache_k.data_ptr<float>(), cache_v.data_ptr<float>(),
        out.data_ptr<float>());
  } else {
    auto u16 = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    run(u16(q), u16(k_new), u16(v_new), u16(cache_k), u16(cache_v), out.data_ptr<at::BFloat16>());
  }
  return out.transpose(1, 2);  // (B, nh, T, hs)
}

}  // namespace

TORCH_LIBRARY(gptlab, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cached_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("cached_attention", cached_attention);
}
