"""Fused output layer + masked cross-entropy: the [N, V] logits never exist at once.

    out = fused_linear_masked_cross_entropy(hidden, weight, labels, risk, "masked")
    (out.loss_sum / global_num_tokens).backward()     # fills hidden.grad and weight.grad

Tokens are processed in chunks of ``chunk_size`` rows. For each chunk (Liger / Cut-CE style):

    logits_c  = hidden_c @ weight.T                 [c, V]  (the only vocab-sized buffer, reused in place)
    loss_c, G_c = masked CE forward, gradient written into logits_c (G_c = d loss_sum / d logits_c)
    grad_hidden_c  = G_c @ weight                   [c, H]
    grad_weight   += G_c.T @ hidden_c               [V, H]  (accumulated in float32 for bf16/fp16 weights)

so both gradients are ready at the end of the forward and the backward only scales them by the incoming
gradient (a scalar: ``per_token`` is returned detached here). Peak extra memory: one [chunk, V] buffer
plus the two gradients (and a float32 accumulator for a low-precision weight).

Vocab-parallel (``tp_group``): ``weight`` is this rank's shard [V/tp, H] (rows rank*V/tp ..), ``hidden``
is the same on every rank. Each chunk uses the vocab-parallel loss (two small all-reduces per chunk, see
masked_ce.py), ``grad_weight`` is this rank's shard, and ``grad_hidden`` (a sum over the vocabulary) is
all-reduced over the group once at the end, so it is the full gradient on every rank: do NOT also pass
``hidden`` through a copy-to-tensor-parallel-region whose backward all-reduces again.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_slung.loss import backends
from megatron_slung.loss.masked_ce import _check_options, loss_and_grad, policy_tables
from megatron_slung.loss.policy import LossPolicy
from megatron_slung.loss.reference import MaskedCEOutput, check_inputs, check_label_range


def default_chunk_size(num_tokens: int, local_vocab: int, hidden_size: int) -> int:
    """About as many logits per chunk as there are hidden-state elements in total (a power of two)."""
    chunks = max(1, math.ceil(local_vocab / max(hidden_size, 1)))
    rows = max(1, math.ceil(num_tokens / chunks))
    return max(1, min(num_tokens, 1 << (rows - 1).bit_length()))  # >= 1: an empty batch is one empty chunk


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc += a @ b, with acc possibly float32 while a, b are bf16/fp16."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:  # cuBLAS: low-precision operands, float32 output, no float32 copy of the operands
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _FusedLinearMaskedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss,
                unlikelihood_eps, backend, group, chunk_size, fp32_weight_grad, grad_enabled):
        # under no_grad (evaluation, where the weight still requires grad) only the loss: no gradient buffers
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        compute_grad = need_hidden or need_weight
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        if need_weight:
            acc_dtype = torch.float32 if (fp32_weight_grad and weight.dtype in (torch.bfloat16, torch.float16)) \
                else weight.dtype
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        per_token, ce, kind = [], [], []
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            h = hidden[start:end]
            logits = h @ weight.t()
            pt, c, k, g = loss_and_grad(
                logits, labels[start:end], risk[start:end], modes, weights, ignore_index, label_smoothing,
                z_loss, unlikelihood_eps, backend, group, compute_grad, inplace=True,
            )
            per_token.append(pt)
            ce.append(c)
            kind.append(k)
            if need_hidden:
                torch.mm(g, weight, out=grad_hidden[start:end])
            if need_weight:
                _accumulate(grad_weight, g.t(), h)
            del logits, g
        if need_hidden and group is not None:
            dist.all_reduce(grad_hidden, group=group)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        if n == 0:
            acc = backends.acc_dtype(hidden.dtype)
            per_token, ce, kind = [hidden.new_zeros(0, dtype=acc)], [hidden.new_zeros(0, dtype=acc)], \
                [hidden.new_zeros(0, dtype=torch.int8)]
        per_token, ce, kind = torch.cat(per_token), torch.cat(ce), torch.cat(kind)
        loss_sum, num_tokens, level_count, level_ce_sum = backend.level_stats(per_token, ce, kind, risk)
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(per_token, num_tokens, level_count, level_ce_sum)
        return loss_sum, per_token, num_tokens, level_count, level_ce_sum

    @staticmethod
    def backward(ctx, grad_sum, *_):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_masked_cross_entropy: backward ran twice through the same call")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_sum is not None and not torch.equal(grad_sum, torch.ones_like(grad_sum)):
            for g in (grad_hidden, grad_weight):
                if g is not None:
                    g.mul_(grad_sum.to(g.dtype) if g.dtype == torch.float64 else grad_sum.float())
        return (grad_hidden, grad_weight) + (None,) * 13


def fused_linear_masked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    risk: torch.Tensor,
    policy: "LossPolicy | str",
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    unlikelihood_eps: float = 1e-9,
    return_per_token: bool = False,
    tp_group=None,
    impl: str = "auto",
    chunk_size: Optional[int] = None,
    fp32_weight_grad: bool = True,
) -> MaskedCEOutput:
    """Masked CE of ``hidden [..., H] @ weight.T`` (``weight [V, H]`` or its vocab shard) without the logits.

    Same loss, options and output as ``masked_cross_entropy`` on ``hidden @ weight.T``; ``per_token`` (when
    asked for) is detached. ``chunk_size``: tokens per chunk (default: ``default_chunk_size``).
    ``fp32_weight_grad``: accumulate a bf16/fp16 weight's gradient over the chunks in float32.
    """
    policy = LossPolicy.parse(policy)
    _check_options(label_smoothing, z_loss, unlikelihood_eps)
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_masked_cross_entropy: hidden [..., H] and weight [V, H] do not fit: "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise TypeError(
            f"fused_linear_masked_cross_entropy: hidden ({hidden.dtype}, {hidden.device}) and weight "
            f"({weight.dtype}, {weight.device}) must share dtype and device"
        )
    lead_shape = hidden.shape[:-1]
    if labels.shape != lead_shape or risk.shape != lead_shape:
        raise ValueError(
            f"fused_linear_masked_cross_entropy: labels {tuple(labels.shape)} and risk {tuple(risk.shape)} must "
            f"have the leading shape of hidden {tuple(hidden.shape)}"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).contiguous()
    flat_risk = risk.reshape(-1).contiguous()
    check_inputs(flat_hidden, flat_labels, flat_risk)
    flat_labels = flat_labels.long()
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    check_label_range(flat_labels, weight.shape[0] * world, ignore_index)
    backend = backends.pick_backend(impl, hidden.device)
    modes, weights = policy_tables(policy, hidden.device)
    n = flat_hidden.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(n, weight.shape[0], weight.shape[1])
    if chunk_size < 1:
        raise ValueError(f"fused_linear_masked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    group = tp_group if world > 1 else None
    loss_sum, per_token, num_tokens, level_count, level_ce_sum = _FusedLinearMaskedCE.apply(
        flat_hidden, weight, flat_labels, flat_risk, modes, weights, int(ignore_index), float(label_smoothing),
        float(z_loss), float(unlikelihood_eps), backend, group, int(chunk_size), bool(fp32_weight_grad),
        torch.is_grad_enabled(),
    )
    return MaskedCEOutput(
        loss_sum=loss_sum,
        num_tokens=num_tokens,
        per_token=per_token.reshape(lead_shape) if return_per_token else None,
        level_count=level_count,
        level_ce_sum=level_ce_sum,
    )
