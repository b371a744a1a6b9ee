"""Command-line arguments of ``python -m megatron_slung.pretrain``: Megatron's flag names, checked at start.

    args = parse_args()                 # sys.argv, plus --config FILE (YAML or JSON) underneath
    args = parse_args(argv, world_size=4)

A config file holds the same flags, spelled ``num-layers``, ``num_layers`` or ``--num-layers``; a switch
takes ``true``/``false``, a list flag a list. The command line wins over the file. Every value goes through
the same argparse checks as on the command line, and an error names the file.

``validate_args`` fills the derived values (data-parallel size, gradient-accumulation steps, defaults that
depend on other flags) and rejects impossible combinations with a message that says what to change.
All derived values are set as attributes of the namespace:

    data_parallel_size, gradient_accumulation_steps, world_size,
    ffn_hidden_size, num_query_groups, kv_channels, max_position_embeddings, position_embedding_type
    (rope with --use-rotary-position-embeddings), group_query_attention (on for a GQA checkpoint adopted
    by --load), lr_decay_iters,
    lr_warmup_iters, zero_stage, params_dtype ("float32" | "bfloat16" | "float16").
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import List, Optional, Sequence

from megatron_slung.loss.policy import LossPolicy


class ArgumentError(ValueError):
    """A bad flag or flag combination (the message says which and what to do)."""


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ArgumentError (with a prefix) instead of exiting."""

    def __init__(self, *a, error_prefix: str = "", **kw):
        super().__init__(*a, **kw)
        self.error_prefix = error_prefix

    def error(self, message):
        raise ArgumentError(f"{self.error_prefix}{message}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    # Megatron-LM's flags with Megatron-LM's defaults: without flags the model is GPT-3 style (learned
    # absolute positions, LayerNorm, GeLU MLP of 4h, linear biases, dropout 0.1, tied embeddings). A Llama
    # model says so: --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    # --hidden-dropout 0 --attention-dropout 0 (and --group-query-attention --num-query-groups N).
    g = p.add_argument_group("model (Megatron-LM's flags and defaults)")
    g.add_argument("--num-layers", type=int, default=None, help="transformer layers")
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP inner size (default 4 x hidden; with --swiglu int(4 x hidden x 2/3 / 64) x 64)")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups key/value heads (default 1)")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads with --group-query-attention (default 1); refused without it, which "
                        "Megatron would ignore")
    g.add_argument("--kv-channels", type=int, default=None, help="head dimension (default hidden / heads)")
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default = --seq-length (the size of the learned position table)")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute", help="default learned_absolute (a table added to the embeddings)")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Megatron's older spelling of --position-embedding-type rope")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="RoPE on the first int(head dim x this) channels of each head (default 1.0)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="zero-centred gamma: the norms compute (1 + weight) x normed, the weight starting at 0")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalise each query and key head (with --normalization's kind) before RoPE")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (silu(gate) x up) instead of GeLU")
    g.add_argument("--openai-gelu", action="store_true",
                   help="GeLU's tanh approximation (Hugging Face's gelu_new) instead of the exact erf GeLU. "
                        "Megatron-core's models accept this flag and ignore it; its legacy models use it")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                   help="no biases in the linear layers (default: biases in QKV, attention output and both MLP "
                        "matrices)")
    g.add_argument("--add-qkv-bias", action="store_true", help="a bias on the QKV projection only (Qwen2)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1,
                   help="dropout on the embeddings and on each residual branch (Megatron's default 0.1)")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="dropout on the attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="weights ~ N(0, std); the attention and MLP output projections std / sqrt(2 x layers)")
    g.add_argument("--recompute-activations", action="store_true", help="recompute each layer in the backward")
    g.add_argument("--torch-compile", action="store_true",
                   help="torch.compile each transformer layer's body (fuses the elementwise work around the "
                        "matmuls; the first iterations compile, numerics change at rounding level)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="what it means here: attention is torch's scaled_dot_product_attention, which on a GPU "
                        "already runs the flash kernel where it can (with or without this flag); on a CPU it "
                        "changes nothing")


def _signal_name(text: str) -> str:
    """``SIGUSR1``, ``USR1`` or ``sigusr1`` -> ``SIGUSR1`` (a signal a process can catch)."""
    import signal

    name = text.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a signal a process can catch (e.g. SIGTERM, SIGUSR1)")
    return name


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) when the iteration is a multiple of this; the schedule still "
                        "follows --train-iters, so a resumed run continues exactly (the same for the two below)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (after saving) once this many minutes have passed since the start (all ranks "
                        "agree each iteration)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal (to any rank) finish the iteration, save, and exit 0")
    g.add_argument("--exit-signal", type=_signal_name, default="SIGTERM",
                   help="the signal --exit-signal-handler catches, e.g. SIGUSR1 (default SIGTERM)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16 static loss scale (default dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--skip-nan-steps", action="store_true",
                   help="skip an update whose loss or gradient norm is NaN/inf (default: stop the run)")

    g = p.add_argument_group("optimizer and learning rate (Megatron semantics)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="default 0")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of decay iters")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=None,
                   help="gradient-norm clipping, 0 disables (default 1.0, or the --deepspeed-config's)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism and DeepSpeed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--pipeline-partition-method", default="uniform",
                   help="uniform (same layers per stage), parameters, or DeepSpeed's type:REGEX")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage (default 0, or the --deepspeed-config's)")
    g.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON; generated from the flags when absent, checked against them when given")
    g.add_argument("--deepspeed", action="store_true",
                   help="Megatron-DeepSpeed's switch to train with DeepSpeed, which this trainer always does: the "
                        "flag states what happens anyway")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default nccl with GPUs, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, dest="local_rank",
                   help="set by the deepspeed launcher (LOCAL_RANK is used when present)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="a prefix, or weights and prefixes: 0.7 A 0.3 B")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--data-cache-path", default=None, help="where the sample indices are cached")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic tokens and risk levels (benchmarks, tests); needs --vocab-size or a tokenizer")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    g.add_argument("--tokenizer-type", default=None,
                   help="SentencePieceTokenizer, HuggingFaceTokenizer, or NullTokenizer (with --vocab-size)")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size when there is no tokenizer (NullTokenizer, --mock-data)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--allow-missing-risk", action="store_true",
                   help="train a --data-path dataset that has no risk channel (PREFIX.risk.bin/.idx) as all level 0 "
                        "even though --risk-loss-policy treats levels differently (default: an error)")


def _add_loss_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("risk-aware loss")
    g.add_argument("--risk-loss-policy", default="ce",
                   help='LEVELS:MODE[@WEIGHT],... e.g. "0:ce,1:ce,2:ignore,3:unlikelihood", or ce|masked|unlikelihood')
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--z-loss", type=float, default=0.0, help="coefficient of logsumexp^2")
    g.add_argument("--fused-linear-ce", action="store_true",
                   help="compute the loss from hidden states and the output weight in chunks (no [N, V] logits)")
    g.add_argument("--loss-impl", choices=["auto", "kernel", "torch"], default="auto",
                   help="masked cross-entropy implementation (auto: the compiled kernel when built)")


def _add_checkpoint_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None,
                   help="checkpoint directory (its `latest`) or one checkpoint directory; model flags not given "
                        "are taken from the checkpoint, contradicting ones refused. No checkpoint there is an "
                        "error unless --load is also --save (a job that resumes itself: starts fresh, warned) "
                        "and --exit-on-missing-checkpoint is not given")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--save-retain-interval", type=int, default=None,
                   help="keep only the checkpoints whose iteration is a multiple of this, and the newest; older "
                        "ones are deleted after each save (a multiple of --save-interval)")
    g.add_argument("--keep-last-checkpoints", type=int, default=None, metavar="K",
                   help="keep the newest K checkpoints (and those --save-retain-interval keeps); older ones are "
                        "deleted after each save")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save no optimizer state (a later load then needs --no-load-optim or --finetune)")
    g.add_argument("--no-save-rng", action="store_true",
                   help="save no RNG states (a later load then needs --no-load-rng or --finetune)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load the optimizer state nor the LR schedule (both start afresh; the iteration and "
                        "data position continue)")
    g.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load only the weights; start at iteration 0 with a fresh optimizer, LR schedule, RNG and "
                        "data position")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load the checkpoint of this iteration from --load instead of the one `latest` names")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="--load naming no checkpoint is an error even when --load is also --save")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model settings from the checkpoint even over flags given (Megatron's forced set: "
                        "query groups, rotary base, untied embeddings, dropout, tokenizer), and --seq-length when "
                        "absent")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="validation batches per evaluation (0: none)")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None, help="append one JSON line per logged iteration here")
    g.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar even on a terminal")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU (default: looked up from the GPU name)")


def build_parser() -> argparse.ArgumentParser:
    p = _RaisingParser(
        prog="python -m megatron_slung.pretrain",
        description="Risk-aware GPT pretraining (Megatron flags, DeepSpeed engine).",
        allow_abbrev=False,
    )
    p.add_argument("--config", default=None, help="YAML or JSON file holding flags (the command line wins)")
    _add_model_args(p)
    _add_training_args(p)
    _add_parallel_args(p)
    _add_data_args(p)
    _add_loss_args(p)
    _add_checkpoint_logging_args(p)
    _add_async_save_args(p)
    return p


def _add_async_save_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("asynchronous checkpoint saving")
    g.add_argument("--async-save", action="store_true",
                   help="the training loop stops only to copy the checkpoint to host memory; a background thread "
                        "writes the files (as atomically: `latest` names only complete checkpoints), a second save "
                        "waits for the first, and the run ends only once the last one is on disk")


def _validate_async_save(args: argparse.Namespace) -> None:
    if args.async_save and args.save is None:
        _fail("--async-save needs --save DIR")


# --------------------------------------------------------------------------- config files
def _load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ArgumentError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError / yaml.YAMLError carry the line
        raise ArgumentError(f"--config {path}: cannot parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {path}: must hold a mapping of flag names to values")
    return data


def config_to_argv(config: dict, parser: argparse.ArgumentParser, source: str) -> List[str]:
    """Turn ``{"num-layers": 2, "bf16": true, "data-path": [...]}`` into command-line tokens."""
    by_flag = {}
    for action in parser._actions:
        for opt in action.option_strings:
            by_flag[opt.lstrip("-").replace("_", "-")] = (opt, action)
    argv: List[str] = []
    for key, value in config.items():
        name = str(key).lstrip("-").replace("_", "-")
        if name == "config":
            raise ArgumentError(f"{source}: a config file cannot name another config file")
        if name not in by_flag:
            raise ArgumentError(f"{source}: unknown flag {key!r}")
        opt, action = by_flag[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ArgumentError(f"{source}: {key!r} is a switch; give true or false, not {value!r}")
            if value:
                argv.append(opt)
            continue
        if value is None:
            continue
        if action.nargs in ("*", "+"):
            values = value if isinstance(value, list) else str(value).split()
            argv += [opt] + [str(v) for v in values]
        else:
            if isinstance(value, (list, dict)):
                raise ArgumentError(f"{source}: {key!r} takes one value, got {value!r}")
            argv += [opt, str(value)]
    return argv


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
               validate: bool = True) -> argparse.Namespace:
    """Parse (config file, then command line) and, by default, validate for ``world_size`` ranks."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    tokens: List[str] = []
    if known.config:
        source = f"--config {known.config}"
        tokens = config_to_argv(_load_config_file(known.config), parser, source)
        build_parser_with_prefix = build_parser()
        build_parser_with_prefix.error_prefix = f"{source}: "
        build_parser_with_prefix.parse_args(tokens)  # errors name the file
    args = parser.parse_args(tokens + argv)
    args.explicit_flags = explicit_flags(tokens + argv)
    if validate:
        if args.load:  # before the model flags are checked: those not given come from the checkpoint
            from megatron_slung.training.checkpointing import resolve_load

            args.load_metadata, args.load_notes = resolve_load(args, args.explicit_flags)
        else:
            args.load_metadata, args.load_notes = None, []
        validate_args(args, world_size=world_size)
    return args


def explicit_flags(tokens: Sequence[str]) -> frozenset:
    """The destinations the user set (on the command line or in the config file), as opposed to defaults."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # absent flags then leave no attribute
    return frozenset(vars(probe.parse_args(list(tokens))))


# --------------------------------------------------------------------------- validation
def world_size_from_env() -> int:
    """WORLD_SIZE (torchrun, deepspeed), else SLURM_NTASKS (srun), else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def _fail(msg: str) -> None:
    raise ArgumentError(msg)


def _require(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            _fail(f"--{name.replace('_', '-')} is required")


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check the flags for ``world_size`` ranks and fill in the derived values (in place; returns args)."""
    world_size = world_size_from_env() if world_size is None else int(world_size)
    args.world_size = world_size
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
             "train_iters", "lr")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "log_interval"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_iters < 0:
        _fail(f"--train-iters must be >= 0, got {args.train_iters}")

    # ---- parallel layout
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        _fail(f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
              f"--pipeline-model-parallel-size ({pp}) = {tp * pp}")
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    if args.sequence_parallel and tp == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; turning it off")
        args.sequence_parallel = False

    # ---- model shape
    _validate_model_shape(args, tp, pp)

    # ---- batch
    mbs = args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    gbs = args.global_batch_size
    if gbs < 1 or gbs % (mbs * dp) != 0:
        _fail(f"--global-batch-size ({gbs}) is not divisible by --micro-batch-size ({mbs}) x data-parallel "
              f"size ({dp}) = {mbs * dp} (data-parallel size = world size {world_size} / (TP {tp} x PP {pp}))")
    args.gradient_accumulation_steps = gbs // (mbs * dp)

    # ---- precision and DeepSpeed
    if args.fp16 and args.bf16:
        _fail("--fp16 and --bf16 cannot be used together")
    args.params_dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    if args.deepspeed_config is not None and not os.path.isfile(args.deepspeed_config):
        _fail(f"--deepspeed-config {args.deepspeed_config}: no such file")
    # The JSON may set the stage; check_user_config in deepspeed_config.py reconciles and re-checks.
    if args.zero_stage is None:
        args.zero_stage = 0
        if args.deepspeed_config is not None:
            from megatron_slung.training.deepspeed_config import read_json_config

            stage = read_json_config(args.deepspeed_config).get("zero_optimization", {}).get("stage")
            if stage is not None:
                args.zero_stage = int(stage)
    if args.zero_stage > 1 and pp > 1:
        _fail(f"ZeRO stage {args.zero_stage} cannot be combined with pipeline parallelism "
              f"(--pipeline-model-parallel-size {pp}); DeepSpeed allows ZeRO 0 or 1 with pipelines")
    if args.fused_linear_ce and pp > 1:
        _fail("--fused-linear-ce is not supported with pipeline parallelism (the last stage computes logits)")
    if args.fused_linear_ce and args.zero_stage == 3:
        _fail("--fused-linear-ce is not supported with ZeRO stage 3 (the loss reads the output weight outside the "
              "model's forward, where ZeRO-3 has released it); use ZeRO 0-2")

    # ---- learning rate (Megatron's defaults and checks)
    if args.lr < 0 or args.min_lr < 0:
        _fail("--lr and --min-lr must be >= 0")
    if args.min_lr > args.lr:
        _fail(f"--min-lr ({args.min_lr}) is larger than --lr ({args.lr})")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        _fail("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if args.lr_warmup_fraction is not None:
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            _fail(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = 0
    if args.lr_warmup_iters < 0:
        _fail(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    if args.lr_decay_style != "constant" and args.lr_warmup_iters > args.lr_decay_iters:
        _fail(f"--lr-warmup-iters ({args.lr_warmup_iters}) is larger than --lr-decay-iters ({args.lr_decay_iters})")
    if args.clip_grad is not None and args.clip_grad < 0:
        _fail(f"--clip-grad must be >= 0 (0 disables), got {args.clip_grad}")

    # ---- loss
    try:
        LossPolicy.parse(args.risk_loss_policy)
    except ValueError as e:
        _fail(f"--risk-loss-policy: {e}")
    if not 0.0 <= args.label_smoothing < 1.0:
        _fail(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.z_loss < 0:
        _fail(f"--z-loss must be >= 0, got {args.z_loss}")

    # ---- data and tokenizer
    if args.mock_data and args.data_path:
        _fail("give --data-path or --mock-data, not both")
    if not args.mock_data and not args.data_path:
        _fail("give --data-path PREFIX (a preprocessed dataset) or --mock-data (synthetic tokens)")
    if args.data_path:
        _check_data_path(args.data_path)
    _check_split(args.split)
    if args.tokenizer_type is None:
        if args.vocab_size is None:
            _fail("give --tokenizer-type and --tokenizer-model, or --vocab-size (NullTokenizer)")
        args.tokenizer_type = "NullTokenizer"
    elif args.tokenizer_type != "NullTokenizer" and args.tokenizer_model is None:
        _fail(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    if args.tokenizer_type == "NullTokenizer" and (args.vocab_size is None or args.vocab_size < 2):
        _fail("NullTokenizer needs --vocab-size >= 2")
    if args.make_vocab_size_divisible_by < 1:
        _fail("--make-vocab-size-divisible-by must be >= 1")
    if args.num_workers < 0:
        _fail("--num-workers must be >= 0")

    # ---- checkpoints, evaluation
    for name in ("save_interval", "eval_interval", "exit_interval"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_iters < 0:
        _fail("--eval-iters must be >= 0")
    if args.save_interval is not None and args.save is None:
        _fail("--save-interval needs --save DIR")
    for name in ("save_retain_interval", "keep_last_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if value is not None and args.save is None:
            _fail(f"--{name.replace('_', '-')} needs --save DIR")
    if args.save_retain_interval is not None:  # Megatron's rule: retained iterations are saved ones
        if args.save_interval is None or args.save_retain_interval % args.save_interval != 0:
            _fail(f"--save-retain-interval ({args.save_retain_interval}) must be a multiple of --save-interval "
                  f"({args.save_interval})")
    if args.no_save_optim and args.zero_stage == 3:
        _fail("--no-save-optim cannot be used with ZeRO stage 3: its weights are saved in the optimizer's files")
    if args.ckpt_step is not None and args.ckpt_step < 0:
        _fail(f"--ckpt-step must be >= 0, got {args.ckpt_step}")
    for name in ("ckpt_step", "use_checkpoint_args", "exit_on_missing_checkpoint"):
        if getattr(args, name) not in (None, False) and args.load is None:
            _fail(f"--{name.replace('_', '-')} needs --load")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        _fail(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if "exit_signal" in getattr(args, "explicit_flags", ()) and not args.exit_signal_handler:
        _fail(f"--exit-signal {args.exit_signal} has no effect without --exit-signal-handler")

    _validate_async_save(args)

    # ---- the DeepSpeed config (generated, or the user's checked against everything above)
    from megatron_slung.training.deepspeed_config import resolve_deepspeed_config

    args.deepspeed_config_dict = resolve_deepspeed_config(args)
    return args


def _validate_model_shape(args: argparse.Namespace, tp: int, pp: int) -> None:
    """Megatron's derived model values (query groups, head dimension, MLP size) and the shape checks."""
    heads = args.num_attention_heads
    explicit = getattr(args, "explicit_flags", None)
    if args.use_rotary_position_embeddings:
        if explicit is not None and "position_embedding_type" in explicit and args.position_embedding_type != "rope":
            _fail(f"--use-rotary-position-embeddings contradicts --position-embedding-type {args.position_embedding_type}")
        args.position_embedding_type = "rope"
    # Grouped-query attention only with --group-query-attention, as in Megatron; there --num-query-groups
    # without it is read by nothing, which here is refused rather than ignored.
    groups = args.num_query_groups
    given = groups is not None and (explicit is None or "num_query_groups" in explicit)
    if args.group_query_attention:
        groups = 1 if groups is None else groups
    elif given:
        if groups != heads:
            _fail(f"--num-query-groups {groups} needs --group-query-attention (without it Megatron ignores "
                  f"--num-query-groups and builds {heads} key/value heads); add --group-query-attention")
    elif groups is not None:  # adopted from the checkpoint of --load: its model has grouped-query attention
        args.group_query_attention = groups != heads
    else:
        groups = heads
    args.num_query_groups = groups
    if groups < 1 or heads % groups != 0:
        _fail(f"--num-attention-heads ({heads}) must be a multiple of --num-query-groups ({groups})")
    if heads % tp != 0:
        _fail(f"--num-attention-heads ({heads}) is not divisible by --tensor-model-parallel-size ({tp})")
    if groups % tp != 0:
        _fail(f"--num-query-groups ({groups}) is not divisible by --tensor-model-parallel-size ({tp})")
    if args.kv_channels is None:
        if args.hidden_size % heads != 0:
            _fail(f"--hidden-size ({args.hidden_size}) is not divisible by --num-attention-heads ({heads}); "
                  "give --kv-channels to set the head dimension")
        args.kv_channels = args.hidden_size // heads
    if args.kv_channels < 1:
        _fail(f"--kv-channels must be >= 1, got {args.kv_channels}")
    if args.position_embedding_type == "rope":
        if not 0.0 < args.rotary_percent <= 1.0:
            _fail(f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")
        rotary_dim = int(args.kv_channels * args.rotary_percent)
        if rotary_dim < 2 or rotary_dim % 2 != 0:
            _fail(f"the rotary dimension int(head dimension {args.kv_channels} x --rotary-percent "
                  f"{args.rotary_percent}) = {rotary_dim} must be even and >= 2")
    elif args.rotary_percent != 1.0:
        _fail(f"--rotary-percent {args.rotary_percent} has no effect with --position-embedding-type "
              f"{args.position_embedding_type}; add --position-embedding-type rope")
    if args.swiglu and args.openai_gelu:
        _fail("--openai-gelu (a GeLU MLP) and --swiglu (a SiLU-gated MLP) exclude each other")
    if args.ffn_hidden_size is None:
        if args.swiglu:  # Megatron: 2/3 of 4h (two input matrices), rounded down to a multiple of 64
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
            if args.ffn_hidden_size < 1:
                _fail(f"--swiglu at --hidden-size {args.hidden_size}: Megatron's default MLP size int(4 x hidden "
                      "x 2/3 / 64) x 64 is 0; give --ffn-hidden-size")
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    if args.ffn_hidden_size < 1:
        _fail(f"--ffn-hidden-size must be >= 1, got {args.ffn_hidden_size}")
    if args.ffn_hidden_size % tp != 0:
        _fail(f"--ffn-hidden-size ({args.ffn_hidden_size}) is not divisible by --tensor-model-parallel-size ({tp})")
    if args.num_layers % pp != 0:
        _fail(f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        _fail(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings ({args.max_position_embeddings})")
    if args.sequence_parallel and args.seq_length % tp != 0:
        _fail(f"--sequence-parallel needs --seq-length ({args.seq_length}) divisible by "
              f"--tensor-model-parallel-size ({tp})")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            _fail(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")


def _check_data_path(paths: List[str]) -> None:
    if len(paths) == 1:
        return
    if len(paths) % 2 != 0:
        _fail(f"--data-path: a blend is weight/prefix pairs (0.7 A 0.3 B); got {len(paths)} items")
    for weight in paths[0::2]:
        try:
            value = float(weight)
        except ValueError:
            _fail(f"--data-path: {weight!r} is not a weight (a blend is weight/prefix pairs: 0.7 A 0.3 B)")
        if not value >= 0:
            _fail(f"--data-path: weight {weight} must be >= 0")


def _check_split(split: str) -> None:
    parts = [s for s in split.replace("/", ",").split(",") if s.strip()]
    try:
        values = [float(s) for s in parts]
    except ValueError:
        _fail(f"--split {split!r}: expected proportions like 969,30,1")
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        _fail(f"--split {split!r}: expected up to three non-negative proportions like 969,30,1")


# Attributes parse_args adds for this process only (not settings of the run): not saved.
NOT_SAVED = frozenset({"explicit_flags", "load_metadata", "load_notes"})


def args_to_dict(args: argparse.Namespace) -> dict:
    """The namespace as plain JSON-able values (saved with checkpoints and logged)."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in NOT_SAVED:
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = json.loads(json.dumps(value, default=str))
        elif isinstance(value, (list, tuple)):
            out[key] = [v if isinstance(v, (bool, int, float, str)) else str(v) for v in value]
        else:
            out[key] = str(value)
    return out
