"""The pretraining job on one process: resume is bit-exact, crashes mid-save are survived, the per-level logs and
the global-batch normalisation are right, NaN losses stop the run or are skipped, bad flags fail at start."""


import pytest
import torch

from tests.distributed import run_distributed
from tests.pretrain_helpers import TINY, pretrain_body, read_jsonl, run_cli, train_records

POLICY = "0:ce,1:ce,2:ignore,3:unlikelihood"


def test_stop_and_resume_is_bit_exact(tmp_path):
    """10 iterations straight == 5, stop, resume, 5 more (dropout on, ZeRO-1, evaluations in between)."""
    common = TINY + ["--train-iters", "10", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                     "--zero-stage", "1", "--eval-interval", "3", "--eval-iters", "1"]
    straight = run_cli(common + ["--metrics-jsonl", tmp_path / "straight.jsonl"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    save = tmp_path / "ckpt"
    first = run_cli(common + ["--save", save, "--exit-interval", "5", "--metrics-jsonl", tmp_path / "resumed.jsonl"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "exiting at iteration 5" in first.stdout
    assert (save / "latest").read_text().strip() == "iter_0000005"
    second = run_cli(common + ["--save", save, "--load", save, "--metrics-jsonl", tmp_path / "resumed.jsonl"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "loaded checkpoint" in second.stdout and "at iteration 5" in second.stdout
    a, b = read_jsonl(tmp_path / "straight.jsonl"), read_jsonl(tmp_path / "resumed.jsonl")
    assert [(r["kind"], r["iteration"]) for r in a] == [(r["kind"], r["iteration"]) for r in b]
    assert len(train_records(a)) == 10 and len(train_records(a, "valid")) == 4
    for x, y in zip(a, b):
        key = "loss" if x["kind"] == "train" else "policy_loss"
        assert x[key] == y[key], (x["kind"], x["iteration"])  # bit for bit
        assert x.get("ppl") == y.get("ppl")
        assert x.get("grad_norm") == y.get("grad_norm") and x.get("lr") == y.get("lr")
        assert x["levels"] == y["levels"]


def test_crash_while_saving_then_resume(tmp_path):
    """The process dies between renaming the new checkpoint and updating `latest`: the resume starts from the
    previous checkpoint and reproduces the lost iterations exactly."""
    save = tmp_path / "ckpt"
    args = TINY + ["--train-iters", "6", "--save", save, "--save-interval", "2", "--zero-stage", "1"]
    crashed = run_cli(args + ["--metrics-jsonl", tmp_path / "crashed.jsonl"],
                      extra_env={"SLUNG_CHECKPOINT_CRASH_AT": "before_latest:2"})
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert (save / "latest").read_text().strip() == "iter_0000002"
    resumed = run_cli(args + ["--load", save, "--metrics-jsonl", tmp_path / "resumed.jsonl"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "iter_0000002 at iteration 2" in resumed.stdout
    assert (save / "latest").read_text().strip() == "iter_0000006"
    lost = {r["iteration"]: r["loss"] for r in train_records(read_jsonl(tmp_path / "crashed.jsonl"))}
    redone = {r["iteration"]: r["loss"] for r in train_records(read_jsonl(tmp_path / "resumed.jsonl"))}
    assert sorted(redone) == [3, 4, 5, 6]
    assert redone[3] == lost[3] and redone[4] == lost[4]


def _per_level_body(rank, world_size, argv):
    return pretrain_body(rank, world_size, argv)


def test_per_level_loss_logging_matches_a_hand_computation():
    """Iteration 1's logged loss and per-level cross-entropy, recomputed by hand from the same model and samples."""
    from megatron_slung.loss import masked_cross_entropy_reference
    from megatron_slung.model.gpt import GPTModel
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.training.data import MockGPTDataset, to_micro_batch
    from megatron_slung.training.pretrain import gpt_config_from_args

    argv = TINY + ["--train-iters", "1", "--lr-warmup-iters", "0"]
    records = run_distributed(_per_level_body, 1, args=(argv,))[0]
    rec = train_records(records)[0]

    args = parse_args(argv, world_size=1)
    model = GPTModel(gpt_config_from_args(args, 256))  # same per-parameter seeded init as the run
    data = MockGPTDataset(8, 32, 256, seed=args.seed)
    batch = to_micro_batch({k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]})
    with torch.no_grad():
        logits = model(batch.tokens)
    out = masked_cross_entropy_reference(logits.reshape(-1, 256), batch.labels.reshape(-1), batch.risk.reshape(-1),
                                         POLICY)
    assert rec["loss"] == pytest.approx(float(out.loss_sum / out.num_tokens), rel=1e-5)
    assert rec["loss_tokens"] == int(out.num_tokens)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch.labels.reshape(-1), reduction="none")
    risk = batch.risk.reshape(-1)
    assert set(rec["levels"]) == {"0", "1", "2", "3"}
    for level in range(4):
        sel = risk == level
        info = rec["levels"][str(level)]
        assert info["tokens"] == int(sel.sum())
        assert info["ce"] == pytest.approx(float(ce[sel].mean()), rel=1e-5)  # masked level 2 included
    assert rec["levels"]["2"]["mode"] == "ignore" and rec["levels"]["3"]["mode"] == "unlikelihood"


# --------------------------------------------------------------------------- NaN handling
NAN_ITERATION = 3


def _nan_body(rank, world_size, argv, skip):
    """Run the job with the loss made NaN on every micro-batch of iteration 3; report what happened."""
    from megatron_slung.training import pretrain as pt

    calls = {"n": 0}
    original_ce, original_step = pt._masked_ce, pt.train_step
    snapshots = {}

    def poisoned_ce(trainer, output, labels, risk):
        out = original_ce(trainer, output, labels, risk)
        calls["n"] += 1
        if (calls["n"] - 1) // trainer.args.gradient_accumulation_steps == NAN_ITERATION - 1:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    def watched_step(trainer, micro):
        # the schedule counts samples (Megatron): applied updates x the global batch
        it = trainer.scheduler.num_steps // trainer.args.global_batch_size + len(snapshots.get("skipped", []))
        before = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
        result = original_step(trainer, micro)
        after = trainer.module.state_dict()
        snapshots[it + 1] = all(torch.equal(before[k], after[k]) for k in before)
        if result[1]:
            snapshots.setdefault("skipped", []).append(it + 1)
        snapshots["lr_steps"] = trainer.scheduler.num_steps // trainer.args.global_batch_size
        return result

    pt._masked_ce, pt.train_step = poisoned_ce, watched_step
    try:
        out = pt.pretrain(list(argv) + (["--skip-nan-steps"] if skip else []))
    except pt.NonFiniteLossError as e:
        return {"error": str(e), "snapshots": snapshots}
    return {"records": out["records"], "snapshots": snapshots}


def test_nan_loss_stops_the_run_naming_the_iteration():
    got = run_distributed(_nan_body, 1, args=(TINY + ["--train-iters", "5"], False))[0]
    assert "NaN/inf at iteration 3" in got["error"] and "--skip-nan-steps" in got["error"]
    assert got["snapshots"][3] is True  # the poisoned update was not applied before stopping


def test_nan_loss_step_is_skipped_with_the_flag():
    got = run_distributed(_nan_body, 1, args=(TINY + ["--train-iters", "5"], True))[0]
    snaps = got["snapshots"]
    assert snaps["skipped"] == [3]
    assert snaps[3] is True and snaps[2] is False and snaps[4] is False  # weights unchanged only at iteration 3
    assert snaps["lr_steps"] == 4  # the schedule does not count the skipped update
    recs = train_records(got["records"])
    assert [r["skipped_iterations"] for r in recs] == [0, 0, 1, 0, 0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if r["iteration"] != 3)


# --------------------------------------------------------------------------- command line
def test_bad_flags_fail_at_start_with_a_clear_message(tmp_path):
    proc = run_cli(TINY + ["--train-iters", "2", "--num-query-groups", "3"])  # TINY has --group-query-attention
    assert proc.returncode == 2
    assert "--num-attention-heads (4) must be a multiple of --num-query-groups (3)" in proc.stderr
    assert "Traceback" not in proc.stderr
    help_text = run_cli(["--help"])
    assert help_text.returncode == 0 and "--risk-loss-policy" in help_text.stdout and "--tensor-model-parallel-size" in help_text.stdout


# --------------------------------------------------------------------------- --load without a checkpoint
def test_finetune_from_a_directory_without_a_checkpoint_is_an_error(tmp_path):
    """It trained random weights after a "starting from scratch" line."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(TINY + ["--train-iters", "2", "--load", empty, "--finetune"])
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert f"error: --load {empty} holds no checkpoint" in proc.stderr and "--finetune asks to start from its weights" in proc.stderr
    assert "Traceback" not in proc.stderr and "iter 1/" not in proc.stdout


def test_a_job_that_resumes_itself_starts_fresh_loudly_then_resumes(tmp_path):
    """--load = --save (auto-resume jobs): the first run warns and starts from scratch, the next resumes."""
    save = tmp_path / "ckpt"
    args = TINY + ["--train-iters", "2", "--load", save, "--save", save]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    warning = [line for line in first.stdout.splitlines() if line.startswith("WARNING:")]
    assert warning == [f"WARNING: --load {save} does not exist (it is also --save): starting from scratch, with "
                       "random weights"]
    assert (save / "latest").read_text().strip() == "iter_0000002"
    second = run_cli(TINY + ["--train-iters", "3", "--load", save, "--save", save])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "WARNING:" not in second.stdout and "at iteration 2" in second.stdout


# --------------------------------------------------------------------------- real data
def test_trains_on_a_dataset_made_by_the_tools(tmp_path):
    """synthetic corpus -> tokenizer -> risk tags -> preprocessing -> pretrain with the masked policy."""
    import sys

    from tests.pretrain_helpers import ROOT, env

    def tool(*args):
        proc = __import__("subprocess").run([sys.executable, *map(str, args)], cwd=ROOT, env=env(),
                                            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    tool("-m", "megatron_slung.experiment.synthetic", "--output", tmp_path / "raw.jsonl", "--docs", 300,
         "--word-lists", tmp_path / "lists")
    tool("tools/train_tokenizer.py", "--input", tmp_path / "raw.jsonl", "--output-prefix", tmp_path / "spm",
         "--vocab-size", 1000)
    tool("tools/tag_risk.py", "--input", tmp_path / "raw.jsonl", "--output", tmp_path / "tagged.jsonl", "--unit",
         "sentence", "--tagger", "lexicon", "--lexicon", f"3:{tmp_path / 'lists' / 'toxic.txt'}", "--lexicon",
         f"2:{tmp_path / 'lists' / 'ambiguous.txt'}")
    tool("tools/preprocess_data.py", "--input", tmp_path / "tagged.jsonl", "--output-prefix", tmp_path / "data" / "d",
         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tmp_path / "spm.model", "--append-eod")
    args = [a for a in TINY if a not in ("--mock-data",)]
    args[args.index("--vocab-size"):args.index("--vocab-size") + 2] = []
    proc = run_cli(args + ["--train-iters", "4", "--data-path", tmp_path / "data" / "d_text_document",
                           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tmp_path / "spm.model",
                           "--risk-loss-policy", "masked", "--split", "90,10,0", "--eval-iters", "1",
                           "--data-cache-path", tmp_path / "cache", "--save", tmp_path / "ckpt",
                           "--metrics-jsonl", tmp_path / "m.jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vocab 1000 (padded 1024)" in proc.stdout
    records = read_jsonl(tmp_path / "m.jsonl")
    assert [r["kind"] for r in records] == ["train"] * 4 + ["valid"]
    levels = {}
    for r in train_records(records):
        for level, info in r["levels"].items():
            levels[level] = info["mode"]
    risky = {"2", "3"} & set(levels)
    assert risky and all(levels[lv] == "ignore" for lv in risky)  # risky tokens seen, not trained on
    assert levels.get("1") == "ce"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000004"


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    """--torch-compile (each layer's body compiled) follows the eager run's losses to rounding level."""
    args = TINY + ["--train-iters", "4"]
    eager = run_cli(args + ["--metrics-jsonl", tmp_path / "eager.jsonl"])
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run_cli(args + ["--torch-compile", "--metrics-jsonl", tmp_path / "compiled.jsonl"])
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "transformer layers compiled" in compiled.stdout and "compiled" not in eager.stdout
    a = train_records(read_jsonl(tmp_path / "eager.jsonl"))
    b = train_records(read_jsonl(tmp_path / "compiled.jsonl"))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5), x["iteration"]


# --------------------------------------------------------------------------- NaN gradient, finite loss
def _grad_nan_body(rank, world_size, argv, skip):
    """Make one parameter's gradient NaN on rank 0 only, at iteration 3 (the loss stays finite); report, per
    iteration, whether the step was skipped and whether the weights the optimizer holds (the fp32 master
    copies under ZeRO / bf16) and the model's own stayed unchanged."""
    from megatron_slung.training import pretrain as pt

    original_step = pt.train_step
    seen = {}

    def weights(trainer):
        masters = [p.detach().clone() for g in trainer.optimizer.param_groups for p in g["params"]]
        # a ZeRO-3 parameter's own data is gathered and released around each use: its partition is the weight
        return masters + [getattr(p, "ds_tensor", p).detach().clone() for p in trainer.module.parameters()]

    def watched_step(trainer, micro):
        iteration = len(seen) + 1
        handle = None
        if iteration == NAN_ITERATION and rank == 0:
            param = next(p for p in trainer.module.parameters() if p.requires_grad)
            handle = param.register_hook(lambda g: torch.full_like(g, float("nan")))
        before = weights(trainer)
        try:
            result = original_step(trainer, micro)
        finally:
            if handle is not None:
                handle.remove()
        after = weights(trainer)
        seen[iteration] = {"skipped": bool(result[1]),
                           "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                           "finite": all(bool(torch.isfinite(a).all()) for a in after),
                           "loss_finite": result[0] is None or bool(torch.isfinite(result[0][0]))}
        return result

    pt.train_step = watched_step
    try:
        pt.pretrain(list(argv) + (["--skip-nan-steps"] if skip else []))
    except pt.NonFiniteLossError as e:
        return {"error": str(e), "seen": seen}
    return {"seen": seen}


GRAD_NAN_LAYOUTS = {
    "plain": (1, []),
    "plain-no-clipping": (1, ["--clip-grad", "0"]),
    "bf16": (1, ["--bf16"]),
    "zero1": (2, ["--zero-stage", "1"]),
    "zero2": (2, ["--zero-stage", "2"]),
    "zero3": (2, ["--zero-stage", "3"]),
    "bf16-zero2": (2, ["--bf16", "--zero-stage", "2"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("layout", list(GRAD_NAN_LAYOUTS))
def test_nan_gradient_with_a_finite_loss_stops_the_run(layout):
    world, extra = GRAD_NAN_LAYOUTS[layout]
    for got in run_distributed(_grad_nan_body, world, args=(TINY + ["--train-iters", "5"] + extra, False)):
        assert "error" in got, got["seen"]
        assert "gradient norm is NaN/inf at iteration 3" in got["error"] and "--skip-nan-steps" in got["error"]
        seen = got["seen"]
        assert sorted(seen) == [1, 2, 3] and seen[3]["loss_finite"]
        assert seen[3]["unchanged"] and seen[3]["finite"]  # the poisoned update was not applied


@pytest.mark.parametrize("layout", ["plain", "zero2", "pp2"])
def test_nan_gradient_step_is_skipped_with_the_flag(layout):
    world, extra = GRAD_NAN_LAYOUTS[layout]
    for got in run_distributed(_grad_nan_body, world, args=(TINY + ["--train-iters", "5"] + extra, True)):
        assert "error" not in got, got["error"]
        seen = got["seen"]
        assert [seen[i]["skipped"] for i in range(1, 6)] == [False, False, True, False, False]
        assert seen[3]["unchanged"] and not seen[2]["unchanged"] and not seen[4]["unchanged"]
        assert all(s["finite"] for s in seen.values())


# --------------------------------------------------------------------------- inputs checked before initialisation
def _write_dataset(prefix, *, max_id=255, risk=True, docs=60, length=40):
    import numpy as np

    from megatron_slung.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(str(prefix), vocab_size=1000, with_risk=risk) as builder:
        for _ in range(docs):
            tokens = rng.integers(0, max_id + 1, length)
            tokens[0] = max_id
            builder.add_document(tokens, rng.integers(0, 4, length) if risk else None)
    return str(prefix)


def _data_args(*data_path, tokenizer=("--vocab-size", "256"), policy="masked"):
    args = [a for a in TINY if a != "--mock-data"]
    i = args.index("--vocab-size")
    del args[i:i + 2]
    return args + ["--train-iters", "2", "--split", "1", "--risk-loss-policy", policy, "--data-path",
                   *map(str, data_path), *tokenizer]


def _assert_one_line_error_before_init(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    # nothing was initialised: DeepSpeed (whose import alone logs the accelerator) never ran, no summary line
    assert "megatron-slung pretrain:" not in proc.stdout and "accelerator" not in proc.stdout
    assert "deepspeed" not in proc.stdout.lower(), proc.stdout[-2000:]


def test_data_and_tokenizer_errors_are_one_line_before_initialisation(tmp_path):
    good = _write_dataset(tmp_path / "good")
    missing = tmp_path / "nothing_here"
    _assert_one_line_error_before_init(run_cli(_data_args(missing)), f"{missing}.idx", "no dataset here")
    no_model = tmp_path / "absent.model"
    sentencepiece = ("--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", no_model)
    _assert_one_line_error_before_init(run_cli(_data_args(good, tokenizer=sentencepiece)),
                                       f"--tokenizer-model {no_model}", "does not exist")
    few = _data_args(good) + ["--split", "100,0.1,0", "--eval-iters", "1"]  # 60 documents: no validation document
    _assert_one_line_error_before_init(run_cli(few), f"--data-path {good}: the valid split is empty (60 documents")
    wide = _write_dataset(tmp_path / "wide", max_id=300)
    _assert_one_line_error_before_init(run_cli(_data_args(0.5, good, 0.5, wide)), f"--data-path {wide}:",
                                       "token ids up to 300", "256 tokens")


def test_a_dataset_without_risk_levels_is_refused_under_a_risk_policy(tmp_path):
    good = _write_dataset(tmp_path / "good")
    bare = _write_dataset(tmp_path / "bare", risk=False)
    proc = run_cli(_data_args(0.5, good, 0.5, bare))
    _assert_one_line_error_before_init(proc, f"--data-path {bare} has no risk channel", "'masked'",
                                       "levels 2-3", "--allow-missing-risk")
    allowed = run_cli(_data_args(0.5, good, 0.5, bare) + ["--allow-missing-risk"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "2 datasets, risk channel: 1 of 2" in allowed.stdout
    assert f"note: {bare} has no risk channel: its tokens train as level 0 (--allow-missing-risk)" in allowed.stdout
    plain = run_cli(_data_args(bare, policy="ce"))  # plain CE: the levels change nothing
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "1 dataset, risk channel: 0 of 1" in plain.stdout
