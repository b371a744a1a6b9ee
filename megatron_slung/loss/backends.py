"""Building blocks of the masked cross-entropy, with an explicit gradient: a torch version and the kernels.

Every implementation (single device, vocab-parallel, fused linear) is assembled from the same steps on a
row of logits ``x`` (or on a vocab shard of it):

1. ``row_stats``: per row, the maximum ``m``, ``s = sum_j exp(x_j - m)``, the non-target mass
   ``q = sum_{j != t} exp(x_j - m)`` (= s when the target is not in this shard), the target logit ``x_t``
   (0 when the target is not in this shard) and ``sum_j x_j`` (for label smoothing). ``q`` is summed on its
   own, never as ``s - exp(x_t - m)``: as p_t -> 1 that difference is lost to rounding.
2. ``finish``: from ``m, s, q, x_t, sum_j x_j`` (already combined over the vocab shards), with
   ``lse = m + log s`` and ``1 - p_t = q / s`` (exact however close p_t is to 1, and unchanged by a constant
   shift of the logits; ``1 - exp(x_t - lse)`` would quantise it to ulp(lse)), the per-token loss, the plain
   ce and log(1 - p_t) (when 1 - p_t < 1/2: ``log p_t = log1p(-(1 - p_t))`` and ``log(1 - p_t) = log(q / s)``;
   else ``log p_t = x_t - lse`` and ``log(1 - p_t) = log1p(-p_t)``), and per-row coefficients of the gradient

       d loss_i / d x_ij = a_i * p_ij + c_i  (j != t_i),    d loss_i / d x_it = gt_i,    p_ij = exp(x_ij - lse_i).

   With weight w, label smoothing e, z-loss coefficient z and vocabulary size V:

       ce:            loss = w * ((1 - e) * (lse - x_t) + e * (lse - sum_j x_j / V) + z * lse^2)
                      a = w * (1 + 2 z lse),   c = -w * e / V,   gt = w * (2 z lse p_t - (1 - p_t) + e (1 - 1/V))
       unlikelihood:  loss = w * (-log(max(1 - p_t, eps)) + z * lse^2)
                      with r = p_t / (1 - p_t) and u = 1 when 1 - p_t >= eps, else r = u = 0 (the clamp has
                      no gradient):  a = w * (2 z lse - r),   c = 0,   gt = w * (2 z lse + u) * p_t
       ignore, or label == ignore_index: loss = 0, a = gt = c = 0.

   (d(-log(1 - p_t))/dx_j = p_t (δ_jt - p_j) / (1 - p_t), which is p_t at j = t: written as such, not as
   r - r p_t; d lse/dx_j = p_j; d x_t/dx_j = δ_jt; d(sum x / V)/dx_j = 1/V.)
   A row with a NaN or +inf logit (``sum x`` is NaN, or ``m`` is +inf) has no softmax: its loss, ce and
   coefficients are NaN when it carries loss, its ce is NaN when it is only counted (mode ignore), so the
   trainer's non-finite check sees it. -inf logits (masked vocabulary) are ordinary.
3. ``grad``: writes ``a * exp(x - lse) + c``, and ``gt`` at the target.
4. ``level_stats``: loss sum, number of tokens carrying loss, and per-level counts and ce sums.

The fused ``forward`` does 1-3 in one sweep over each row (the kernels keep the row hot in cache).
``kind`` per token: 0 = label is ignore_index, 1 = counted but no loss (mode ignore), 2 = carries loss.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from megatron_slung import _ext
from megatron_slung.data.risk import NUM_LEVELS
from megatron_slung.loss.policy import LossMode

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradcheck), everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- finish
def finish(
    m: Tensor,
    s: Tensor,
    q: Tensor,
    xt: Tensor,
    sx: Tensor,
    valid: Tensor,
    mode: Tensor,
    weight: Tensor,
    vocab_size: int,
    label_smoothing: float,
    z_loss: float,
    unlikelihood_eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Step 2 on [N] vectors (see the module docstring). Returns per_token, ce, kind, lse, a, gt, c.

    ``mode`` holds LossMode codes per token, ``weight`` the policy weight per token, ``valid`` is
    ``label != ignore_index``. Used by every path that combines statistics outside a kernel; the same
    operations as ``csrc/masked_ce.h::finish_row``.
    """
    zero = torch.zeros_like(m)
    nan = torch.full_like(m, float("nan"))
    lse = m + torch.log(s)
    one_minus_p = q / s  # 1 - p_t from the non-target mass: exact as p_t -> 1
    near_one = one_minus_p < 0.5  # else p_t <= 1/2, and x_t - lse is the exact one
    log_p = torch.where(near_one, torch.log1p(-one_minus_p), xt - lse)
    p = torch.where(near_one, 1.0 - one_minus_p, torch.exp(log_p))
    log_1mp = torch.where(near_one, torch.log(one_minus_p), torch.log1p(-p))
    non_finite = ~(m < float("inf")) | torch.isnan(sx)  # a NaN or +inf logit in the row
    ce = torch.where(valid, torch.where(non_finite, nan, -log_p), zero)
    is_ce = valid & (mode == int(LossMode.CE))
    is_ul = valid & (mode == int(LossMode.UNLIKELIHOOD))
    z_term = z_loss * lse * lse
    z_grad = 2.0 * z_loss * lse
    eps = label_smoothing

    smoothed = ce if eps == 0 else (1.0 - eps) * ce + eps * (lse - sx / vocab_size)  # no 0 * inf with -inf logits
    loss_ce = weight * (smoothed + z_term)
    gt_ce = weight * (z_grad * p - one_minus_p + eps * (1.0 - 1.0 / vocab_size))

    unclamped = one_minus_p >= unlikelihood_eps
    loss_ul = weight * (torch.where(unclamped, -log_1mp, torch.full_like(m, -math.log(unlikelihood_eps))) + z_term)
    r = torch.where(unclamped, p / torch.clamp(one_minus_p, min=unlikelihood_eps), zero)
    gt_ul = weight * (z_grad + unclamped.to(m.dtype)) * p

    carries = is_ce | is_ul
    bad = carries & non_finite

    def pick(if_ce, if_ul):  # per mode; NaN on a non-finite row that carries loss
        return torch.where(bad, nan, torch.where(is_ce, if_ce, torch.where(is_ul, if_ul, zero)))

    per_token = pick(loss_ce, loss_ul)
    a = pick(weight * (1.0 + z_grad), weight * (z_grad - r))
    gt = pick(gt_ce, gt_ul)
    c = pick(-weight * (eps / vocab_size), zero)
    kind = valid.to(torch.int8) + carries.to(torch.int8)
    return per_token, ce, kind, lse, a, gt, c


# ---------------------------------------------------------------------------------------------- torch
class TorchBackend:
    """The building blocks in plain torch (any device; the fallback when no kernel is built)."""

    name = "torch"

    @staticmethod
    def row_stats(logits: Tensor, target_local: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x = logits.to(acc_dtype(logits.dtype))
        m = x.amax(dim=1)
        shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # a row (shard) of -inf: s = 0, no NaN
        e = torch.exp(x - shift[:, None])
        s = e.sum(dim=1)
        has_target = target_local >= 0
        column = target_local.clamp(min=0)[:, None]
        # the non-target mass, summed on its own (s - e_t loses it to rounding as p_t -> 1)
        e.scatter_(1, column, torch.where(has_target[:, None], torch.zeros_like(s)[:, None], e.gather(1, column)))
        q = e.sum(dim=1)
        xt = x.gather(1, column).squeeze(1)
        xt = torch.where(has_target, xt, torch.zeros_like(xt))
        return m, s, q, xt, x.sum(dim=1)

    @staticmethod
    def grad(logits: Tensor, lse: Tensor, a: Tensor, gt: Tensor, c: Tensor, target_local: Tensor,
             out: Optional[Tensor] = None) -> Tensor:
        x = logits.to(acc_dtype(logits.dtype))
        g = a[:, None] * torch.exp(x - lse[:, None]) + c[:, None]
        has_target = target_local >= 0
        column = target_local.clamp(min=0)[:, None]
        g.scatter_(1, column, torch.where(has_target[:, None], gt[:, None], g.gather(1, column)))
        no_loss = (a == 0) & (gt == 0) & (c == 0)  # exactly 0, as in the kernels (0 * NaN logits would be NaN)
        g.masked_fill_(no_loss[:, None], 0.0)
        if out is None:
            return g.to(logits.dtype)
        out.copy_(g)
        return out

    @staticmethod
    def forward(logits, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss, unlikelihood_eps,
                compute_grad: bool, inplace: bool):
        valid = labels != ignore_index
        target = torch.where(valid, labels, torch.full_like(labels, -1))
        m, s, q, xt, sx = TorchBackend.row_stats(logits, target)
        level = risk.long()
        acc = acc_dtype(logits.dtype)
        per_token, ce, kind, lse, a, gt, c = finish(
            m, s, q, xt, sx, valid, modes.long()[level], weights.to(acc)[level], logits.shape[1],
            label_smoothing, z_loss, unlikelihood_eps,
        )
        grad = None
        if compute_grad:
            grad = TorchBackend.grad(logits, lse, a, gt, c, target, out=logits if inplace else None)
        return per_token, ce, kind, grad

    @staticmethod
    def level_stats(per_token: Tensor, ce: Tensor, kind: Tensor, risk: Tensor):
        level = risk.long()
        loss_sum = per_token.sum()
        num_tokens = (kind == 2).sum()
        level_count = torch.zeros(NUM_LEVELS, dtype=torch.int64, device=ce.device)
        level_count.index_add_(0, level, (kind > 0).long())
        level_ce_sum = torch.zeros(NUM_LEVELS, dtype=torch.float32, device=ce.device)
        level_ce_sum.index_add_(0, level, ce.float())  # ce is 0 where the label is ignored
        return loss_sum, num_tokens, level_count, level_ce_sum


# ---------------------------------------------------------------------------------------------- kernels
class KernelBackend:
    """The same building blocks in megatron_slung._C (CPU C++ and, when built, CUDA)."""

    name = "kernel"
    variant = 0  # CUDA kernel variant (0 = default); tools/bench_masked_ce.py --variants times the others

    @staticmethod
    def available(device: torch.device) -> bool:
        if not _ext.HAVE_C or not hasattr(_ext._C, "masked_ce_forward"):
            return False
        if device.type == "cuda":
            return _ext.HAVE_CUDA_KERNELS
        return device.type == "cpu"

    @staticmethod
    def row_stats(logits, target_local):
        return tuple(_ext._C.masked_ce_row_stats(logits, target_local))

    @staticmethod
    def grad(logits, lse, a, gt, c, target_local, out=None):
        return _ext._C.masked_ce_grad(logits, lse, a, gt, c, target_local, out)

    @staticmethod
    def forward(logits, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss, unlikelihood_eps,
                compute_grad: bool, inplace: bool):
        per_token, ce, kind, grad = _ext._C.masked_ce_forward(
            logits, labels, risk, modes, weights, int(ignore_index), float(label_smoothing), float(z_loss),
            float(unlikelihood_eps), bool(compute_grad), bool(inplace), KernelBackend.variant,
        )
        return per_token, ce, kind, (grad if compute_grad else None)

    @staticmethod
    def level_stats(per_token, ce, kind, risk):
        return tuple(_ext._C.masked_ce_level_stats(per_token, ce, kind, risk))


def pick_backend(impl: str, device: torch.device):
    """``impl``: "auto" (kernel when built for this device, else torch), "kernel" (required) or "torch"."""
    if impl == "torch":
        return TorchBackend
    if impl not in ("auto", "kernel"):
        raise ValueError(f"masked_cross_entropy: impl must be 'auto', 'kernel' or 'torch', got {impl!r}")
    if KernelBackend.available(device):
        return KernelBackend
    if impl == "kernel":
        raise RuntimeError(
            f"masked_cross_entropy: impl='kernel' but megatron_slung._C has no masked-CE kernel for "
            f"{device.type} (built with CUDA: {_ext.HAVE_CUDA_KERNELS}); rebuild with "
            "`pip install --no-build-isolation -e .` or use impl='auto'"
        )
    return TorchBackend
