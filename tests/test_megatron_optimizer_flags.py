"""Megatron's distributed-optimizer, overlap and implementation switches: what each maps to on DeepSpeed, the
combinations refused, and (real gloo processes) that DeepSpeed's engine really runs with them."""

import json

import pytest

from megatron_slung.training.arguments import ArgumentError, parse_args
from tests.distributed import run_distributed
from tests.pretrain_helpers import TINY, pretrain_body, train_records

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
        "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "64"]


def _args(*extra, world_size=2):
    return parse_args(BASE + list(extra), world_size=world_size)


def test_distributed_optimizer_is_zero_1_and_overlap_maps_to_overlap_comm(tmp_path):
    args = _args("--use-distributed-optimizer")
    assert args.zero_stage == 1 and args.deepspeed_config_dict["zero_optimization"] == {"stage": 1}
    args = _args("--use-distributed-optimizer", "--overlap-grad-reduce")
    assert args.deepspeed_config_dict["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    args = _args("--zero-stage", "2", "--bf16", "--overlap-grad-reduce")
    assert args.deepspeed_config_dict["zero_optimization"]["overlap_comm"] is True
    # ZeRO 3 prefetches parameters during the forward: what --overlap-param-gather asks for
    args = _args("--zero-stage", "3", "--overlap-grad-reduce", "--overlap-param-gather")
    assert args.deepspeed_config_dict["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}))
    args = _args("--use-distributed-optimizer", "--overlap-grad-reduce", "--deepspeed-config", str(user))
    assert args.deepspeed_config_dict["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000,
                                                               "overlap_comm": True}


def test_combinations_that_cannot_hold_are_refused(tmp_path):
    stage2 = tmp_path / "stage2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    no_overlap = tmp_path / "no_overlap.json"
    no_overlap.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": False}}))
    cases = [
        (["--use-distributed-optimizer", "--zero-stage", "2"], "contradicts --zero-stage 2"),
        (["--use-distributed-optimizer", "--deepspeed-config", str(stage2)], "zero_optimization.stage = 2"),
        (["--overlap-grad-reduce"], "ZeRO stage >= 1"),
        (["--use-distributed-optimizer", "--overlap-grad-reduce", "--bf16"], "bf16 ZeRO-1"),
        (["--use-distributed-optimizer", "--overlap-grad-reduce", "--deepspeed-config", str(no_overlap)],
         "overlap_comm = false"),
        (["--use-distributed-optimizer", "--overlap-param-gather"], "needs --overlap-grad-reduce"),
        (["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"], "ZeRO 1"),
        (["--cross-entropy-loss-fusion", "--loss-impl", "torch"], "contradicts --loss-impl torch"),
        (["--transformer-impl", "transformer_engine"], "no Transformer Engine layers"),
    ]
    for extra, message in cases:
        with pytest.raises(ArgumentError, match=message):
            _args(*extra)
    with pytest.raises(ArgumentError, match="pipeline"):
        parse_args(BASE + ["--use-distributed-optimizer", "--overlap-grad-reduce",
                           "--pipeline-model-parallel-size", "2"], world_size=4)


def test_implementation_switches():
    args = _args("--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--use-mcore-models",
                 "--transformer-impl", "local")
    assert args.loss_impl == "kernel"  # the compiled fused kernel, not the torch reference
    assert _args().transformer_impl == "local" and _args().loss_impl == "auto"


def _engine_settings(rank, world_size, argv):
    from megatron_slung.parallel import state
    from megatron_slung.training.distributed import initialize_distributed
    from megatron_slung.training.pretrain import setup

    args = parse_args(list(argv))
    device = initialize_distributed(args.distributed_backend, args.distributed_timeout_minutes)
    trainer = setup(args, device)
    import torch

    optimizer = trainer.engine.optimizer
    timeout = state.get_tensor_model_parallel_group()._get_backend(torch.device("cpu")).options._timeout
    out = dict(optimizer=type(optimizer).__name__, overlap=getattr(optimizer, "overlap_comm", None),
               partitioned=getattr(optimizer, "partition_count", None), timeout_minutes=timeout.total_seconds() / 60)
    state.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_deepspeed_runs_zero_1_with_overlapped_reduction_and_the_same_losses():
    flags = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--distributed-timeout-minutes", "7"]
    settings = run_distributed(_engine_settings, 2, args=(TINY + ["--train-iters", "2"] + flags,))
    for s in settings:
        # DeepSpeed's ZeRO-1/2 optimizer, optimizer state split over the 2 ranks, reduction hooked into backward
        assert s["optimizer"] == "DeepSpeedZeroOptimizer" and s["overlap"] is True and set(s["partitioned"]) == {2}
        assert s["timeout_minutes"] == 7  # the model-parallel groups honour --distributed-timeout-minutes too
    runs = {}
    for name, extra in (("plain", []), ("zero1_overlap", flags)):
        records = run_distributed(pretrain_body, 2, args=(TINY + ["--train-iters", "2"] + extra,))[-1]
        runs[name] = [r["loss"] for r in train_records(records)]
    assert runs["zero1_overlap"] == pytest.approx(runs["plain"], rel=1e-5)


def _group_timeouts(rank, world_size):
    import datetime

    import torch

    from megatron_slung.parallel import state

    state.initialize_model_parallel(tensor_model_parallel_size=2, timeout=datetime.timedelta(minutes=7))
    groups = (state.get_tensor_model_parallel_group(), state.get_data_parallel_group())
    out = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60 for g in groups]
    state.destroy_model_parallel()
    return out


def test_model_parallel_groups_take_the_timeout():
    # torch's new_group does not inherit the default group's timeout (it falls back to 30 minutes)
    assert run_distributed(_group_timeouts, 2) == [[7, 7], [7, 7]]
