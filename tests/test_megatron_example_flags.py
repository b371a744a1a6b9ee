"""Every flag of Megatron-LM's example scripts (the lists in tests/megatron_example_flags/) is taken by our
parser, with its value, and either does what it does in Megatron or is refused at start with the reason:
never "unrecognized arguments", never accepted and ignored. Also the refusals and checks of the other
Megatron flags this trainer parses (training/arguments.py: REFUSED_FLAGS, _validate_logs)."""

import glob
import os
import shlex

import pytest

from megatron_slung.training import monitoring
from megatron_slung.training.arguments import REFUSED_FLAGS, ArgumentError, build_parser, parse_args
from tests.pretrain_helpers import ROOT, TINY

LISTS = sorted(glob.glob(os.path.join(ROOT, "tests", "megatron_example_flags", "*.txt")))

# Flags other helpers add on their own branches (issue 13): the lead empties this list when merging them.
PENDING = {
    "--step-batch-size-schedule": "sched",
}

PLACEHOLDERS = {"$CHECKPOINT_PATH": "/tmp/ckpt", "$TENSORBOARD_LOGS_PATH": "/tmp/tb", "$VOCAB_FILE": "/tmp/vocab.json",
                "$MERGE_FILE": "/tmp/merges.txt", "$DATA_PATH": "/tmp/data_text_document",
                "$TOKENIZER_MODEL": "/tmp/tokenizer.model", "$DATA_CACHE_PATH": "/tmp/cache"}


def example_lines():
    """(script, tokens) for every flag line of every list."""
    out = []
    for path in LISTS:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                for name, value in PLACEHOLDERS.items():
                    line = line.replace(name, value)
                out.append((os.path.basename(path), shlex.split(line)))
    return out


def known_flags() -> set:
    return {opt for action in build_parser()._actions for opt in action.option_strings}


def test_the_lists_are_there():
    assert [os.path.basename(p) for p in LISTS] == ["train_gpt3_175b_distributed.txt",
                                                     "train_llama3_8b_h100_fp8.txt",
                                                     "train_mixtral_8x7b_distributed.txt"]
    lines = example_lines()
    assert len(lines) == 34 + 75 + 59 and all(tokens[0].startswith("--") for _, tokens in lines)


def test_every_flag_of_megatrons_examples_is_known_with_its_value():
    known = known_flags()
    unknown = sorted({(script, tokens[0]) for script, tokens in example_lines()
                      if tokens[0] not in known and tokens[0] not in PENDING})
    assert not unknown, f"flags of Megatron's examples this parser does not take: {unknown}"
    parser = build_parser()
    for script, tokens in example_lines():
        if tokens[0] in known:
            parser.parse_args(tokens)  # the script's value passes the flag's type and choices


def test_pending_lists_only_flags_still_unknown():
    done = sorted(set(PENDING) & known_flags())
    assert not done, f"remove from PENDING (now taken by the parser): {done}"


def _validate(extra):
    return parse_args(TINY + ["--train-iters", "6"] + list(extra), world_size=1)


@pytest.mark.parametrize("script,tokens", [(s, t) for s, t in example_lines() if t[0] in REFUSED_FLAGS],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_refused_flags_of_the_examples_give_the_reason(script, tokens):
    flag = tokens[0]
    dest, accepted, reason = REFUSED_FLAGS[flag]
    args = build_parser().parse_args(tokens)
    if accepted is not None and getattr(args, dest) == accepted:  # e.g. --context-parallel-size 1
        _validate(tokens)
        return
    with pytest.raises(ArgumentError, match=f"^{flag}( .*)?: refused: ") as e:
        _validate(tokens)
    assert reason.split("{why}")[0][:40] in str(e.value)


# --------------------------------------------------------------------------- the refusals and checks
REFUSALS = [
    (["--fp8-format", "hybrid"], r"--fp8-format hybrid: refused: FP8 training runs the matmuls through Transformer "
                                 r"Engine's FP8 layers"),
    (["--fp8-param-gather"], r"^--fp8-param-gather: refused: FP8"),
    (["--context-parallel-size", "2"], r"--context-parallel-size 2: refused: context parallelism .* not implemented"),
    (["--ckpt-format", "torch_dist"], r"--ckpt-format torch_dist: refused: .*Use --ckpt-format torch"),
    (["--ckpt-format", "fsdp_dtensor"], r"--ckpt-format fsdp_dtensor: refused"),
    (["--num-experts", "8"], r"--num-experts 8: refused: mixture-of-experts is not implemented"),
    (["--expert-model-parallel-size", "8"], r"--expert-model-parallel-size 8: refused: mixture-of-experts"),
    (["--moe-router-load-balancing-type", "aux_loss"], r"--moe-router-load-balancing-type aux_loss: refused"),
    (["--use-torch-fsdp2"], r"--use-torch-fsdp2: refused: .*ZeRO"),
    (["--tp-comm-overlap"], r"--tp-comm-overlap: refused: .*userbuffers"),
    (["--no-position-embedding"], r"--no-position-embedding is deprecated .*--position-embedding-type none"),
    (["--log-timers-to-tensorboard"], r"--log-timers-to-tensorboard needs --tensorboard-dir"),
    (["--log-validation-ppl-to-tensorboard"], r"--log-validation-ppl-to-tensorboard needs --tensorboard-dir"),
    (["--tensorboard-log-interval", "0"], r"--tensorboard-log-interval must be >= 1"),
    (["--wandb-exp-name", "x"], r"--wandb-exp-name has no effect without --wandb-project"),
    (["--wandb-project", "p"], r"--wandb-project needs --wandb-save-dir DIR or --save DIR"),
    (["--use-pytorch-profiler"], r"--use-pytorch-profiler has no effect without --profile"),
    (["--profile-step-start", "2"], r"--profile-step-start has no effect without --profile"),
    (["--profile", "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "2"],
     r"--use-pytorch-profiler writes its trace under --tensorboard-dir"),
    (["--profile", "--profile-step-start", "3", "--profile-step-end", "3"], r"--profile-step-start \(3\) must be"),
    (["--profile"], r"--profile-step-end \(12\) is past --train-iters \(6\)"),
    (["--profile", "--profile-step-start", "2", "--profile-step-end", "4", "--profile-ranks", "0", "3"], r"--profile-ranks 3: no such rank"),
    (["--manual-gc-interval", "5"], r"--manual-gc-interval has no effect without --manual-gc"),
    (["--no-manual-gc-eval"], r"--no-manual-gc-eval has no effect without --manual-gc"),
    (["--manual-gc", "--manual-gc-interval", "-1"], r"--manual-gc-interval must be >= 0"),
    (["--grad-reduce-in-bf16"], r"--grad-reduce-in-bf16 reduces bf16 gradients: it needs --bf16"),
]


@pytest.mark.parametrize("extra,message", REFUSALS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_flags_that_cannot_be_honoured_are_refused_with_the_reason(extra, message):
    tiny_gpt = [t for t in TINY if t not in ("--position-embedding-type", "rope")] if "--no-position-embedding" in extra \
        else TINY
    with pytest.raises(ArgumentError, match=message):
        parse_args(tiny_gpt + ["--train-iters", "6"] + extra, world_size=2)


def test_the_values_that_change_nothing_are_accepted(tmp_path):
    args = _validate(["--context-parallel-size", "1", "--expert-model-parallel-size", "1", "--ckpt-format", "torch",
                      "--no-position-embedding", "--no-masked-softmax-fusion"])
    assert args.context_parallel_size == 1 and args.ckpt_format == "torch" and not args.add_position_embedding
    args = _validate(["--profile", "--use-pytorch-profiler", "--tensorboard-dir", str(tmp_path), "--profile-step-start",
                      "2", "--profile-step-end", "6", "--profile-ranks", "0", "--manual-gc", "--manual-gc-interval", "3",
                      "--no-manual-gc-eval"])
    assert (args.profile_step_start, args.profile_step_end, args.profile_ranks) == (2, 6, [0])
    assert args.manual_gc and args.manual_gc_interval == 3 and not args.manual_gc_eval


def test_megatrons_defaults():
    args = build_parser().parse_args([])
    assert (args.tensorboard_log_interval, args.profile_step_start, args.profile_step_end, args.profile_ranks,
            args.manual_gc_interval, args.manual_gc_eval, args.empty_unused_memory_level) == (1, 10, 12, [], 0, True, 0)
    assert not any((args.log_throughput, args.log_params_norm, args.log_timers_to_tensorboard, args.profile,
                    args.use_pytorch_profiler, args.manual_gc, args.grad_reduce_in_bf16))


def test_wandb_missing_is_an_error_naming_the_package(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ArgumentError, match="--wandb-project needs the wandb package.*pip install wandb"):
        _validate(["--wandb-project", "p", "--save", str(tmp_path)])


@pytest.mark.parametrize("extra,message", [
    (["--fp16"], r"--fp16 needs a CUDA GPU"),
    (["--profile", "--profile-step-start", "2", "--profile-step-end", "4"], r"--profile without --use-pytorch-profiler .* needs a CUDA GPU"),
    (["--log-memory-to-tensorboard", "--tensorboard-dir", "/tmp/x"], r"--log-memory-to-tensorboard .* needs a CUDA GPU"),
])
def test_flags_that_need_a_gpu_are_refused_on_the_cpu(extra, message):
    args = _validate(extra)
    with pytest.raises(ArgumentError, match=message):
        monitoring.check_device_flags(args, cuda=False)
    monitoring.check_device_flags(args, cuda=True)


def test_fp16_on_the_cpu_is_refused_before_initialisation():
    from tests.pretrain_helpers import run_cli

    proc = run_cli(TINY + ["--train-iters", "2", "--fp16"], extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    # one line, and nothing initialised: DeepSpeed (whose import alone logs the accelerator) never ran
    assert proc.stderr.strip().splitlines() == ["error: --fp16 needs a CUDA GPU (DeepSpeed has no fp16 training on "
                                                "the CPU); use --bf16 or fp32 (no flag)"]
    assert "accelerator" not in proc.stdout + proc.stderr and "megatron-slung pretrain:" not in proc.stdout


def test_grad_reduce_in_bf16_sets_deepspeeds_communication_dtype(tmp_path):
    for stage in (0, 1, 2):
        ds = _validate(["--bf16", "--grad-reduce-in-bf16", "--zero-stage", str(stage)]).deepspeed_config_dict
        assert ds["communication_data_type"] == "bf16" and "data_types" not in ds
        assert "communication_data_type" not in _validate(["--bf16", "--zero-stage", str(stage)]).deepspeed_config_dict
    user = tmp_path / "ds.json"
    user.write_text('{"bf16": {"enabled": true}, "communication_data_type": "fp32"}')
    with pytest.raises(ArgumentError, match="communication_data_type = 'fp32' disagrees with --grad-reduce-in-bf16"):
        _validate(["--bf16", "--grad-reduce-in-bf16", "--deepspeed-config", str(user)])
