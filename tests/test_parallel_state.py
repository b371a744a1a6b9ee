"""Parallel layout: rank ordering (TP innermost, then DP, then PP), checks, real groups, DeepSpeed agreement."""

import pytest
import torch
import torch.distributed as dist

from megatron_slung.parallel import state
from megatron_slung.parallel.state import ParallelDims
from tests.distributed import run_distributed


def test_rank_layout_matches_megatron_ordering_for_8_ranks():
    dims = ParallelDims.from_world_size(8, tp=2, pp=2)
    assert (dims.tp, dims.dp, dims.pp) == (2, 2, 2)
    assert dims.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert dims.coords(6) == {"pp": 1, "dp": 1, "tp": 0}


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (4, 1, 1), (4, 4, 1), (4, 1, 4), (8, 2, 2), (12, 2, 3), (16, 4, 2)])
def test_every_rank_is_in_exactly_one_group_per_axis_and_coords_round_trip(world, tp, pp):
    dims = ParallelDims.from_world_size(world, tp=tp, pp=pp)
    assert dims.world_size == world
    for groups, size in ((dims.tp_groups(), tp), (dims.dp_groups(), dims.dp), (dims.pp_groups(), pp)):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)) and all(len(g) == size for g in groups)
    for rank in range(world):
        c = dims.coords(rank)
        assert dims.rank(**c) == rank
        # TP neighbours are adjacent ranks; PP stages are world/pp apart
        assert rank in dims.tp_groups()[rank // tp]
    assert all(g[1] - g[0] == world // pp for g in dims.pp_groups() if pp > 1)


def test_layout_errors_are_clear():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by .*\(4\) x .*\(1\)"):
        ParallelDims.from_world_size(6, tp=4)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        ParallelDims(tp=0)
    with pytest.raises(ValueError, match=r"global-batch-size \(10\) is not divisible by micro-batch-size \(2\) x data-parallel size \(4\)"):
        ParallelDims(dp=4).check_batch(10, 2)
    assert ParallelDims(dp=4).check_batch(16, 2) == 2


def test_getters_without_groups_describe_a_single_process():
    assert not state.model_parallel_is_initialized()
    assert state.get_tensor_model_parallel_world_size() == 1
    assert state.get_tensor_model_parallel_rank() == 0
    assert state.get_pipeline_model_parallel_world_size() == 1
    assert state.is_pipeline_first_stage() and state.is_pipeline_last_stage()
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        state.get_tensor_model_parallel_group()
    with pytest.raises(RuntimeError, match="not initialised"):
        state.initialize_model_parallel(1, 1)


def _groups_body(rank, world_size):
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    state.init_deepspeed_comm()
    out = {}
    for tp, pp in ((2, 2), (2, 1), (1, 2), (4, 1), (1, 1)):
        dims = state.initialize_model_parallel(tp, pp)
        # the groups really connect the ranks they list
        gathered = {}
        for axis, group in (("tp", state.get_tensor_model_parallel_group()), ("dp", state.get_data_parallel_group()),
                            ("pp", state.get_pipeline_model_parallel_group()), ("mp", state.get_model_parallel_group())):
            parts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, torch.tensor([rank]), group=group)
            gathered[axis] = [int(p) for p in parts]
        mine = dict(
            tp=(state.get_tensor_model_parallel_rank(), state.get_tensor_model_parallel_world_size(),
                state.get_tensor_model_parallel_ranks(), state.get_tensor_model_parallel_src_rank()),
            dp=(state.get_data_parallel_rank(), state.get_data_parallel_world_size(), state.get_data_parallel_group_ranks()),
            pp=(state.get_pipeline_model_parallel_rank(), state.get_pipeline_model_parallel_world_size(),
                state.get_pipeline_model_parallel_ranks()),
            mp=(state.get_model_parallel_rank(), state.get_model_parallel_world_size()),
        )
        # DeepSpeed's grid over our topology: the same groups, the same ranks
        grid = PipelineParallelGrid(topology=dims.deepspeed_topology())
        ds = dict(
            tp=(grid.get_slice_parallel_rank(), grid.get_slice_parallel_world_size(), list(grid.slice_group)),
            dp=(grid.get_data_parallel_rank(), grid.get_data_parallel_world_size(), list(grid.dp_group)),
            pp=(grid.get_stage_id(), grid.get_pipe_parallel_world_size(), list(grid.pp_group)),
            mp=(grid.get_model_parallel_rank(), grid.get_model_parallel_world_size()),
        )
        out[(tp, pp)] = (gathered, mine, ds, str(dims))
        state.destroy_model_parallel()
    return out


@pytest.mark.distributed
def test_real_groups_on_4_ranks_agree_with_the_layout_and_with_deepspeeds_grid():
    results = run_distributed(_groups_body, 4)
    for (tp, pp) in ((2, 2), (2, 1), (1, 2), (4, 1), (1, 1)):
        dims = ParallelDims.from_world_size(4, tp=tp, pp=pp)
        for rank, res in enumerate(results):
            gathered, mine, ds, _ = res[(tp, pp)]
            c = dims.coords(rank)
            tp_group = next(g for g in dims.tp_groups() if rank in g)
            dp_group = next(g for g in dims.dp_groups() if rank in g)
            pp_group = next(g for g in dims.pp_groups() if rank in g)
            mp_group = next(g for g in dims.model_parallel_groups() if rank in g)
            assert gathered == {"tp": tp_group, "dp": dp_group, "pp": pp_group, "mp": mp_group}
            assert mine["tp"] == (c["tp"], tp, tp_group, tp_group[0])
            assert mine["dp"] == (c["dp"], dims.dp, dp_group)
            assert mine["pp"] == (c["pp"], pp, pp_group)
            assert mine["mp"] == (mp_group.index(rank), tp * pp)
            assert ds == {"tp": mine["tp"][:3], "dp": mine["dp"], "pp": mine["pp"], "mp": mine["mp"]}, (tp, pp, rank)
