import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("planted failure")
    return rank


@pytest.mark.distributed
def test_all_reduce_across_real_processes():
    assert run_distributed(_all_reduce_rank, world_size=2) == [3.0, 3.0]


@pytest.mark.distributed
def test_a_failing_rank_fails_the_run_with_its_traceback():
    with pytest.raises(RuntimeError, match="planted failure"):
        run_distributed(_fail_on_rank_one, world_size=2, timeout=60)
