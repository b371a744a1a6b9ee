"""Building blocks of the masked cross-entropy, with an explicit gradient: a torch version and the kernels.

Every implementation (single device, vocab-parallel, fused linear) is assembled from the same steps on a
row of logits ``x`` (or on a vocab shard of it):

1. ``row_stats``: per row, the maximum ``m``, ``s = sum_j exp(x_j - m)``, the target logit ``x_t`` (0 when
   the target is not in this shard) and ``sum_j x_j`` (for label smoothing).
2. ``finish``: from ``lse = m + log s``, ``x_t`` and ``sum_j x_j`` (already combined over the vocab shards),
   the per-token loss, the plain ce, and three per-row coefficients ``a, b, c`` of the gradient

       d loss_i / d x_ij = a_i * p_ij - b_i * [j == t_i] + c_i,      p_ij = exp(x_ij - lse_i).

   With weight w, label smoothing e, z-loss coefficient z and vocabulary size V:

       ce:            loss = w * ((1 - e) * (lse - x_t) + e * (lse - sum_j x_j / V) + z * lse^2)
                      a = w * (1 + 2 z lse),   b = w * (1 - e),   c = -w * e / V
       unlikelihood:  loss = w * (-log(max(1 - p_t, eps)) + z * lse^2)
                      with r = p_t / (1 - p_t) when 1 - p_t >= eps, else r = 0 (the clamp has no gradient):
                      a = w * (2 z lse - r),   b = -w * r,   c = 0
       ignore, or label == ignore_index: loss = 0, a = b = c = 0.

   (d(-log(1 - p_t))/dx_j = p_t (δ_jt - p_j) / (1 - p_t); d lse/dx_j = p_j; d x_t/dx_j = δ_jt;
   d(sum x / V)/dx_j = 1/V.)
3. ``grad``: writes ``a * exp(x - lse) + c`` and subtracts ``b`` at the target.
4. ``level_stats``: loss sum, number of tokens carrying loss, and per-level counts and ce sums.

The fused ``forward`` does 1-3 in one sweep over each row (the kernels keep the row hot in cache).
``kind`` per token: 0 = label is ignore_index, 1 = counted but no loss (mode ignore), 2 = carries loss.
"""

from __future__ import annotations

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
    lse: Tensor,
    xt: Tensor,
    sx: Tensor,
    valid: Tensor,
    mode: Tensor,
    weight: Tensor,
    vocab_size: int,
    label_smoothing: float,
    z_loss: float,
    unlikelihood_eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Step 2 on [N] vectors (see the module docstring). Returns per_token, ce, kind, a, b, c.

    ``mode`` holds LossMode codes per token, ``weight`` the policy weight per token, ``valid`` is
    ``label != ignore_index``. Used by every path that combines statistics outside a kernel.
    """
    zero = torch.zeros_like(lse)
    ce = torch.where(valid, lse - xt, zero)
    is_ce = valid & (mode == int(LossMode.CE))
    is_ul = valid & (mode == int(LossMode.UNLIKELIHOOD))
    z_term = z_loss * lse * lse
    z_grad = 2.0 * z_loss * lse
    eps = label_smoothing

    smoothed = ce if eps == 0 else (1.0 - eps) * ce + eps * (lse - sx / vocab_size)  # no 0 * inf with -inf logits
    loss_ce = weight * (smoothed + z_term)

    log_p = xt - lse
    one_minus_p = -torch.expm1(log_p)
    unclamped = one_minus_p >= unlikelihood_eps
    loss_ul = weight * (-torch.log(torch.clamp(one_minus_p, min=unlikelihood_eps)) + z_term)
    r = torch.where(unclamped, torch.exp(log_p) / torch.clamp(one_minus_p, min=unlikelihood_eps), zero)

    per_token = torch.where(is_ce, loss_ce, torch.where(is_ul, loss_ul, zero))
    a = torch.where(is_ce, weight * (1.0 + z_grad), torch.where(is_ul, weight * (z_grad - r), zero))
    b = torch.where(is_ce, weight * (1.0 - eps), torch.where(is_ul, -weight * r, zero))
    c = torch.where(is_ce, -weight * (eps / vocab_size), zero)
    kind = valid.to(torch.int8) + (is_ce | is_ul).to(torch.int8)
    return per_token, ce, kind, a, b, c


# ---------------------------------------------------------------------------------------------- torch
class TorchBackend:
    """The building blocks in plain torch (any device; the fallback when no kernel is built)."""

    name = "torch"

    @staticmethod
    def row_stats(logits: Tensor, target_local: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        x = logits.to(acc_dtype(logits.dtype))
        m = x.amax(dim=1)
        s = torch.exp(x - m[:, None]).sum(dim=1)
        has_target = target_local >= 0
        xt = x.gather(1, target_local.clamp(min=0)[:, None]).squeeze(1)
        xt = torch.where(has_target, xt, torch.zeros_like(xt))
        return m, s, xt, x.sum(dim=1)

    @staticmethod
    def grad(logits: Tensor, lse: Tensor, a: Tensor, b: Tensor, c: Tensor, target_local: Tensor,
             out: Optional[Tensor] = None) -> Tensor:
        x = logits.to(acc_dtype(logits.dtype))
        g = a[:, None] * torch.exp(x - lse[:, None]) + c[:, None]
        has_target = target_local >= 0
        g.scatter_add_(1, target_local.clamp(min=0)[:, None], torch.where(has_target, -b, torch.zeros_like(b))[:, None])
        if out is None:
            return g.to(logits.dtype)
        out.copy_(g)
        return out

    @staticmethod
    def forward(logits, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss, unlikelihood_eps,
                compute_grad: bool, inplace: bool):
        valid = labels != ignore_index
        target = torch.where(valid, labels, torch.full_like(labels, -1))
        m, s, xt, sx = TorchBackend.row_stats(logits, target)
        lse = m + torch.log(s)
        level = risk.long()
        acc = acc_dtype(logits.dtype)
        per_token, ce, kind, a, b, c = finish(
            lse, xt, sx, valid, modes.long()[level], weights.to(acc)[level], logits.shape[1],
            label_smoothing, z_loss, unlikelihood_eps,
        )
        grad = None
        if compute_grad:
            grad = TorchBackend.grad(logits, lse, a, b, c, target, out=logits if inplace else None)
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
    def grad(logits, lse, a, b, c, target_local, out=None):
        return _ext._C.masked_ce_grad(logits, lse, a, b, c, target_local, out)

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
