"""Megatron's monitoring flags (training/monitoring.py): each writes what it says. One real job with all of them
on (TensorBoard events, the W&B offline run file, the profiler trace, the log line, the garbage collector's
calls), the parameter norm against the model's own weights in each layout, and the FLOPs formula against
numbers computed with Megatron-LM's own ``num_floating_point_operations``."""

import glob
import json
import math
import os

import pytest
import torch

from megatron_slung.model.gpt import GPTConfig
from megatron_slung.training import monitoring
from megatron_slung.training.monitoring import ManualGC, Timers, megatron_flops_per_iteration
from tests.distributed import run_distributed
from tests.pretrain_helpers import TINY, read_jsonl, train_records


# --------------------------------------------------------------------------- the FLOPs of --log-throughput
# Computed with Megatron-LM's megatron/training/training.py:num_floating_point_operations (commit d98e8a6,
# 2026-08-22) on its own parsed arguments for these flags (padded vocabulary as given, global batch as given).
MEGATRON_FLOPS = [
    # GPT-3 175B (examples/gpt3): MHA, GeLU 4h, tied embeddings, vocab 50304, batch 1536 x 2048
    (dict(num_layers=96, hidden_size=12288, num_attention_heads=96, vocab_size=50304, swiglu=False), 1536, 2048,
     3.340389992462549e18),
    # Llama-3 8B (examples/llama): GQA 8 groups, kv-channels 128, SwiGLU 14336, untied, vocab 128256
    (dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
          kv_channels=128, vocab_size=128256, swiglu=True, untie_embeddings_and_output_weights=True), 128, 8192,
     5.397062776101274e16),
    # kv-channels that are not hidden / heads, GQA, SwiGLU
    (dict(num_layers=2, hidden_size=96, ffn_hidden_size=200, num_attention_heads=4, num_query_groups=2,
          kv_channels=16, vocab_size=384, swiglu=True), 3, 48, 168542208.0),
]


@pytest.mark.parametrize("fields,batch,seq,expected", MEGATRON_FLOPS)
def test_log_throughput_counts_flops_as_megatron_does(fields, batch, seq, expected):
    assert megatron_flops_per_iteration(GPTConfig(**fields), batch, seq) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- units
def test_timers_subtract_an_inner_timer_and_reduce_per_iteration():
    clock = iter([0.0, 1.0, 3.0, 10.0])  # outer start, inner start, inner stop, outer stop
    timers = Timers(enabled=True)
    timers._now = lambda: next(clock)
    with timers.time("forward-backward", excluding="optimizer"):
        timers.start("optimizer")
        timers.stop("optimizer")
    assert timers.elapsed == {"forward-backward": 8.0, "optimizer": 2.0}
    assert timers.reduce_max(["forward-backward", "optimizer", "batch-generator"], iterations=2) == {
        "forward-backward": 4.0, "optimizer": 1.0, "batch-generator": 0.0}
    assert timers.elapsed == {}
    off = Timers(enabled=False)
    with off.time("x"):
        pass
    assert off.elapsed == {}


class _FakeGC:
    """Records the calls monitoring makes to the gc module (torch and DeepSpeed make their own)."""

    def __init__(self):
        self.calls = []
        self.enabled = True

    def isenabled(self):
        return self.enabled

    def disable(self):
        self.enabled = False
        self.calls.append("disable")

    def enable(self):
        self.enabled = True
        self.calls.append("enable")

    def collect(self, generation=2):
        self.calls.append(f"collect{generation}")


def test_manual_gc_disables_the_collector_and_collects_at_the_interval_and_around_evaluations(monkeypatch):
    fake = _FakeGC()
    monkeypatch.setattr(monitoring, "gc", fake)
    mgc = ManualGC(True, interval=2)
    mgc.start()
    for it in range(1, 6):
        mgc.after_iteration(it)
    mgc.before_eval()
    mgc.after_eval()
    mgc.close()
    assert fake.calls == ["disable", "collect2", "collect2", "collect2", "collect2", "collect0", "enable"]
    fake.calls.clear()
    quiet = ManualGC(True, interval=0, around_eval=False)
    quiet.start()
    quiet.after_iteration(4)
    quiet.before_eval()
    quiet.close()
    assert fake.calls == ["disable", "collect2", "enable"]


def test_empty_unused_memory_level(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    for level, after, n in ((0, "train", 0), (0, "eval", 0), (1, "train", 1), (1, "eval", 0), (2, "train", 1),
                            (2, "eval", 1)):
        calls.clear()
        monitoring.empty_unused_memory(level, after)
        assert len(calls) == n, (level, after)


# --------------------------------------------------------------------------- one job with every flag
def _read_wandb_history(path):
    """The history records of a W&B run file (the LevelDB-style log of wandb's datastore: 7-byte header, 32 KiB
    blocks of records with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, records, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            records.append(partial + chunk)
            partial = b""
        elif kind in (2, 3):
            partial += chunk
    run, history = None, []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        which = record.WhichOneof("record_type")
        if which == "run":
            run = record.run
        elif which == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return run, history


def _monitored_body(rank, world_size, argv):
    import io
    import sys

    from megatron_slung.training import monitoring as m
    from megatron_slung.training.pretrain import pretrain

    fake = _FakeGC()
    m.gc = fake
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    out, sys.stdout = sys.stdout, io.StringIO()
    try:
        result = pretrain(list(argv))
        text = sys.stdout.getvalue()
    finally:
        sys.stdout = out
    return {"records": result["records"], "gc": fake.calls, "stdout": text}


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitored")
    argv = TINY + ["--train-iters", "6", "--log-interval", "3", "--tensorboard-dir", str(tmp / "tb"),
                   "--tensorboard-log-interval", "2", "--metrics-jsonl", str(tmp / "m.jsonl"),
                   "--eval-interval", "3", "--eval-iters", "1",
                   "--log-throughput", "--log-params-norm", "--log-timers-to-tensorboard",
                   "--log-validation-ppl-to-tensorboard",
                   "--wandb-project", "slung-test", "--wandb-exp-name", "tiny", "--wandb-save-dir", str(tmp / "wb"),
                   "--profile", "--use-pytorch-profiler", "--profile-step-start", "2", "--profile-step-end", "4",
                   "--manual-gc", "--manual-gc-interval", "2", "--empty-unused-memory-level", "2"]
    out = run_distributed(_monitored_body, 1, args=(argv,))[0]
    out["dir"] = tmp
    return out


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_tensorboard_gets_per_iteration_scalars_at_its_interval_and_timers_at_the_log_interval(monitored_run):
    events = _events(monitored_run["dir"] / "tb")
    steps = lambda tag: [e.step for e in events.Scalars(tag)]  # noqa: E731
    assert steps("train/loss") == [2, 4, 6]  # --tensorboard-log-interval 2
    assert steps("params-norm") == [2, 4, 6]  # as Megatron: computed on log iterations too, for the log line
    for tag in ("iteration-time", "throughput", "forward-backward-time", "optimizer-time", "batch-generator-time",
                "train/tokens_per_s"):
        assert steps(tag) == [3, 6], tag  # --log-interval 3
    assert all(e.value > 0 for tag in ("forward-backward-time", "optimizer-time", "iteration-time")
               for e in events.Scalars(tag))
    assert steps("valid/ppl") == [3, 6]
    # the JSONL's records carry the same numbers as the log line
    train = train_records(read_jsonl(monitored_run["dir"] / "m.jsonl"))
    assert [r["iteration"] for r in train] == [3, 6]
    by_step = {e.step: e.value for e in events.Scalars("params-norm")}
    assert train[1]["params_norm"] == pytest.approx(by_step[6], rel=1e-6) and train[0]["params_norm"] > 0
    assert set(train[0]["timers"]) == {"batch-generator", "forward-backward", "optimizer"}


def test_log_throughput_is_megatrons_flops_over_time_and_gpus(monitored_run):
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.training.pretrain import gpt_config_from_args

    args = parse_args(TINY + ["--train-iters", "6"], world_size=1)
    flops = megatron_flops_per_iteration(gpt_config_from_args(args, 256), args.global_batch_size, args.seq_length)
    for r in train_records(monitored_run["records"]):
        assert r["throughput_tflops_per_gpu"] == pytest.approx(flops / r["iter_time_s"] / 1e12, rel=1e-9)
    text = monitored_run["stdout"]
    assert text.count("throughput per GPU (TFLOP/s/GPU): ") == 2 and text.count("| params norm ") == 2


def test_wandb_offline_run_holds_the_scalars(monitored_run):
    files = glob.glob(str(monitored_run["dir"] / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    run, history = _read_wandb_history(files[0])
    assert run.project == "slung-test" and run.display_name == "tiny"
    loss = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    events = _events(monitored_run["dir"] / "tb")
    assert loss == [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")]
    assert {"params-norm", "throughput", "optimizer-time", "valid/ppl"} <= {k for h in history for k in h}


def test_pytorch_profiler_writes_a_trace_of_the_window_under_the_tensorboard_dir(monitored_run):
    traces = glob.glob(str(monitored_run["dir"] / "tb" / "rank0.*.pt.trace.json"))
    assert len(traces) == 1
    with open(traces[0]) as f:
        trace = json.load(f)
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#1", "ProfilerStep#2"]
    assert any(n.startswith("aten::") for n in names)  # the model's ops are in it


def test_manual_gc_in_a_run(monitored_run):
    # disable + a full collection at the start; iterations 2, 4, 6; before (full) and after (young generation)
    # the evaluations at 3 and 6 and the test split at the end; the collector back on at the end.
    calls = monitored_run["gc"]
    assert calls[:2] == ["disable", "collect2"] and calls[-1] == "enable"
    assert calls.count("collect2") == 1 + 3 + 3 and calls.count("collect0") == 3


# --------------------------------------------------------------------------- the parameter norm in each layout
def _norm_body(rank, world_size, argv):
    from megatron_slung.training.pretrain import pretrain

    out = pretrain(list(argv))
    return [r for r in out["records"] if r["kind"] == "train"] if rank == world_size - 1 else None


LAYOUTS = [
    pytest.param(1, [], id="one-process"),
    pytest.param(2, ["--tensor-model-parallel-size", "2"], id="tp2", marks=pytest.mark.slow),
    pytest.param(2, ["--pipeline-model-parallel-size", "2"], id="pp2-tied-embedding", marks=pytest.mark.slow),
    pytest.param(2, ["--zero-stage", "3"], id="zero3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("world,extra", LAYOUTS)
def test_params_norm_is_the_whole_models_norm_in_every_layout(world, extra, tmp_path):
    """With --lr 0 the weights stay at their initialisation, which is the same in every layout: the logged norm
    must be the norm of one GPTModel's parameters (a tied matrix once), built here in one process. (The timers'
    maximum over ranks and the throughput per GPU run in each layout too.)"""
    from megatron_slung.model.gpt import GPTModel
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.training.pretrain import gpt_config_from_args

    argv = TINY + ["--train-iters", "1", "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0", "--log-params-norm",
                   "--weight-decay", "0"]
    args = parse_args(argv, world_size=1)
    model = GPTModel(gpt_config_from_args(args, 256))
    expected = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    flops = megatron_flops_per_iteration(model.config, args.global_batch_size, args.seq_length)
    timing = ["--log-throughput", "--log-timers-to-tensorboard", "--tensorboard-dir", str(tmp_path / "tb")]
    records = run_distributed(_norm_body, world, args=(argv + extra + timing,))[-1]
    assert [r["params_norm"] for r in records] == pytest.approx([expected], rel=1e-6)
    (record,) = records
    assert record["throughput_tflops_per_gpu"] == pytest.approx(flops / record["iter_time_s"] / world / 1e12)
    assert record["timers"]["forward-backward"] > 0 and record["timers"]["optimizer"] > 0


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gpu_only_flags_run_and_write_what_they_say(tmp_path):
    """--log-memory-to-tensorboard, --profile's Nsight capture range, --fp16, synchronised timers and
    --empty-unused-memory-level on a GPU (on a CPU the first three are refused at start)."""
    from tests.pretrain_helpers import run_cli

    proc = run_cli(TINY + ["--train-iters", "4", "--fp16", "--tensorboard-dir", tmp_path / "tb",
                           "--log-memory-to-tensorboard", "--log-timers-to-tensorboard", "--log-interval", "2",
                           "--profile", "--profile-step-start", "1", "--profile-step-end", "3",
                           "--empty-unused-memory-level", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _events(tmp_path / "tb")
    for tag in ("mem-reserved-bytes", "mem-allocated-bytes", "mem-max-allocated-bytes", "mem-allocated-count"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4] and events.Scalars(tag)[-1].value > 0
    assert [e.step for e in events.Scalars("forward-backward-time")] == [2, 4]
