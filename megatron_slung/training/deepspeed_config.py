"""The DeepSpeed JSON config: generated from the flags, or the user's file checked against them.

Who does what (the decision, and why):

* **Batch sizes and precision come from the flags.** ``train_batch_size`` = ``--global-batch-size``,
  ``train_micro_batch_size_per_gpu`` = ``--micro-batch-size``, ``gradient_accumulation_steps`` =
  global / (micro x data-parallel size), ``bf16`` / ``fp16`` from ``--bf16`` / ``--fp16``. A user JSON may
  repeat them but must agree; a disagreement is an error naming the file and key.
* **ZeRO stage and gradient clipping** come from ``--zero-stage`` / ``--clip-grad``, or from the JSON
  when the flag is not given; both given and different is an error.
* **The optimizer and the LR schedule are ours, not DeepSpeed's.** The trainer builds
  ``torch.optim.AdamW`` with Megatron's parameter groups (no weight decay on 1-D parameters: norms,
  biases) and passes it to ``deepspeed.initialize(optimizer=...)``; the schedule
  (``schedules.LRScheduler``, Megatron's warmup + decay semantics) is passed as ``lr_scheduler=``, so
  DeepSpeed steps it only after an update that was applied (an fp16 overflow skips both) and saves it in
  its checkpoints. A JSON with an ``optimizer`` or ``scheduler`` section is rejected: the flags would
  silently lose. Everything else in a user's JSON (bucket sizes, offload, communication settings,
  ``pipeline`` options...) is passed through untouched.
* Megatron's ``--use-distributed-optimizer`` is ZeRO stage 1 (the optimizer state sharded over the
  data-parallel ranks); ``--overlap-grad-reduce`` is ``zero_optimization.overlap_comm`` (refused where DeepSpeed
  would not overlap: ZeRO 0, pipelines, bf16 ZeRO-1 with fp32 accumulation); ``--overlap-param-gather`` is ZeRO
  3's parameter prefetch (refused at ZeRO 1/2). See ``arguments.check_overlap_settings``.
* ``steps_per_print`` is set very high: the trainer logs itself (see ``logging.py``).
* bf16 with ZeRO 1 uses fp32 gradient accumulation (``data_types.grad_accum_dtype``: DeepSpeed's
  ``BF16_Optimizer``, the recommended setting with pipelines); bf16 with ZeRO 0 keeps DeepSpeed's default
  (bf16 gradients, fp32 master weights).
* With sequence parallelism and pipelines, DeepSpeed's partitioning of the activations sent between
  stages across TP ranks is turned off (``pipeline.pipe_partitioned`` / ``grad_partitioned``): it assumes the
  activations are identical on every TP rank, which sequence-parallel shards are not.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from typing import Any, Dict

from megatron_slung.training.arguments import ArgumentError

STEPS_PER_PRINT = 2**30  # DeepSpeed's own periodic print, effectively off


def read_json_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ArgumentError(f"--deepspeed-config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ArgumentError(f"--deepspeed-config {path}: line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--deepspeed-config {path}: must hold a JSON object")
    return data


def _precision_sections(args) -> Dict[str, Any]:
    fp16 = {"enabled": bool(args.fp16)}
    if args.fp16:
        fp16.update(
            loss_scale=0 if args.loss_scale is None else args.loss_scale,  # 0 = dynamic
            initial_scale_power=int(round(math.log2(args.initial_loss_scale))),
            loss_scale_window=args.loss_scale_window,
            hysteresis=args.hysteresis,
            min_loss_scale=args.min_loss_scale,
        )
    return {"bf16": {"enabled": bool(args.bf16)}, "fp16": fp16}


def _grad_reduce_section(args: argparse.Namespace) -> Dict[str, Any]:
    """--grad-reduce-in-bf16 (Megatron: gradients accumulated and all-reduced in bf16, not fp32): DeepSpeed's
    ``communication_data_type``; at ZeRO 1 the fp32 accumulation above is dropped too."""
    return {"communication_data_type": "bf16"} if getattr(args, "grad_reduce_in_bf16", False) else {}


def build_deepspeed_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The DeepSpeed config for validated ``args`` (see the module docstring for what comes from where)."""
    config: Dict[str, Any] = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": float(args.clip_grad if args.clip_grad is not None else 1.0),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": int(args.zero_stage)},
    }
    config.update(_precision_sections(args))
    if args.bf16 and args.zero_stage == 1 and not getattr(args, "grad_reduce_in_bf16", False):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    config.update(_grad_reduce_section(args))
    if args.pipeline_model_parallel_size > 1 and args.sequence_parallel:
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config


def _enabled(section: Any) -> bool:
    return bool(section.get("enabled", False)) if isinstance(section, dict) else bool(section)


def check_user_config(user: Dict[str, Any], args: argparse.Namespace, source: str) -> Dict[str, Any]:
    """The user's JSON, checked against the flags, with the values the flags imply filled in."""
    config = copy.deepcopy(user)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ArgumentError(
                f"{source}: remove the {section!r} section; the trainer builds the optimizer (AdamW) and the "
                "learning-rate schedule from --lr, --min-lr, --lr-decay-style, --lr-warmup-iters, "
                "--weight-decay, --adam-beta1/2 ..."
            )
    expected = {
        "train_batch_size": (args.global_batch_size, "--global-batch-size"),
        "train_micro_batch_size_per_gpu": (args.micro_batch_size, "--micro-batch-size"),
        "gradient_accumulation_steps": (
            args.gradient_accumulation_steps,
            f"--global-batch-size / (--micro-batch-size x data-parallel size {args.data_parallel_size})",
        ),
    }
    for key, (value, flag) in expected.items():
        if key in config and config[key] not in (value, "auto"):
            raise ArgumentError(f"{source}: {key} = {config[key]!r} disagrees with {flag} = {value}")
        config[key] = value

    stage = config.get("zero_optimization", {}).get("stage")
    if stage is not None and int(stage) != args.zero_stage:
        raise ArgumentError(f"{source}: zero_optimization.stage = {stage} disagrees with --zero-stage {args.zero_stage}")
    config.setdefault("zero_optimization", {})["stage"] = int(args.zero_stage)

    clip = config.get("gradient_clipping")
    if args.clip_grad is None:
        args.clip_grad = float(clip) if clip is not None else 1.0
    elif clip is not None and float(clip) != float(args.clip_grad):
        raise ArgumentError(f"{source}: gradient_clipping = {clip} disagrees with --clip-grad {args.clip_grad}")
    config["gradient_clipping"] = float(args.clip_grad)

    bf16 = _enabled(config.get("bf16", config.get("bfloat16", {})))
    fp16 = _enabled(config.get("fp16", {}))
    if bf16 != bool(args.bf16):
        raise ArgumentError(f"{source}: bf16.enabled = {bf16} disagrees with --bf16 ({'given' if args.bf16 else 'not given'})")
    if fp16 != bool(args.fp16):
        raise ArgumentError(f"{source}: fp16.enabled = {fp16} disagrees with --fp16 ({'given' if args.fp16 else 'not given'})")
    generated = _precision_sections(args)
    if "bfloat16" not in config:
        config.setdefault("bf16", generated["bf16"])
    if args.fp16:
        for key, value in generated["fp16"].items():
            config["fp16"].setdefault(key, value)
    else:
        config.setdefault("fp16", generated["fp16"])
    if args.bf16 and args.zero_stage == 1 and not getattr(args, "grad_reduce_in_bf16", False):
        config.setdefault("data_types", {"grad_accum_dtype": "fp32"})
    for key, value in _grad_reduce_section(args).items():
        if config.get(key, value) != value:
            raise ArgumentError(f"{source}: {key} = {config[key]!r} disagrees with --grad-reduce-in-bf16")
        config[key] = value
    if args.pipeline_model_parallel_size > 1 and args.sequence_parallel:
        pipe = config.setdefault("pipeline", {})
        if pipe.get("pipe_partitioned") or pipe.get("grad_partitioned"):
            raise ArgumentError(f"{source}: pipeline.pipe_partitioned/grad_partitioned cannot be true with "
                                "--sequence-parallel (sequence-parallel activations differ across TP ranks)")
        pipe.update(pipe_partitioned=False, grad_partitioned=False)
    config.setdefault("steps_per_print", STEPS_PER_PRINT)
    return config


def resolve_deepspeed_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The config DeepSpeed gets: generated from ``args``, or ``--deepspeed-config`` checked against it."""
    from megatron_slung.training.arguments import check_overlap_settings

    if args.deepspeed_config is None:
        if args.clip_grad is None:
            args.clip_grad = 1.0
        config = build_deepspeed_config(args)
        check_overlap_settings(args, config, "the generated DeepSpeed config")
        return config
    path = args.deepspeed_config
    config = check_user_config(read_json_config(path), args, f"--deepspeed-config {path}")
    check_overlap_settings(args, config, f"--deepspeed-config {path}")
    return config
