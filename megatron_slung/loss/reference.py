"""Plain-torch reference of the masked cross-entropy: the specification every kernel is tested against.

For each token i with logits x (one row of [N, V]), label t = labels[i] and risk level r = risk[i]:

    lse    = log(sum_j exp(x_j))
    ce     = lse - x_t                                 (= -log p_t)
    ce_ls  = (1 - eps) * ce + eps * (lse - mean_j x_j) (label smoothing eps; = ce when eps = 0)
    ul     = -log(max(1 - p_t, ul_eps))                (unlikelihood), with
             log(1 - p_t) = log(sum_{j != t} exp(x_j)) - lse   (the non-target mass: exact as p_t -> 1)
    z      = z_loss * lse^2                            (z-loss, PaLM-style)

    loss_i = w_r * (ce_ls + z)   if mode_r == ce
           = w_r * (ul + z)      if mode_r == unlikelihood
           = 0                   if mode_r == ignore, or t == ignore_index

A token *carries loss* when its label is not ignore_index and its mode is not ``ignore``;
``num_tokens`` counts those, so the trainer can divide the summed loss over the whole global batch.
Per-level statistics are over every token whose label is not ignore_index, whatever its mode:
``level_count[r]`` tokens and ``level_ce_sum[r]`` = sum of plain ce (no weight, smoothing or z-loss),
so that the loss on masked levels can still be watched.

Everything is computed in float64 whatever the input dtype (the results are returned in float32, or float64
for float64 input), so that the reference is exact enough to judge the float32 kernels.
Non-finite input: a row with a NaN or +inf logit has no softmax; if it carries loss its loss is NaN (and
so is loss_sum), if it is only counted (mode ignore) its loss is 0 and its ce (in level_ce_sum) is NaN;
rows whose label is ignore_index are not looked at. -inf logits (masked vocabulary) are ordinary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_slung.data.risk import NUM_LEVELS
from megatron_slung.loss.policy import LossMode, LossPolicy


@dataclass
class MaskedCEOutput:
    loss_sum: torch.Tensor  # scalar, differentiable: sum of per-token losses
    num_tokens: torch.Tensor  # scalar int64: tokens that carry loss
    per_token: Optional[torch.Tensor]  # [N] float32 per-token loss (None unless asked for)
    level_count: torch.Tensor  # [256] int64: tokens per risk level (labels not ignored)
    level_ce_sum: torch.Tensor  # [256] float32 (detached): plain ce summed per risk level


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, risk: torch.Tensor, vocab_size: int | None = None):
    """Raise a clear error for shape, dtype or range problems (shared by every implementation)."""
    if logits.dim() != 2:
        raise ValueError(f"masked_cross_entropy: logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"masked_cross_entropy: logits must be floating point, got {logits.dtype}")
    n = logits.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"masked_cross_entropy: labels must be [{n}], got shape {tuple(labels.shape)}")
    if risk.shape != (n,):
        raise ValueError(f"masked_cross_entropy: risk must be [{n}], got shape {tuple(risk.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"masked_cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if risk.dtype != torch.uint8:
        raise TypeError(f"masked_cross_entropy: risk must be uint8, got {risk.dtype}")
    if labels.device != logits.device or risk.device != logits.device:
        raise ValueError("masked_cross_entropy: logits, labels and risk must be on the same device")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int):
    valid = labels != ignore_index
    if valid.any():
        lo, hi = labels[valid].min().item(), labels[valid].max().item()
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"masked_cross_entropy: label {bad} is outside the vocabulary [0, {vocab_size}) "
                f"(and is not ignore_index={ignore_index})"
            )


def masked_cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    risk: torch.Tensor,
    policy: "LossPolicy | str",
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    unlikelihood_eps: float = 1e-9,
    return_per_token: bool = False,
) -> MaskedCEOutput:
    policy = LossPolicy.parse(policy)
    check_inputs(logits, labels, risk)
    vocab = logits.shape[1]
    check_label_range(labels, vocab, ignore_index)

    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.double()
    labels = labels.long()
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    level = risk.long()
    mode = policy.mode_tensor(x.device).long()[level]
    weight = policy.weight_tensor(x.device).to(x.dtype)[level]
    carries = valid & (mode != int(LossMode.IGNORE))
    # rows that carry no loss pass no gradient at all (not even 0 * NaN from their logits)
    x = torch.where(carries[:, None], x, x.detach())

    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, safe_labels[:, None]).squeeze(1)
    ce = lse - target
    ce_smoothed = ce
    if label_smoothing:  # (skipped at 0 so that -inf logits, e.g. masked vocab padding, give 0 * inf = NaN nowhere)
        ce_smoothed = (1.0 - label_smoothing) * ce + label_smoothing * (lse - x.mean(dim=-1))
    # log(1 - p_t) = logsumexp over the other columns - lse; a row with no other mass (every other logit -inf)
    # has 1 - p_t = 0 (computed on a stand-in row so that autograd sees no -inf - -inf)
    is_target = torch.zeros_like(x, dtype=torch.bool).scatter_(1, safe_labels[:, None], True)
    others = x.masked_fill(is_target, float("-inf"))
    no_other_mass = ~(others > float("-inf")).any(dim=-1)
    lse_others = torch.logsumexp(torch.where(no_other_mass[:, None], torch.zeros_like(x), others), dim=-1)
    log_1mp = torch.where(no_other_mass, torch.full_like(lse, float("-inf")), lse_others - lse)
    unlikelihood = -torch.clamp(log_1mp, min=math.log(unlikelihood_eps))  # -log(max(1 - p, eps))
    base = torch.where(mode == int(LossMode.UNLIKELIHOOD), unlikelihood, ce_smoothed)
    if z_loss:
        base = base + z_loss * lse * lse
    per_token = torch.where(carries, weight * base, torch.zeros_like(base))
    # a NaN or +inf logit: no softmax (logsumexp would give inf, and inf - x_t is not NaN)
    non_finite = (torch.isnan(x) | (x == float("inf"))).any(dim=-1)
    per_token = torch.where(carries & non_finite, torch.full_like(per_token, float("nan")), per_token)
    ce = torch.where(non_finite, torch.full_like(ce, float("nan")), ce)

    level_count = torch.bincount(level[valid], minlength=NUM_LEVELS)
    level_ce_sum = torch.zeros(NUM_LEVELS, dtype=torch.float32, device=x.device)
    level_ce_sum.index_add_(0, level[valid], ce.detach()[valid].float())
    return MaskedCEOutput(
        loss_sum=per_token.sum().to(out_dtype),
        num_tokens=carries.sum(),
        per_token=per_token.to(out_dtype) if return_per_token else None,
        level_count=level_count,
        level_ce_sum=level_ce_sum,
    )
