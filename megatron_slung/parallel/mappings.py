"""Autograd-aware collectives for tensor and sequence parallelism (Megatron's "mappings").

Each function is a pair (forward op, backward op) on the tensor-parallel group; the backward of
each is the adjoint of its forward, which is what makes the parallel model's gradients equal to the
single-process model's:

    copy_to_tensor_model_parallel_region        identity          | all-reduce
    reduce_from_tensor_model_parallel_region    all-reduce        | identity
    scatter_to_tensor_model_parallel_region     split last dim    | all-gather last dim
    gather_from_tensor_model_parallel_region    all-gather last   | split last dim
    scatter_to_sequence_parallel_region         split dim 0       | all-gather dim 0
    gather_from_sequence_parallel_region        all-gather dim 0  | reduce-scatter dim 0 (or split)
    reduce_scatter_to_sequence_parallel_region  reduce-scatter 0  | all-gather dim 0

The sequence dimension is dim 0: activations are [sequence, batch, hidden], as in Megatron, so a
sequence shard is one contiguous block. With one TP rank (or no groups) every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_slung.parallel import state


# torch >= 2.10 renamed the flat collectives; keep working on older torch too.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _tp_group():
    return state.get_tensor_model_parallel_group()


def _tp_size() -> int:
    return state.get_tensor_model_parallel_world_size()


# --------------------------------------------------------------------------- plain collectives
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=_tp_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    size = _tp_size()
    if size == 1:
        return x
    if x.shape[-1] % size != 0:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {size}")
    return x.chunk(size, dim=-1)[state.get_tensor_model_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    size = _tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=_tp_group())
    return torch.cat(parts, dim=-1)


def _split_first_dim(x: torch.Tensor) -> torch.Tensor:
    size = _tp_size()
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(
            f"sequence length {x.shape[0]} is not divisible by the tensor-parallel size {size} "
            "(sequence parallelism splits the sequence across TP ranks)"
        )
    return x.chunk(size, dim=0)[state.get_tensor_model_parallel_rank()].contiguous()


def _gather_first_dim(x: torch.Tensor) -> torch.Tensor:
    size = _tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((x.shape[0] * size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x, group=_tp_group())
    return out


def _reduce_scatter_first_dim(x: torch.Tensor) -> torch.Tensor:
    size = _tp_size()
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tensor-parallel size {size}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_flat(out, x, group=_tp_group())
    return out


# --------------------------------------------------------------------------- autograd pairs
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first_dim(grad)


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        # When what follows is tensor-parallel (e.g. a column-parallel linear), each rank holds a
        # partial gradient of the gathered tensor: sum them and keep my shard (reduce-scatter).
        # When what follows is replicated, every rank already has the full gradient: just split.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first_dim(grad), None
        return _split_first_dim(grad), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first_dim(grad)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (sum) the gradient over the TP group."""
    return _CopyToTP.apply(x) if _tp_size() > 1 else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: all-reduce (sum) over the TP group. Backward: identity."""
    return _ReduceFromTP.apply(x) if _tp_size() > 1 else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: keep my chunk of the last dimension. Backward: all-gather it."""
    return _ScatterToTP.apply(x) if _tp_size() > 1 else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: all-gather the last dimension (rank order). Backward: keep my chunk."""
    return _GatherFromTP.apply(x) if _tp_size() > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: keep my chunk of dim 0 (the sequence). Backward: all-gather dim 0."""
    return _ScatterToSP.apply(x) if _tp_size() > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """Forward: all-gather dim 0. Backward: reduce-scatter dim 0 (or just split, when the consumer
    of the gathered tensor is replicated across TP ranks: ``tensor_parallel_output_grad=False``)."""
    return _GatherFromSP.apply(x, tensor_parallel_output_grad) if _tp_size() > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: sum over TP ranks and keep my chunk of dim 0. Backward: all-gather dim 0."""
    return _ReduceScatterToSP.apply(x) if _tp_size() > 1 else x
