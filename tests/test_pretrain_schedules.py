"""Megatron's sample-based schedules in the real trainer: --train-samples with a batch-size ramp-up (the number of
micro-batches grows, global batch k is the next G_k samples on every layout, the LR schedule advances by each
batch's samples), an exact resume in the middle of the ramp and of a WSD anneal (decoupled embedding/output lr,
a linear weight-decay increment), the ramp under pipeline parallelism; per-split data paths and --data-args-path.
"""

import json

import pytest
import torch

from megatron_slung.training.schedules import BatchSizeSchedule, lr_at
from tests.distributed import run_distributed
from tests.pretrain_helpers import TINY, read_jsonl, run_cli, train_records

# TINY without its iteration-based warmup (sample-based training takes its lengths in samples)
_i = TINY.index("--lr-warmup-iters")
SAMPLE_TINY = TINY[:_i] + TINY[_i + 2:]
# global batch 4, 4, 8, then 12 (start 4, +4 over 16 samples: an increment every 8 samples); 52 samples = 6 steps
RAMP = SAMPLE_TINY + ["--global-batch-size", "12", "--rampup-batch-size", "4", "4", "16", "--train-samples", "52",
                      "--lr-warmup-samples", "8"]
RAMP_BATCHES = [4, 4, 8, 12, 12, 12]


def _ramp_body(rank, world_size, argv):
    """Train, recording the sample indices this rank's sampler gave for each optimizer step."""
    from megatron_slung.training import data as data_module
    from megatron_slung.training import pretrain as pt

    seen, steps = [], []
    original_iter, original_step = data_module.MicroBatchSampler.__iter__, pt.train_step

    def recording_iter(self):
        for indices in original_iter(self):
            seen.append(list(indices))
            yield indices

    def recording_step(trainer, micro):
        steps.append({"micro": seen[:], "gas": trainer.engine.gradient_accumulation_steps(),
                      "lr_groups": sorted({round(g["lr"], 12) for g in trainer.optimizer.param_groups}),
                      "wd": [g["weight_decay"] for g in trainer.optimizer.param_groups]})
        seen.clear()
        return original_step(trainer, micro)

    data_module.MicroBatchSampler.__iter__ = recording_iter
    pt.train_step = recording_step
    out = pt.pretrain(list(argv))
    return {"steps": steps, "records": out["records"]}


@pytest.fixture(scope="module")
def single():
    return train_records(run_distributed(_ramp_body, 1, args=(RAMP + ["--decoupled-lr", "1e-3"],))[0]["records"])


def _assert_same_losses(got, expected):
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected] == list(range(1, 7))
    for g, e in zip(got, expected):
        assert abs(g["loss"] - e["loss"]) <= 1e-4 and g["lr"] == e["lr"] and g["loss_tokens"] == e["loss_tokens"]


@pytest.mark.distributed
def test_rampup_data_order_micro_batches_and_lr_by_samples(single):
    """DP = 2 with ZeRO-2: global batch k is samples [c_k, c_k + G_k), split over the ranks micro-batch by
    micro-batch; the number of micro-batches follows the ramp; the lr of step k is Megatron's at c_k samples
    (the decoupled group's too); the losses are the single process's."""
    results = run_distributed(_ramp_body, 2, args=(RAMP + ["--decoupled-lr", "1e-3", "--zero-stage", "2"],))
    micro, dp = 2, 2
    records = train_records(results[-1]["records"])
    _assert_same_losses(records, single)
    consumed = 0
    for k, size in enumerate(RAMP_BATCHES):
        got = sorted(i for res in results for mb in res["steps"][k]["micro"] for i in mb)
        assert got == list(range(consumed, consumed + size)), k  # the next G_k samples, none twice
        for rank, res in enumerate(results):
            step = res["steps"][k]
            assert step["gas"] == size // (micro * dp)
            # Megatron's sampler: micro-batch j of rank d is c_k + j (m D) + d m + [0, m)
            assert step["micro"] == [list(range(consumed + j * micro * dp + rank * micro,
                                                consumed + j * micro * dp + (rank + 1) * micro))
                                     for j in range(size // (micro * dp))]
        # the lr schedule counts samples: warmup 8 samples, cosine decay to 52
        lr = lr_at(consumed, max_lr=3e-3, min_lr=3e-4, warmup_steps=8, decay_steps=52, decay_style="cosine")
        assert records[k]["lr"] == pytest.approx(lr, rel=1e-12)
        decoupled = lr_at(consumed, max_lr=1e-3, min_lr=3e-4, warmup_steps=8, decay_steps=52, decay_style="cosine")
        assert results[-1]["steps"][k]["lr_groups"] == sorted({round(lr, 12), round(decoupled, 12)})
        consumed += size
        assert records[k]["consumed_samples"] == consumed
    assert BatchSizeSchedule(12, (4, 4, 16)).iterations_for(52) == 6


@pytest.mark.distributed
def test_rampup_under_pipeline_parallelism_matches_one_process(single):
    """DeepSpeed's PipelineEngine takes the growing number of micro-batches (set_train_batch_size)."""
    piped = run_distributed(_ramp_body, 2, args=(RAMP + ["--decoupled-lr", "1e-3", "--pipeline-model-parallel-size",
                                                         "2"],))
    assert [s["gas"] for s in piped[-1]["steps"]] == [2, 2, 4, 6, 6, 6]
    _assert_same_losses(train_records(piped[-1]["records"]), single)


@pytest.mark.slow  # four runs of the job
def test_resume_mid_rampup_and_mid_wsd_is_bit_exact(tmp_path):
    """9 steps straight == stop at 2 (inside the ramp) + stop at 5 (inside WSD's anneal) + the rest; with a
    decoupled lr, a linear weight-decay increment and dropout. A checkpoint is saved when the number of
    micro-batches changes (Megatron)."""
    # batches 4, 4, 8, then 12 x 6 = 88 samples; WSD decays over 88 with the anneal in the last 56 (from 32)
    common = RAMP[:-4] + ["--train-samples", "88", "--lr-warmup-samples", "4", "--lr-decay-style", "WSD",
                          "--lr-wsd-decay-samples", "56", "--lr-wsd-decay-style", "linear", "--decoupled-lr", "1e-3",
                          "--decoupled-min-lr", "1e-4", "--weight-decay-incr-style", "linear",
                          "--start-weight-decay", "0", "--end-weight-decay", "0.1", "--hidden-dropout", "0.1",
                          "--attention-dropout", "0.1"]
    straight = run_cli(common + ["--metrics-jsonl", tmp_path / "straight.jsonl"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    save = tmp_path / "ckpt"
    log = ["--metrics-jsonl", tmp_path / "resumed.jsonl"]
    first = run_cli(common + ["--save", save, "--exit-interval", "2"] + log)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "exiting at iteration 2" in first.stdout
    second = run_cli(common + ["--save", save, "--load", save, "--exit-interval", "5"] + log)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at iteration 2" in second.stdout and "exiting at iteration 5" in second.stdout
    # the ramp's changes (before steps 3 and 4) saved checkpoints, as Megatron does
    assert "iter_0000003" in second.stdout and "global batch size 12" in second.stdout
    third = run_cli(common + ["--save", save, "--load", save] + log)
    assert third.returncode == 0, third.stderr[-3000:]
    a, b = train_records(read_jsonl(tmp_path / "straight.jsonl")), train_records(read_jsonl(tmp_path / "resumed.jsonl"))
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == list(range(1, 10))
    consumed = 0
    for x, y, size in zip(a, b, [4, 4, 8] + [12] * 6):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"] and x["grad_norm"] == y["grad_norm"], x["iteration"]
        assert x["lr"] == pytest.approx(lr_at(consumed, max_lr=3e-3, min_lr=3e-4, warmup_steps=4, decay_steps=88,
                                              decay_style="WSD", wsd_decay_steps=56, wsd_decay_style="linear"))
        consumed += size
        assert x["consumed_samples"] == y["consumed_samples"] == consumed
    # the trainer state holds the schedule's count in samples (what a resume needs, with the consumed samples)
    state = torch.load(save / "iter_0000009" / "slung_state.pt", weights_only=False)
    assert state["consumed_train_samples"] == 88 and state["global_batch_size"] == 12
    assert state["scheduler"]["num_steps"] == 88 and state["scheduler"]["step_unit"] == "samples"


# --------------------------------------------------------------------------- per-split data paths
def _dataset(prefix, low, high, docs=40, length=40):
    import numpy as np

    from megatron_slung.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(low)
    with IndexedDatasetBuilder(str(prefix), vocab_size=1000, with_risk=True) as builder:
        for _ in range(docs):
            builder.add_document(rng.integers(low, high, length), rng.integers(0, 4, length))
    return str(prefix)


def _data_flags(*extra):
    args = [a for a in TINY if a != "--mock-data"]
    return args + ["--train-iters", "3", "--eval-interval", "2", "--eval-iters", "1"] + [str(e) for e in extra]


def test_per_split_paths_feed_each_split_its_own_blend(tmp_path):
    """--train-data-path / --valid-data-path / --test-data-path: each split reads its own blend whole (token ids
    tell them apart), the trainer evaluates on them, and --data-args-path holds --data-path's values."""
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.data.tokenizers import NullTokenizer
    from megatron_slung.training.data import build_datasets

    train = _dataset(tmp_path / "train", 0, 100)
    valid = _dataset(tmp_path / "valid", 100, 200)
    test_a, test_b = _dataset(tmp_path / "test_a", 200, 220), _dataset(tmp_path / "test_b", 220, 240)
    flags = _data_flags("--train-data-path", train, "--valid-data-path", valid, "--test-data-path", "0.5", test_a,
                        "0.5", test_b, "--no-mmap-bin-files")
    args = parse_args(flags, world_size=1)
    train_ds, valid_ds, test_ds = build_datasets(args, NullTokenizer(256))
    assert len(train_ds) == 3 * 8 and len(valid_ds) == (3 // 2 + 1) * 8 and len(test_ds) == 8
    for ds, lo, hi in ((train_ds, 0, 100), (valid_ds, 100, 200), (test_ds, 200, 240)):
        tokens = torch.stack([ds[i]["tokens"] for i in range(len(ds))])
        assert lo <= int(tokens.min()) and int(tokens.max()) < hi
    assert train_ds.indexed.mmap is False  # --no-mmap-bin-files reached the reader
    proc = run_cli(flags + ["--metrics-jsonl", tmp_path / "m.jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(tmp_path / "m.jsonl")
    assert [r["iteration"] for r in train_records(records, "valid")] == [2, 3]
    assert [r["iteration"] for r in train_records(records, "test")] == [3]
    # --data-args-path: the file holds --data-path's values
    (tmp_path / "data_args.txt").write_text(f"0.3 {train}\n0.7 {valid}\n")
    args = parse_args(_data_flags("--data-args-path", tmp_path / "data_args.txt"), world_size=1)
    assert args.data_path == ["0.3", train, "0.7", valid]
    (tmp_path / "split.json").write_text(json.dumps({"train": train, "valid": [valid], "test": None}))
    args = parse_args(_data_flags("--per-split-data-args-path", tmp_path / "split.json"), world_size=1)
    assert args.train_data_path == [train] and args.valid_data_path == [valid] and args.test_data_path is None


@pytest.mark.parametrize("extra, message", [
    (["--data-path", "X", "--train-data-path", "Y"], "--data-path and --train-data-path exclude each other"),
    (["--train-data-path", "Y", "--split", "90,10,0"], "--split has no effect with --train-data-path"),
    (["--valid-data-path", "Y"], "need --train-data-path"),
    (["--data-path", "X", "--data-args-path", "F"], "give --data-path or --data-args-path, not both"),
    (["--data-args-path", "/nonexistent/args.txt"], "--data-args-path /nonexistent/args.txt: no such file"),
    (["--train-data-path", "0.5", "A", "B"], "--train-data-path: a blend is weight/prefix pairs"),
    (["--train-data-path", "Y", "--mock-data"], "give --train-data-path or --mock-data, not both"),
])
def test_data_path_refusals(extra, message):
    from megatron_slung.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match=__import__("re").escape(message)):
        parse_args(_data_flags(*extra), world_size=1)


def test_no_mmap_bin_files_reads_the_same_samples(tmp_path):
    import numpy as np

    from megatron_slung.data.gpt_dataset import build_gpt_datasets
    from megatron_slung.data.indexed_dataset import FileBinReader, IndexedDataset

    prefix = _dataset(tmp_path / "d", 0, 250)
    mapped, read = IndexedDataset(prefix), IndexedDataset(prefix, mmap=False)
    assert isinstance(read._bin, FileBinReader) and isinstance(read._risk_bin, FileBinReader)
    assert np.array_equal(mapped.read(3, 100), read.read(3, 100)) and mapped.token_id_range() == read.token_id_range()
    assert np.array_equal(mapped.read_risk(50, 30), read.read_risk(50, 30))
    a = build_gpt_datasets([prefix], "1", 32, 1, (20, 0, 0), cache_dir=str(tmp_path / "c"))[0]
    b = build_gpt_datasets([prefix], "1", 32, 1, (20, 0, 0), cache_dir=str(tmp_path / "c"), mmap=False)[0]
    for i in range(20):
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])



@pytest.mark.distributed
def test_step_batch_size_schedule_by_tokens_with_train_iters():
    """Megatron's --step-batch-size-schedule (thresholds in tokens: 256 tokens = 8 samples of 32): global batches
    4, 4, then 8 from 8 consumed samples on, with --train-iters; each batch the next G_k samples."""
    i = SAMPLE_TINY.index("--global-batch-size")
    flags = SAMPLE_TINY[:i] + SAMPLE_TINY[i + 2:] + ["--step-batch-size-schedule", "0:4 256:8", "--train-iters", "5"]
    res = run_distributed(_ramp_body, 1, args=(flags,))[0]
    assert [s["gas"] for s in res["steps"]] == [2, 2, 4, 4, 4]
    consumed = 0
    for step, size in zip(res["steps"], [4, 4, 8, 8, 8]):
        assert sorted(i for mb in step["micro"] for i in mb) == list(range(consumed, consumed + size))
        consumed += size
    assert train_records(res["records"])[-1]["consumed_samples"] == consumed == 32
