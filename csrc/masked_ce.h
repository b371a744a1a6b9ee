// Masked cross-entropy: what the CPU and CUDA kernels share (mode codes, per-row math).
//
// The math is documented in megatron_slung/loss/backends.py. Per row, relative to the row max m:
// s = sum_j exp(x_j - m), the non-target mass q = sum_{j != t} exp(x_j - m) (summed on its own, never as
// s - exp(x_t - m)), the target logit x_t and the sum of the logits sx give the loss, the plain ce and the
// gradient coefficients
//     d loss / d x_j = a * p_j + c  (j != t),    d loss / d x_t = gt,    p_j = exp(x_j - lse).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

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
  acc_t loss, ce, lse, a, gt, c;
  int8_t kind;
};

SLUNG_HD float m_exp(float x) { return expf(x); }
SLUNG_HD double m_exp(double x) { return exp(x); }
SLUNG_HD float m_log(float x) { return logf(x); }
SLUNG_HD double m_log(double x) { return log(x); }
SLUNG_HD float m_log1p(float x) { return log1pf(x); }
SLUNG_HD double m_log1p(double x) { return log1p(x); }
#ifdef __CUDA_ARCH__
SLUNG_HD bool m_isnan(float x) { return isnan(x); }
SLUNG_HD bool m_isnan(double x) { return isnan(x); }
#else
inline bool m_isnan(float x) { return std::isnan(x); }
inline bool m_isnan(double x) { return std::isnan(x); }
#endif

// Loss, ce and gradient coefficients of one row whose label is not ignore_index, from the row statistics
// (m, s, q, x_t, sx) above (combined over the vocab shards when vocab-parallel).
template <typename acc_t>
SLUNG_HD RowResult<acc_t> finish_row(int mode, acc_t weight, acc_t m, acc_t s, acc_t q, acc_t xt, acc_t sx,
                                     const Options& o) {
  RowResult<acc_t> r;
  r.loss = r.a = r.gt = r.c = acc_t(0);
  r.lse = m + m_log(s);
  // 1 - p_t = q / s from the non-target mass: exact as p_t -> 1, where 1 - exp(x_t - lse) would be
  // quantised to ulp(lse) (and depend on a constant shift of the logits). For p_t <= 1/2, log p_t = x_t - lse
  // is the exact one, and log(1 - p_t) = log1p(-p_t).
  const acc_t one_minus_p = q / s;
  const bool near_one = one_minus_p < acc_t(0.5);
  const acc_t log_p = near_one ? m_log1p(-one_minus_p) : xt - r.lse;
  const acc_t p = near_one ? acc_t(1) - one_minus_p : m_exp(log_p);
  const acc_t log_1mp = near_one ? m_log(one_minus_p) : m_log1p(-p);
  r.ce = -log_p;
  // A NaN or +inf logit anywhere in the row (sx is NaN with any NaN, m is +inf with any +inf): there is no
  // softmax; NaN loss, ce and gradient, so that the caller's non-finite check sees it. (-inf logits are fine.)
  const bool non_finite = !(m < std::numeric_limits<acc_t>::infinity()) || m_isnan(sx);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  if (non_finite) r.ce = nan;
  if (mode == kModeIgnore) {
    r.kind = kKindCounted;
    return r;
  }
  r.kind = kKindCarries;
  if (non_finite) {
    r.loss = r.a = r.gt = r.c = nan;
    return r;
  }
  const acc_t z_term = acc_t(o.z_loss) * r.lse * r.lse;
  const acc_t z_grad = acc_t(2.0 * o.z_loss) * r.lse;
  if (mode == kModeUnlikelihood) {
    // -log(max(1 - p_t, eps)); the clamp (1 - p_t < eps) passes no gradient. With r = p_t / (1 - p_t):
    // d/dx_j = -r p_j (j != t) and r (1 - p_t) = p_t at the target, written as such (no cancellation).
    const acc_t eps = acc_t(o.unlikelihood_eps);
    const bool open = one_minus_p >= eps;
    const acc_t ul = open ? -log_1mp : -m_log(eps);
    const acc_t ratio = open ? p / one_minus_p : acc_t(0);
    r.loss = weight * (ul + z_term);
    r.a = weight * (z_grad - ratio);
    r.gt = weight * (z_grad + (open ? acc_t(1) : acc_t(0))) * p;
    return r;
  }
  // ce with label smoothing e: (1 - e) * ce + e * (lse - mean_j x_j)
  const acc_t e = acc_t(o.label_smoothing);
  // (the smoothing term is left out at e = 0: with -inf logits, e.g. masked vocab padding, sx is -inf)
  const acc_t smoothed = e == acc_t(0) ? r.ce : (acc_t(1) - e) * r.ce + e * (r.lse - sx / acc_t(o.vocab));
  r.loss = weight * (smoothed + z_term);
  r.a = weight * (acc_t(1) + z_grad);
  r.c = -weight * e / acc_t(o.vocab);
  // a p_t + c - w (1 - e), with p_t - 1 written as -(1 - p_t)
  r.gt = weight * (z_grad * p - one_minus_p + e * (acc_t(1) - acc_t(1) / acc_t(o.vocab)));
  return r;
}

}  // namespace masked_ce
}  // namespace slung
