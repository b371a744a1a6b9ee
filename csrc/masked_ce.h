// Masked cross-entropy: what the CPU and CUDA kernels share (mode codes, per-row math).
//
// The math is documented in megatron_slung/loss/backends.py. Per row: lse = log sum_j exp(x_j), the target
// logit x_t and the sum of the logits sx give the loss, the plain ce and the gradient coefficients
//     d loss / d x_j = a * p_j - b * [j == t] + c,    p_j = exp(x_j - lse).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SLUNG_HD __host__ __device__ __forceinline__
#else
#define SLUNG_HD inline
#endif

namespace slung {
namespace masked_ce {

// Loss modes: keep in sync with megatron_slung.loss.policy.LossMode.
enum Mode : uint8_t { kModeCE = 0, kModeIgnore = 1, kModeUnlikelihood = 2 };

// What a token contributes: 0 = label is ignore_index, 1 = counted in the per-level stats but no loss
// (mode ignore), 2 = carries loss.
enum Kind : int8_t { kKindSkipped = 0, kKindCounted = 1, kKindCarries = 2 };

struct Options {
  double label_smoothing;
  double z_loss;
  double unlikelihood_eps;
  int64_t vocab;  // the whole vocabulary (all shards), for the label-smoothing mean
};

template <typename acc_t>
struct RowResult {
  acc_t loss, ce, a, b, c;
  int8_t kind;
};

SLUNG_HD float m_exp(float x) { return expf(x); }
SLUNG_HD double m_exp(double x) { return exp(x); }
SLUNG_HD float m_log(float x) { return logf(x); }
SLUNG_HD double m_log(double x) { return log(x); }
SLUNG_HD float m_expm1(float x) { return expm1f(x); }
SLUNG_HD double m_expm1(double x) { return expm1(x); }

// Loss, ce and gradient coefficients of one row whose label is not ignore_index.
template <typename acc_t>
SLUNG_HD RowResult<acc_t> finish_row(int mode, acc_t weight, acc_t lse, acc_t xt, acc_t sx, const Options& o) {
  RowResult<acc_t> r;
  r.ce = lse - xt;
  r.loss = r.a = r.b = r.c = acc_t(0);
  if (mode == kModeIgnore) {
    r.kind = kKindCounted;
    return r;
  }
  r.kind = kKindCarries;
  const acc_t z_term = acc_t(o.z_loss) * lse * lse;
  const acc_t z_grad = acc_t(2.0 * o.z_loss) * lse;
  if (mode == kModeUnlikelihood) {
    // -log(max(1 - p_t, eps)); 1 - p_t = -expm1(log p_t) keeps precision when p_t is small.
    const acc_t log_p = xt - lse;
    const acc_t one_minus_p = -m_expm1(log_p);
    const acc_t eps = acc_t(o.unlikelihood_eps);
    acc_t ratio = acc_t(0);  // p_t / (1 - p_t); the clamp (1 - p_t < eps) passes no gradient
    acc_t ul;
    if (one_minus_p >= eps) {
      ul = -m_log(one_minus_p);
      ratio = m_exp(log_p) / one_minus_p;
    } else {
      ul = -m_log(eps);
    }
    r.loss = weight * (ul + z_term);
    r.a = weight * (z_grad - ratio);
    r.b = -weight * ratio;
    return r;
  }
  // ce with label smoothing e: (1 - e) * ce + e * (lse - mean_j x_j)
  const acc_t e = acc_t(o.label_smoothing);
  // (the smoothing term is left out at e = 0: with -inf logits, e.g. masked vocab padding, sx is -inf)
  const acc_t smoothed = e == acc_t(0) ? r.ce : (acc_t(1) - e) * r.ce + e * (lse - sx / acc_t(o.vocab));
  r.loss = weight * (smoothed + z_term);
  r.a = weight * (acc_t(1) + z_grad);
  r.b = weight * (acc_t(1) - e);
  r.c = -weight * e / acc_t(o.vocab);
  return r;
}

}  // namespace masked_ce
}  // namespace slung
