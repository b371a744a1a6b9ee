"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

Rank layout (Megatron's, and DeepSpeed's ``PipeModelDataParallelTopology``): TP is the innermost
axis, then DP, then PP, so

    rank = (pp_rank * dp_size + dp_rank) * tp_size + tp_rank

TP ranks are neighbours (one node, fast links for the per-layer all-reduces), PP stages are the
farthest apart (only point-to-point activations cross the slow links). Example, 8 ranks with tp=2,
pp=2 (so dp=2):

    tp groups   [0,1] [2,3] [4,5] [6,7]
    dp groups   [0,2] [1,3] [4,6] [5,7]
    pp groups   [0,4] [1,5] [2,6] [3,7]

``ParallelDims`` describes a layout and checks it (no process groups needed, so arguments can be
validated before anything starts). ``initialize_model_parallel`` creates the groups over an already
initialised ``torch.distributed`` world. This module doubles as DeepSpeed's ``mpu``:
``deepspeed.initialize(..., mpu=megatron_slung.parallel.state)`` makes DeepSpeed reduce gradients
over our DP group and count tensor-parallel parameters right in the gradient norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist


# --------------------------------------------------------------------------- layout (no groups)
@dataclass(frozen=True)
class ParallelDims:
    """The sizes of the three parallel axes; ``world_size = tp * pp * dp``."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims: {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_world_size(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """The layout for ``world_size`` ranks with the given TP and PP sizes (DP takes the rest)."""
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor-model-parallel-size ({tp}) and pipeline-model-parallel-size ({pp}) must be >= 1")
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor-model-parallel-size ({tp}) x "
                f"pipeline-model-parallel-size ({pp}) = {tp * pp}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    # ---- rank <-> coordinates
    def rank(self, *, tp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def coords(self, rank: int) -> dict:
        """``{"pp": .., "dp": .., "tp": ..}`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return {"pp": rank // (self.tp * self.dp), "dp": (rank // self.tp) % self.dp, "tp": rank % self.tp}

    # ---- groups, as lists of global ranks (every group of the axis, in order)
    def tp_groups(self) -> List[List[int]]:
        return [[self.rank(tp=t, dp=d, pp=p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> List[List[int]]:
        return [[self.rank(tp=t, dp=d, pp=p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> List[List[int]]:
        return [[self.rank(tp=t, dp=d, pp=p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def model_parallel_groups(self) -> List[List[int]]:
        """TP x PP: all ranks that together hold one copy of the model (one per DP index)."""
        return [sorted(self.rank(tp=t, dp=d, pp=p) for p in range(self.pp) for t in range(self.tp)) for d in range(self.dp)]

    # ---- checks
    def check_batch(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Gradient-accumulation steps for the batch sizes, or a clear error when they do not divide."""
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1 (global {global_batch_size}, micro {micro_batch_size})")
        per_step = micro_batch_size * self.dp
        if global_batch_size % per_step != 0:
            raise ValueError(
                f"global-batch-size ({global_batch_size}) is not divisible by micro-batch-size ({micro_batch_size}) x "
                f"data-parallel size ({self.dp}) = {per_step}"
            )
        return global_batch_size // per_step

    def deepspeed_topology(self):
        """DeepSpeed's ``PipeModelDataParallelTopology`` with the same rank layout (axes pipe, data, model)."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)

    def __str__(self) -> str:
        return f"world {self.world_size} = tp {self.tp} x dp {self.dp} x pp {self.pp}"


# --------------------------------------------------------------------------- process groups
@dataclass
class _Groups:
    dims: ParallelDims
    rank: int
    tp: object
    dp: object
    pp: object
    mp: object  # TP x PP
    tp_ranks: List[int]
    dp_ranks: List[int]
    pp_ranks: List[int]
    mp_ranks: List[int]


_GROUPS: Optional[_Groups] = None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    backend: Optional[str] = None,
    timeout=None,
) -> ParallelDims:
    """Create the TP, DP, PP and model-parallel groups over the initialised default process group.

    ``backend`` is the backend of the new groups (default: the world's); ``timeout`` (a ``timedelta``) their
    collective timeout (default torch's; the trainer passes ``--distributed-timeout-minutes``, as Megatron does).
    Every rank must call this, with the same arguments (``new_group`` is collective). Returns the layout.
    """
    global _GROUPS
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (torchrun sets the environment for it)"
        )
    if _GROUPS is not None:
        raise RuntimeError("initialize_model_parallel: already initialised; call destroy_model_parallel first")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims.from_world_size(world_size, tensor_model_parallel_size, pipeline_model_parallel_size)

    def build(all_groups):
        mine, mine_ranks = None, None
        for ranks in all_groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks=ranks, backend=backend, timeout=timeout)
            if rank in ranks:
                mine, mine_ranks = group, ranks
        return mine, mine_ranks

    tp, tp_ranks = build(dims.tp_groups())
    dp, dp_ranks = build(dims.dp_groups())
    pp, pp_ranks = build(dims.pp_groups())
    mp, mp_ranks = build(dims.model_parallel_groups())
    _GROUPS = _Groups(dims, rank, tp, dp, pp, mp, tp_ranks, dp_ranks, pp_ranks, mp_ranks)
    return dims


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def destroy_model_parallel() -> None:
    """Forget the groups (the default process group stays). Safe to call when not initialised."""
    global _GROUPS
    if _GROUPS is not None and dist.is_initialized():
        for group in {id(g): g for g in (_GROUPS.tp, _GROUPS.dp, _GROUPS.pp, _GROUPS.mp)}.values():
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):  # already gone with the default group
                pass
    _GROUPS = None


def _groups() -> _Groups:
    if _GROUPS is None:
        raise RuntimeError("model parallel groups are not initialised; call initialize_model_parallel first")
    return _GROUPS


def get_parallel_dims() -> ParallelDims:
    """The layout; ``ParallelDims()`` (all 1) when the groups were never initialised."""
    return _GROUPS.dims if _GROUPS is not None else ParallelDims()


# ---- tensor parallel
def get_tensor_model_parallel_group():
    return _groups().tp


def get_tensor_model_parallel_world_size() -> int:
    return _GROUPS.dims.tp if _GROUPS is not None else 1


def get_tensor_model_parallel_rank() -> int:
    return _GROUPS.dims.coords(_GROUPS.rank)["tp"] if _GROUPS is not None else 0


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in my TP group (broadcast data from it to the others)."""
    return _groups().tp_ranks[0]


def get_tensor_model_parallel_ranks() -> List[int]:
    return list(_groups().tp_ranks)


# ---- pipeline parallel
def get_pipeline_model_parallel_group():
    return _groups().pp


def get_pipeline_model_parallel_world_size() -> int:
    return _GROUPS.dims.pp if _GROUPS is not None else 1


def get_pipeline_model_parallel_rank() -> int:
    return _GROUPS.dims.coords(_GROUPS.rank)["pp"] if _GROUPS is not None else 0


def get_pipeline_model_parallel_ranks() -> List[int]:
    return list(_groups().pp_ranks)


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


# ---- data parallel
def get_data_parallel_group():
    return _groups().dp


def get_data_parallel_world_size() -> int:
    if _GROUPS is not None:
        return _GROUPS.dims.dp
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_data_parallel_rank() -> int:
    if _GROUPS is not None:
        return _GROUPS.dims.coords(_GROUPS.rank)["dp"]
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_data_parallel_group_ranks() -> List[int]:
    return list(_groups().dp_ranks)


# ---- model parallel (TP x PP), as DeepSpeed's mpu means it
def get_model_parallel_group():
    return _groups().mp


def get_model_parallel_world_size() -> int:
    return _GROUPS.dims.tp * _GROUPS.dims.pp if _GROUPS is not None else 1


def get_model_parallel_rank() -> int:
    if _GROUPS is None:
        return 0
    return _GROUPS.mp_ranks.index(_GROUPS.rank)


# DeepSpeed spells the pipeline getters both ways.
get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
get_pipe_parallel_rank = get_pipeline_model_parallel_rank
get_pipe_parallel_group = get_pipeline_model_parallel_group


# --------------------------------------------------------------------------- DeepSpeed
def init_deepspeed_comm(skip_shm_op: bool = True) -> None:
    """Start DeepSpeed's comm layer on the already-initialised ``torch.distributed`` world.

    DeepSpeed's ``PipelineModule`` and engine talk through ``deepspeed.comm``; with the default process
    group already up (torchrun / SLURM / the test harness), ``deepspeed.init_distributed`` just adopts
    it (any backend, gloo included). On the CPU its comm layer would first JIT-compile a shared-memory
    op (``deepspeed_shm_comm``, 40 s to 3 min on a small machine, cached in ~/.cache/torch_extensions)
    that only ``inference_all_reduce`` uses; training never does, so by default the op is marked
    unavailable first and nothing is compiled.
    """
    import deepspeed

    if not dist.is_initialized():
        raise RuntimeError("init_deepspeed_comm: initialise torch.distributed first")
    if skip_shm_op:
        try:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except (AttributeError, TypeError):  # a DeepSpeed without the op or the table: nothing to skip
            pass
    deepspeed.init_distributed(dist_backend=dist.get_backend())
