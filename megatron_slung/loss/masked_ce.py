"""The public masked cross-entropy: one call for a single device or a vocab-parallel (tensor-parallel) shard.

    out = masked_cross_entropy(logits, labels, risk, "masked")        # or "0:ce,1:ce,2:ignore,3:unlikelihood"
    loss = out.loss_sum / global_num_tokens                           # normalise over the whole global batch
    loss.backward()

The semantics are those of ``reference.masked_cross_entropy_reference`` (see its docstring). The gradient
is computed during the forward (the kernels do it in the same sweep over each row), kept until backward,
and the backward only scales it by the incoming gradient. So the forward costs one logits-sized buffer
(the gradient), or none with ``inplace_grad=True``; when no gradient is wanted (``torch.no_grad()``, as
in evaluation) only the loss is computed.

Vocab-parallel (``tp_group`` with more than one rank): ``logits`` is this rank's shard ``[N, V/tp]`` holding
the columns ``rank * V/tp .. (rank + 1) * V/tp - 1``; labels and risk are the full ``[N]`` and identical on
every rank. With local statistics (row max m_r, s_r = sum_j exp(x_j - m_r) over the shard, q_r the same sum
without the target column (= s_r when the target is elsewhere), the target logit if it lies in the shard,
else 0, and the shard's sum of logits):

    m     = max_r m_r                                    (all-reduce MAX)
    S     = sum_r s_r * exp(m_r - m)                      \
    Q     = sum_r q_r * exp(m_r - m)                       \  one all-reduce SUM
    x_t   = sum_r x_t,r                                    /  of a [4, N] tensor
    sum_x = sum_r sum_x,r                                 /
    lse   = m + log S,   1 - p_t = Q / S (the non-target mass: exact as p_t -> 1)

A NaN on any rank makes sum_x NaN and a +inf makes m +inf, so the row is non-finite on every rank.

Everything after that (loss, per-level stats, the gradient coefficients) is a function of these global
values, computed identically on every rank, so every rank returns the same results. Label smoothing uses
the mean over the *whole* vocabulary, sum_x / V with V = tp * V/tp, and z-loss the global lse: both are exact
at any tp (Megatron's vocab-parallel label smoothing uses per-shard quantities instead, which is not).
Each rank then writes the gradient of its own columns, a * exp(x - lse) + c, and gt at the target if the
target lies in its shard.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_slung.loss import backends
from megatron_slung.loss.policy import LossPolicy
from megatron_slung.loss.reference import MaskedCEOutput, check_inputs, check_label_range

_TABLES: Dict[Tuple[LossPolicy, str], Tuple[torch.Tensor, torch.Tensor]] = {}


def policy_tables(policy: LossPolicy, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """[256] uint8 modes and [256] float32 weights on ``device``, cached (no host->device copy per step)."""
    key = (policy, str(device))
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = (policy.mode_tensor(device), policy.weight_tensor(device))
    return _TABLES[key]


def _scaled_grad(ctx, grad_sum: Optional[torch.Tensor], grad_per_token: Optional[torch.Tensor]):
    """Backward of both functions: the gradient saved by the forward, scaled (in place) by the incoming one.

    d loss_sum / d x = G (the saved gradient) and d per_token_i / d x_i = G_i, so the gradient is
    G * grad_sum + G * grad_per_token[:, None]: one pass, or none when loss_sum.backward() passes exactly 1.
    """
    grad = ctx.saved_grad
    if grad is None:
        raise RuntimeError(
            "masked_cross_entropy: backward ran twice through the same call (retain_graph=True); the saved "
            "gradient is scaled in place and freed after the first backward. Call the loss again instead."
        )
    ctx.saved_grad = None
    acc = backends.acc_dtype(grad.dtype)
    if grad_per_token is None:
        if grad_sum is None:
            return None
        if torch.equal(grad_sum, torch.ones_like(grad_sum)):  # one small sync, saves a pass over [N, V]
            return grad
        return grad.mul_(grad_sum.to(acc))
    row = grad_per_token.reshape(-1).to(acc)[:, None]
    if grad_sum is not None:
        row = row + grad_sum.to(acc)
    return grad.mul_(row)


def loss_and_grad(logits, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss, unlikelihood_eps,
                  backend, group, compute_grad: bool, inplace: bool):
    """Per-token loss, plain ce, kind and (when asked) the gradient of the loss sum w.r.t. ``logits``.

    Single device (``group`` None): the backend's fused forward. Vocab-parallel: local row statistics, the
    two all-reduces of the module docstring, ``backends.finish`` on the global values, then the gradient of
    this rank's columns. ``inplace`` writes the gradient into ``logits``. Shared with fused_linear.
    """
    if group is None:
        return backend.forward(logits, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss,
                               unlikelihood_eps, compute_grad, inplace)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local_vocab = logits.shape[1]
    valid = labels != ignore_index
    local = labels - rank * local_vocab
    in_shard = valid & (local >= 0) & (local < local_vocab)
    target_local = torch.where(in_shard, local, torch.full_like(local, -1))

    m, s, q, xt, sx = backend.row_stats(logits, target_local)
    m_global = m.clone()
    dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
    scale = torch.exp(m - m_global)
    scale = torch.where(m == float("-inf"), torch.zeros_like(scale), scale)  # a shard of -inf adds nothing
    packed = torch.stack([s * scale, q * scale, xt, sx])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    s_global, q_global, xt_global, sx_global = packed.unbind(0)

    level = risk.long()
    per_token, ce, kind, lse, a, gt, c = backends.finish(
        m_global, s_global, q_global, xt_global, sx_global, valid, modes.long()[level],
        weights.to(m.dtype)[level], local_vocab * world, label_smoothing, z_loss, unlikelihood_eps,
    )
    grad = None
    if compute_grad:
        grad = backend.grad(logits, lse, a, gt, c, target_local, logits if inplace else None)
    return per_token, ce, kind, grad


class _MaskedCE(torch.autograd.Function):
    """The forward computes the gradient (see loss_and_grad); the backward scales it."""

    @staticmethod
    def forward(ctx, logits, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss,
                unlikelihood_eps, backend, inplace_grad, group, grad_enabled):
        ctx.set_materialize_grads(False)
        # needs_input_grad says only whether the logits require grad; under no_grad (evaluation) nothing will
        # call backward, so compute the loss alone: no gradient buffer, the logits never overwritten
        compute_grad = grad_enabled and ctx.needs_input_grad[0]
        inplace = bool(inplace_grad and compute_grad)
        per_token, ce, kind, grad = loss_and_grad(
            logits, labels, risk, modes, weights, ignore_index, label_smoothing, z_loss, unlikelihood_eps,
            backend, group, compute_grad, inplace,
        )
        if inplace:
            torch.autograd.graph.increment_version(logits)  # nodes that saved the logits now refuse to run
        loss_sum, num_tokens, level_count, level_ce_sum = backend.level_stats(per_token, ce, kind, risk)
        ctx.saved_grad = grad
        ctx.mark_non_differentiable(num_tokens, level_count, level_ce_sum)
        return loss_sum, per_token, num_tokens, level_count, level_ce_sum

    @staticmethod
    def backward(ctx, grad_sum, grad_per_token, *_):
        return (_scaled_grad(ctx, grad_sum, grad_per_token),) + (None,) * 12


def _check_options(label_smoothing, z_loss, unlikelihood_eps):
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"masked_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"masked_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if not 0.0 < unlikelihood_eps < 1.0:
        raise ValueError(f"masked_cross_entropy: unlikelihood_eps must be in (0, 1), got {unlikelihood_eps}")


def masked_cross_entropy(
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
    tp_group=None,
    impl: str = "auto",
    inplace_grad: bool = False,
) -> MaskedCEOutput:
    """Risk-aware cross-entropy over ``logits [..., V]`` (or the local vocab shard ``[..., V/tp]``).

    ``labels`` (int64/int32) and ``risk`` (uint8) have the leading shape of ``logits``. ``policy`` is a
    LossPolicy or its text (``"masked"``, ``"0:ce,1:ce,2:ignore,3:unlikelihood"``, ``"3:ce@0.1"``...).
    Returns MaskedCEOutput: ``loss_sum`` (differentiable, float32), ``num_tokens`` (tokens that carry loss),
    ``per_token`` (shaped like labels, differentiable; only with ``return_per_token``), ``level_count`` and
    ``level_ce_sum`` ([256] per-risk-level counts and plain-ce sums, masked levels included).

    ``tp_group``: a process group of more than one rank makes ``logits`` this rank's vocab shard (see the
    module docstring); results are identical on every rank. ``impl``: "auto" (CUDA or CPU kernel when built,
    else torch), "kernel" or "torch". ``inplace_grad=True`` lets the forward overwrite the logits buffer with
    the gradient (saves a logits-sized buffer); the logits must not be used afterwards, and autograd raises
    if any other node saved them for its backward. When no gradient is wanted (``torch.no_grad()``, or logits
    that do not require grad) only the loss is computed: no gradient buffer, and the logits are never
    overwritten, whatever ``inplace_grad`` says.
    """
    policy = LossPolicy.parse(policy)
    _check_options(label_smoothing, z_loss, unlikelihood_eps)
    if logits.dim() < 2:
        raise ValueError(f"masked_cross_entropy: logits must be [N, V] or [..., V], got shape {tuple(logits.shape)}")
    lead_shape = logits.shape[:-1]
    if labels.shape != lead_shape or risk.shape != lead_shape:
        raise ValueError(
            f"masked_cross_entropy: labels {tuple(labels.shape)} and risk {tuple(risk.shape)} must have the "
            f"leading shape of logits {tuple(logits.shape)}"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.stride(1) != 1:
        flat_logits = flat_logits.contiguous()
    if inplace_grad and flat_logits.data_ptr() != logits.data_ptr():
        raise ValueError("masked_cross_entropy: inplace_grad=True needs logits with contiguous rows")
    flat_labels = labels.reshape(-1).contiguous()
    flat_risk = risk.reshape(-1).contiguous()
    check_inputs(flat_logits, flat_labels, flat_risk)
    flat_labels = flat_labels.long()

    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    vocab = flat_logits.shape[1] * world
    check_label_range(flat_labels, vocab, ignore_index)
    backend = backends.pick_backend(impl, flat_logits.device)
    modes, weights = policy_tables(policy, flat_logits.device)
    common = (modes, weights, int(ignore_index), float(label_smoothing), float(z_loss), float(unlikelihood_eps),
              backend, bool(inplace_grad))
    group = tp_group if world > 1 else None
    loss_sum, per_token, num_tokens, level_count, level_ce_sum = _MaskedCE.apply(
        flat_logits, flat_labels, flat_risk, *common, group, torch.is_grad_enabled()
    )
    return MaskedCEOutput(
        loss_sum=loss_sum,
        num_tokens=num_tokens,
        per_token=per_token.reshape(lead_shape) if return_per_token else None,
        level_count=level_count,
        level_ce_sum=level_ce_sum,
    )
