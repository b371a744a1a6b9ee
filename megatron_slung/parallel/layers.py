"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

    ColumnParallelLinear   Y = X A^T, A split by rows (output features): each rank computes Y's columns
    RowParallelLinear      Y = X A^T, A split by columns (input features): partial sums, all-reduced
    VocabParallelEmbedding each rank holds a contiguous block of the vocabulary

The usual pairing (attention, MLP) is column -> elementwise -> row: one all-reduce forward and one
backward per pair. With ``sequence_parallel`` the activations outside the pair are split along the
sequence (dim 0): the column layer all-gathers its input and the row layer reduce-scatters its output
instead, same bytes, but norms and dropout then work on 1/tp of the tokens.

Initialisation goes through a **master weight**: the full-size matrix is made on the CPU in float32
by ``init_method`` and each rank copies out its shard. So a model is the same for every TP size, given
the same ``init_method`` (the GPT model uses per-parameter seeded generators: the weights depend on
the seed only, not on the layout or on the order modules are built in).

A fused weight (QKV, gate+up) is several logical matrices stacked along the output dimension
(``output_parts``); each part is split across ranks separately, so a rank's shard is
``[part0_shard; part1_shard; ...]``. ``split_for_tensor_parallel`` / ``merge_tensor_parallel_shards``
convert between a full weight and the shards (for checkpoint converters).

Biases (``bias=True``, zero-initialised as Megatron does): a column-parallel bias is split like the
output features (each rank adds its own slice, parts split separately like the weight); a row-parallel
bias is replicated and added once, after the all-reduce (or reduce-scatter) of the partial sums. With
sequence parallelism each rank adds it to its own tokens only, so its gradient is partial and summed
over the TP group (``copy_to`` on the bias, as for the norms).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_slung.parallel import state
from megatron_slung.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

InitMethod = Callable[[torch.Tensor], None]


# --------------------------------------------------------------------------- shard <-> full
def _check_parts(size: int, parts: Optional[Sequence[int]], tp_size: int, what: str) -> List[int]:
    parts = [size] if parts is None else list(parts)
    if sum(parts) != size:
        raise ValueError(f"{what}: output_parts {parts} do not add up to {size}")
    for p in parts:
        if p % tp_size != 0:
            raise ValueError(
                f"{what}: size {p} is not divisible by the tensor-model-parallel size {tp_size}"
            )
    return parts


def split_for_tensor_parallel(
    full: torch.Tensor, tp_size: int, tp_rank: int, partition_dim: int, parts: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of ``full`` (each of ``parts`` along ``partition_dim`` split evenly)."""
    parts = _check_parts(full.shape[partition_dim], parts, tp_size, "split_for_tensor_parallel")
    shards = [p.chunk(tp_size, dim=partition_dim)[tp_rank] for p in full.split(parts, dim=partition_dim)]
    return torch.cat(shards, dim=partition_dim)


def merge_tensor_parallel_shards(
    shards: Sequence[torch.Tensor], partition_dim: int, parts: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """Inverse of ``split_for_tensor_parallel``: the full tensor from all ranks' shards (rank order).

    ``parts`` are the sizes of the logical parts in the *full* tensor (e.g. [q, k, v] rows)."""
    tp_size = len(shards)
    full_size = sum(s.shape[partition_dim] for s in shards)
    parts = _check_parts(full_size, parts, tp_size, "merge_tensor_parallel_shards")
    local_parts = [p // tp_size for p in parts]
    per_rank = [s.split(local_parts, dim=partition_dim) for s in shards]
    return torch.cat([per_rank[r][i] for i in range(len(parts)) for r in range(tp_size)], dim=partition_dim)


# --------------------------------------------------------------------------- init
def _init_from_master(
    weight: nn.Parameter, full_shape, partition_dim: int, init_method: InitMethod, parts: Optional[Sequence[int]]
) -> None:
    master = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    init_method(master)
    shard = split_for_tensor_parallel(
        master, state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank(), partition_dim, parts
    )
    with torch.no_grad():
        weight.copy_(shard.to(dtype=weight.dtype, device=weight.device))


def _mark_tensor_parallel(weight: nn.Parameter, partition_dim: int, parts: Optional[Sequence[int]]) -> None:
    # Megatron's attribute names: DeepSpeed's gradient-norm code reads `tensor_model_parallel`.
    weight.tensor_model_parallel = True
    weight.partition_dim = partition_dim
    weight.partition_stride = 1
    weight.partition_parts = tuple(parts) if parts is not None else None


def mark_replicated(param: nn.Parameter, sequence_parallel: bool) -> None:
    """Attributes of a parameter replicated over the TP group (norm weights, row-parallel biases, learned
    positions). DeepSpeed counts a parameter in the gradient norm where ``model_parallel`` (or
    ``tensor_model_parallel``) is set, or on model-parallel rank 0: a replicated one must count once per
    pipeline stage, so on TP rank 0 only (DeepSpeed's fp32 clipping would otherwise drop it on every stage
    but the first). ``sequence_parallel`` is Megatron's mark of a gradient summed over the TP group."""
    param.sequence_parallel = sequence_parallel
    param.model_parallel = state.get_tensor_model_parallel_rank() == 0


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-model-parallel size ({denominator})")
    return numerator // denominator


# --------------------------------------------------------------------------- input / output mappings
def tensor_parallel_input(x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Prepare a replicated (or sequence-sharded) activation as the input of a column-parallel matmul."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
    return copy_to_tensor_model_parallel_region(x)


# --------------------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W [output_size, input_size] split along the output dimension.

    Input: replicated [..., input_size] ([s/tp, b, input_size] with ``sequence_parallel``).
    Output: [..., output_size / tp] (or the full [..., output_size] with ``gather_output``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        init_method: InitMethod,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        output_parts: Optional[Sequence[int]] = None,
        bias: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        tp = state.get_tensor_model_parallel_world_size()
        if gather_output and sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output and sequence_parallel cannot be combined")
        _check_parts(output_size, output_parts, tp, "ColumnParallelLinear")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _divide(output_size, tp, "ColumnParallelLinear output size")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.output_parts = tuple(output_parts) if output_parts is not None else None
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, dtype=params_dtype, device=device))
        _init_from_master(self.weight, (output_size, input_size), 0, init_method, output_parts)
        _mark_tensor_parallel(self.weight, 0, output_parts)
        self.bias = None
        if bias:  # this rank's slice of each part, like the weight's rows
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=params_dtype, device=device))
            _mark_tensor_parallel(self.bias, 0, output_parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(tensor_parallel_input(x, self.sequence_parallel), self.weight, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tensor_model_parallel_region(y)  # [rank0 shard, rank1 shard, ...]
        tp = state.get_tensor_model_parallel_world_size()
        if self.output_parts is not None and tp > 1:  # back to [part0, part1, ...]
            y = merge_tensor_parallel_shards(list(y.chunk(tp, dim=-1)), -1, self.output_parts)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (per rank {self.output_size_per_partition}), "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with W [output_size, input_size] split along the input dimension.

    Input: [..., input_size / tp] (already split, the usual case after a column-parallel layer; or
    replicated with ``input_is_parallel=False``, then split here).
    Output: replicated [..., output_size] ([s/tp, b, output_size] with ``sequence_parallel``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        init_method: InitMethod,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        bias: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        tp = state.get_tensor_model_parallel_world_size()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _divide(input_size, tp, "RowParallelLinear input size")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, dtype=params_dtype, device=device))
        _init_from_master(self.weight, (output_size, input_size), 1, init_method, None)
        _mark_tensor_parallel(self.weight, 1, None)
        self.bias = None
        if bias:  # replicated, added once after the reduction
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype, device=device))
            mark_replicated(self.bias, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial)
        else:
            y = reduce_from_tensor_model_parallel_region(partial)
        if self.bias is None:
            return y
        # With sequence parallelism each rank adds the bias to its own tokens: sum its gradient over TP.
        bias = copy_to_tensor_model_parallel_region(self.bias) if self.sequence_parallel else self.bias
        return y + bias

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (per rank {self.input_size_per_partition}), out={self.output_size}, "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split into contiguous blocks, one per TP rank.

    Each rank looks up the ids in its block (others give zeros) and the results are summed over the
    TP group. Output is replicated, or with ``sequence_parallel`` reduce-scattered along dim 0 (so the
    input must then be [sequence, batch]).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: InitMethod,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        tp = state.get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = _divide(num_embeddings, tp, "vocabulary size (pad it to a multiple)")
        self.vocab_start_index = state.get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype, device=device)
        )
        _init_from_master(self.weight, (num_embeddings, embedding_dim), 0, init_method, None)
        _mark_tensor_parallel(self.weight, 0, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tp = state.get_tensor_model_parallel_world_size()
        if tp == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
            local = (ids - self.vocab_start_index).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out)
        return reduce_from_tensor_model_parallel_region(out)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start_index}, {self.vocab_end_index}), "
            f"sp={self.sequence_parallel}"
        )
