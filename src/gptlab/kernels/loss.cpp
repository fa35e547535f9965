// Cross-entropy over a vocabulary for training on CPU: log p(target) of each row of logits (N, V), and the
// gradient of those log-probabilities with respect to the logits.
//
// PyTorch's log_softmax + gather materialises a float32 (N, V) copy of bfloat16 logits and the log-softmax,
// and its backward a softmax, a one-hot and a product, each a full pass over N x V elements (103M for
// 2048 tokens of GPT-2's vocabulary). Here the forward reads each row twice (its maximum, then the sum of
// e^(x - max)) while it sits in cache and keeps only log-sum-exp and the target's log-probability; the
// backward reads each row once more and writes scale * (softmax - onehot) straight into the gradient, in
// the logits' dtype. Sums in float32, e^x by exp16 (simd.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "simd.h"

namespace {

using namespace gptlab_simd;

constexpr int64_t kIgnore = -100;  // PyTorch's ignore_index: no target in this row

template <typename T>
float row_max(const T* x, int64_t V) {
  const f32x16 lowest = f32x16{} - std::numeric_limits<float>::infinity();
  f32x16 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;  // four maxima, so the compares do not wait on each other
  int64_t j = 0;
  for (; j + 64 <= V; j += 64) {
    const f32x16 a = load16(x + j), b = load16(x + j + 16), c = load16(x + j + 32), d = load16(x + j + 48);
    m0 = a > m0 ? a : m0, m1 = b > m1 ? b : m1, m2 = c > m2 ? c : m2, m3 = d > m3 ? d : m3;
  }
  for (; j + 16 <= V; j += 16) {
    const f32x16 v = load16(x + j);
    m0 = v > m0 ? v : m0;
  }
  m0 = m1 > m0 ? m1 : m0, m2 = m3 > m2 ? m3 : m2;
  float top = hmax(m2 > m0 ? m2 : m0);
  for (; j < V; ++j) top = std::max(top, to_float(x[j]));
  return top;
}

// log sum_j e^x_j, shifted by the row's maximum so nothing overflows
template <typename T>
float row_logsumexp(const T* x, int64_t V) {
  const float top = row_max(x, V);
  f32x16 s0 = {}, s1 = {};  // two sums, so consecutive adds do not wait on each other
  int64_t j = 0;
  for (; j + 32 <= V; j += 32) {
    s0 += exp16(load16(x + j) - top);
    s1 += exp16(load16(x + j + 16) - top);
  }
  for (; j + 16 <= V; j += 16) s0 += exp16(load16(x + j) - top);
  float sum = hsum(s0 + s1);
  for (; j < V; ++j) sum += std::exp(to_float(x[j]) - top);
  return top + std::log(sum);
}

// g = scale * (softmax(x) - onehot(t)), the gradient of -scale * log p(t), in x's dtype
template <typename T>
void grad_row(const T* x, T* g, int64_t V, float lse, float scale, int64_t t) {
  if (scale == 0.f) {  // an ignored row, or one the loss does not count
    std::memset(g, 0, V * sizeof(T));
    return;
  }
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) store16(g + j, exp16(load16(x + j) - lse) * scale);
  for (; j < V; ++j) store(g + j, std::exp(to_float(x[j]) - lse) * scale);
  if (t != kIgnore) store(g + t, (std::exp(to_float(x[t]) - lse) - 1.f) * scale);
}

void check_inputs(const char* name, const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              name, ": logits must be contiguous float32 or bfloat16 (N, V), got ", logits.scalar_type(), " ", logits.sizes());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == N && targets.is_contiguous(),
              name, ": targets must be contiguous int64 (", N, "), got ", targets.scalar_type(), " ", targets.sizes());
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(t[i] == kIgnore || (0 <= t[i] && t[i] < V), name, ": target ", t[i], " outside a vocabulary of ", V, " (row ", i, ")");
}

// (log p(target) per row, 0 where the target is -100; log-sum-exp per row), both float32 (N,)
std::tuple<at::Tensor, at::Tensor> target_logprobs(const at::Tensor& logits, const at::Tensor& targets) {
  check_inputs("target_logprobs", logits, targets);
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor picked = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  float* pp = picked.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  auto run = [&](auto* x) {
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const auto* row = x + r * V;
        lp[r] = row_logsumexp(row, V);
        pp[r] = tp[r] == kIgnore ? 0.f : to_float(row[tp[r]]) - lp[r];
      }
    });
  };
  if (logits.scalar_type() == at::kFloat) run(logits.data_ptr<float>());
  else run(reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()));
  return {picked, lse};
}

// the gradient of sum_r -scale_r log p(target_r) with respect to the logits: row r is scale_r * (softmax - onehot(target_r)),
// in the logits' dtype; lse from target_logprobs, scale float32 (N,) (0 for rows that do not count)
at::Tensor target_logprobs_grad(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& scale) {
  check_inputs("target_logprobs_grad", logits, targets);
  const int64_t N = logits.size(0), V = logits.size(1);
  for (const at::Tensor* v : {&lse, &scale})
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == N && v->is_contiguous(),
                "target_logprobs_grad: lse and scale must be contiguous float32 (", N, "), got ", v->scalar_type(), " ", v->sizes());
  at::Tensor grad = at::empty_like(logits);
  const float* lp = lse.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  auto run = [&](auto* x, auto* g) {
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) grad_row(x + r * V, g + r * V, V, lp[r], sp[r], tp[r]);
    });
  };
  if (logits.scalar_type() == at::kFloat) run(logits.data_ptr<float>(), grad.data_ptr<float>());
  else run(reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>()), reinterpret_cast<uint16_t*>(grad.data_ptr<at::BFloat16>()));
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptlab, m) {
  m.def("target_logprobs(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  m.def("target_logprobs_grad(Tensor logits, Tensor targets, Tensor lse, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptlab, CPU, m) {
  m.impl("target_logprobs", target_logprobs);
  m.impl("target_logprobs_grad", target_logprobs_grad);
}
