"""The pretraining job: ``python -m megatron_slung.pretrain [Megatron flags]``.

    check the inputs (tokenizer, data paths, token ids against the vocabulary, risk channels; from the files,
    before anything is initialised: ``training/data.py: check_inputs``)
    -> initialise (torch.distributed, model-parallel groups, seeds)
    -> datasets, model (GPTModel on a DeepSpeed engine, or a PipelineModule when PP > 1)
    -> optionally load a checkpoint -> train (evaluate, save) -> save at the end

Loss normalisation over the global batch. The loss of one optimizer step is

    L = (sum of the per-token losses over the whole global batch) / N,
    N = tokens that carry loss in the global batch (label kept and the level's mode is not ``ignore``),

not a mean of per-micro-batch or per-rank means (those weight tokens unequally when masking leaves
micro-batches with different counts). N depends only on the data (labels, loss mask, risk levels and the
policy), so before the step each rank counts it over its GAS micro-batches and the counts are summed over the
data-parallel group. DeepSpeed then divides each micro-batch's loss by GAS before ``backward`` and averages
the gradients over the DP ranks, so the gradient it applies is

    (1 / DP) sum_ranks (1 / GAS) sum_micro grad(l_micro)

If each micro-batch returns l_micro = S_micro * GAS * DP / N (S_micro = its summed per-token loss), that is
(1 / N) sum_ranks sum_micro grad(S_micro) = grad(L): exactly the global-batch normalisation.
(``model.pipeline.loss_scale_for_global_batch`` is that factor; the pipeline's loss function applies it on
the last stage, and the plain path below applies it itself.) A global batch with no loss-carrying token gets
factor 0: no gradient. TP ranks compute identical losses (the vocab-parallel loss is reduced over TP), so
they need no extra scaling.
"""

from __future__ import annotations

import datetime

import math
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_slung.data.risk import NUM_LEVELS
from megatron_slung.loss.policy import LossPolicy
from megatron_slung.training import checkpointing, documents
from megatron_slung.training.arguments import (
    ArgumentError,
    args_to_dict,
    batch_size_schedule,
    parse_args,
    world_size_from_env,
)
from megatron_slung.training.async_save import AsyncSaveError
from megatron_slung.training.data import (
    IGNORE_INDEX,
    CheckedInputs,
    CyclicLoader,
    DataExhausted,
    build_datasets,
    build_loader,
    build_tokenizer_for_args,
    check_inputs,
    count_loss_tokens,
    next_micro_batches,
    to_micro_batch,
)
from megatron_slung.training.exit_conditions import ExitConditions
from megatron_slung.training.logging import NonFiniteLossError, StepStats, TrainingLogger
from megatron_slung.training.schedules import LRScheduler


# --------------------------------------------------------------------------- model and engine
def gpt_config_from_args(args, padded_vocab_size: int):
    from megatron_slung.model.gpt import GPTConfig

    return GPTConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, vocab_size=padded_vocab_size,
        max_position_embeddings=args.max_position_embeddings, rotary_base=args.rotary_base,
        norm_epsilon=args.norm_epsilon, init_method_std=args.init_method_std, init_seed=args.seed,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        sequence_parallel=args.sequence_parallel, recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        normalization=args.normalization, apply_layernorm_1p=args.apply_layernorm_1p,
        qk_layernorm=args.qk_layernorm, swiglu=args.swiglu, openai_gelu=args.openai_gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        attention_backend=args.attention_backend,
    )


def embedding_or_output_parameters(model: torch.nn.Module) -> set:
    """ids of the word-embedding and output-layer weights (Megatron's ``is_embedding_or_output_parameter``:
    not the position table), in a GPTModel or a pipeline stage."""
    from megatron_slung.model.pipeline import OutputLayerPipe
    from megatron_slung.parallel.layers import VocabParallelEmbedding

    ids = set()
    for module in model.modules():
        if isinstance(module, (VocabParallelEmbedding, OutputLayerPipe)):
            ids.add(id(module.weight))
    output = getattr(model, "output_layer", None)
    if isinstance(output, torch.nn.Module):
        ids.add(id(output.weight))
    return ids


def build_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with Megatron's groups: weight decay on matrices (``wd_mult`` 1), none on 1-D parameters (norm
    weights, biases: ``wd_mult`` 0); with ``--decoupled-lr`` the word embedding and output layer form their own
    group with that peak (``max_lr``) and ``--decoupled-min-lr`` (else ``--min-lr``). The scheduler sets each
    group's lr and weight decay before every update."""
    decay, no_decay, decoupled = [], [], []
    special = embedding_or_output_parameters(model) if args.decoupled_lr is not None else set()
    for p in model.parameters():
        if p.requires_grad:
            (decoupled if id(p) in special else no_decay if p.dim() < 2 else decay).append(p)
    decoupled_group = {"params": decoupled, "weight_decay": args.weight_decay, "wd_mult": 1.0}
    if args.decoupled_lr is not None:
        decoupled_group["max_lr"] = args.decoupled_lr
        decoupled_group["min_lr"] = args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr
    groups = [g for g in ({"params": decay, "weight_decay": args.weight_decay, "wd_mult": 1.0}, decoupled_group,
                          {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}) if g["params"]]
    kwargs = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


class StepGuard:
    """Lets the trainer veto an optimizer update (a NaN/inf loss or gradient norm) from inside DeepSpeed's step.

    DeepSpeed calls the basic optimizer's ``step`` (inside its ZeRO / mixed-precision wrappers, after
    gradient reduction, the norm and clipping). The guard replaces that method on the instance: it asks
    ``decide()`` for ``(loss_bad, grad_bad)`` and either runs the real step or does nothing, so the weights and
    the optimizer state stay untouched. ``decide`` may be a collective (every rank reaches the optimizer step
    at the same point); it runs once per update (``begin()`` resets it), because ZeRO 1/2 call the basic
    step once per parameter group and every group must get the same answer."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.decide = lambda: (False, False)
        self.before_step = None
        self.verdict = None  # (loss_bad, grad_bad) of this update, once decided
        self._original = optimizer.step

        def step(*a, **k):
            if self.verdict is None:
                if self.before_step is not None:
                    self.before_step()
                self.verdict = tuple(bool(v) for v in self.decide())
            if any(self.verdict):
                return None
            return self._original(*a, **k)

        optimizer.step = step

    def begin(self, decide) -> None:
        self.decide, self.verdict = decide, None

    @property
    def skipped(self) -> bool:
        return self.verdict is not None and any(self.verdict)


@dataclass
class Trainer:
    """Everything the loop needs (built by ``setup``)."""

    args: object
    device: torch.device
    engine: object
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    guard: StepGuard
    policy: LossPolicy
    pipeline: bool
    loads_data: bool
    dp_rank: int
    dp_size: int
    dp_group: object
    tp_group: object
    is_logging_rank: bool
    config: object
    tokenizer: object
    datasets: tuple
    grad_norm: Optional[float] = None
    grad_nonfinite: bool = False  # the last update's gradient norm was NaN/inf (so it was not applied)


def _num_parameters_note(config) -> str:
    total = config.num_parameters()
    return f"{total / 1e6:.2f}M parameters ({config.num_parameters(include_embeddings=False) / 1e6:.2f}M without embeddings)"


def setup(args, device: torch.device, tokenizer=None) -> Trainer:
    """Process groups, seeds, model, optimizer and DeepSpeed engine, datasets (``tokenizer``: the one
    ``check_inputs`` loaded, else built here)."""
    import deepspeed

    from megatron_slung.model.gpt import GPTModel, compile_transformer_layers
    from megatron_slung.parallel import state
    from megatron_slung.parallel.random import model_parallel_manual_seed

    if args.fp16 and device.type != "cuda":
        raise ArgumentError("--fp16 needs a CUDA GPU (DeepSpeed has no fp16 on the CPU); use --bf16 or fp32")
    state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                    timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    pp_rank = state.get_pipeline_model_parallel_rank()
    # Megatron's seeding: a different default seed per pipeline stage; the TP tracker offsets by TP rank.
    seed = args.seed + 100 * pp_rank
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed)

    if tokenizer is None:
        tokenizer = build_tokenizer_for_args(args)
    # With --load the vocabulary is the checkpoint's (its row count), and the config must be its model.
    load_metadata = getattr(args, "load_metadata", None)
    padded_vocab, note = checkpointing.resolve_padded_vocab(load_metadata, args, getattr(args, "explicit_flags", ()),
                                                            tokenizer.vocab_size)
    if note:
        _print_status(note)
    args.padded_vocab_size = padded_vocab
    config = gpt_config_from_args(args, padded_vocab)
    checkpointing.check_model_config(load_metadata, config)
    try:
        documents.check_attention(args, device, config)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    policy = LossPolicy.parse(args.risk_loss_policy)
    pipeline = args.pipeline_model_parallel_size > 1
    loss_kwargs = dict(label_smoothing=args.label_smoothing, z_loss=args.z_loss)

    if pipeline:
        from megatron_slung.model.pipeline import GPTPipelineModule, PipelineLoss

        loss_fn = PipelineLoss(policy, impl=args.loss_impl, **loss_kwargs)
        module = GPTPipelineModule(config, loss_fn=loss_fn, partition_method=args.pipeline_partition_method)
    else:
        module = GPTModel(config)
    if args.torch_compile:
        assert compile_transformer_layers(module) > 0
    optimizer = build_optimizer(module, args, device)
    scheduler = LRScheduler.from_args(optimizer, args)
    guard = StepGuard(optimizer)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=args.deepspeed_config_dict,
        mpu=None if pipeline else state,
    )
    _record_fp32_grad_norm(engine, guard)

    first, last = state.is_pipeline_first_stage(), state.is_pipeline_last_stage()
    trainer = Trainer(
        args=args, device=device, engine=engine, module=module, optimizer=optimizer, scheduler=scheduler,
        guard=guard, policy=policy, pipeline=pipeline, loads_data=first or last,
        dp_rank=state.get_data_parallel_rank(), dp_size=state.get_data_parallel_world_size(),
        dp_group=state.get_data_parallel_group(),
        tp_group=state.get_tensor_model_parallel_group() if args.tensor_model_parallel_size > 1 else None,
        is_logging_rank=rank == world - 1, config=config, tokenizer=tokenizer, datasets=(None, None, None),
    )
    trainer.datasets = build_datasets(args, tokenizer)  # collective: every rank calls it
    return trainer


def _record_fp32_grad_norm(engine, guard: StepGuard) -> None:
    """DeepSpeed's fp32 engine without ZeRO computes the gradient norm only to clip, and does not keep it;
    keep it for the logs (and compute it when clipping is off)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization():
        return

    def norm(max_norm):
        return float(clip_grad_norm_(parameters=engine.module.parameters(), max_norm=max_norm, mpu=engine.mpu))

    def clip():  # DeepSpeed calls this before the optimizer step when gradient_clipping > 0
        engine._global_grad_norm = norm(engine.gradient_clipping())

    engine.clip_fp32_gradients = clip
    if engine.gradient_clipping() == 0:
        guard.before_step = lambda: setattr(engine, "_global_grad_norm", norm(float("inf")))


# --------------------------------------------------------------------------- one step
def _masked_ce(trainer: Trainer, output, labels, risk):
    from megatron_slung.loss import masked_cross_entropy

    args = trainer.args
    kwargs = dict(ignore_index=IGNORE_INDEX, label_smoothing=args.label_smoothing, z_loss=args.z_loss,
                  tp_group=trainer.tp_group, impl=args.loss_impl)
    if args.fused_linear_ce:
        from megatron_slung.loss import fused_linear_masked_cross_entropy

        hidden, weight = output
        return fused_linear_masked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                                 risk.reshape(-1), trainer.policy, **kwargs)
    return masked_cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1), risk.reshape(-1),
                                trainer.policy, **kwargs)


def _empty_stats(device) -> torch.Tensor:
    """[loss_sum, num_tokens, level_count x 256, level_ce_sum x 256] in float64 (one all-reduce)."""
    return torch.zeros(2 + 2 * NUM_LEVELS, dtype=torch.float64, device=device)


def _add_stats(stats: torch.Tensor, loss_sum, num_tokens, level_count, level_ce_sum) -> None:
    stats[0] += loss_sum.detach().double().reshape(())
    stats[1] += num_tokens.detach().double().reshape(())
    stats[2:2 + NUM_LEVELS] += level_count.detach().double()
    stats[2 + NUM_LEVELS:] += level_ce_sum.detach().double()


def _comm_device(trainer: Trainer) -> torch.device:
    return trainer.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def global_loss_tokens(trainer: Trainer, micro_batches) -> int:
    """N: loss-carrying tokens of the whole global batch (this rank's micro-batches, summed over DP)."""
    n = torch.tensor([float(sum(count_loss_tokens(mb, trainer.policy) for mb in micro_batches))],
                     dtype=torch.float64, device=_comm_device(trainer))
    return int(_all_reduce(n, trainer.dp_group).item())


def loss_scale(n_global: int, trainer: Trainer) -> float:
    from megatron_slung.model.pipeline import loss_scale_for_global_batch

    # The engine's current GAS (it changes during a batch-size ramp-up): DeepSpeed divides each loss by it.
    return loss_scale_for_global_batch(n_global, trainer.engine.gradient_accumulation_steps(), trainer.dp_size)


def _nonfinite(stats: Optional[torch.Tensor]) -> bool:
    return stats is not None and not bool(torch.isfinite(stats[0]).item())


def _grad_norm_before_update(trainer: Trainer) -> Optional[float]:
    """The global gradient norm of the update being applied, as DeepSpeed computed it just before calling the
    basic optimizer's step: its ZeRO and bf16 optimizers keep it as ``_global_grad_norm``; the fp32 engine
    without ZeRO gets it from ``_record_fp32_grad_norm``. None when DeepSpeed computes none (ZeRO 1/2 with
    the norm disabled)."""
    engine = trainer.engine
    wrapper = engine.optimizer
    norm = getattr(wrapper, "_global_grad_norm", None) if wrapper is not trainer.optimizer else None
    if norm is None:
        norm = getattr(engine, "_global_grad_norm", None)
    return None if norm is None else float(norm)


def _decide_update(trainer: Trainer, loss_bad: bool) -> tuple:
    """(loss_bad, grad_bad), the same on every rank: called inside DeepSpeed's optimizer step, which every rank
    reaches together."""
    norm = _grad_norm_before_update(trainer)
    flags = torch.tensor([float(loss_bad), float(norm is not None and not math.isfinite(norm))],
                         device=_comm_device(trainer))
    _all_reduce(flags, None, op=dist.ReduceOp.MAX)
    return bool(flags[0].item() > 0), bool(flags[1].item() > 0)


def train_step(trainer: Trainer, micro_batches) -> tuple:
    """One optimizer step over this rank's GAS micro-batches; returns (stats or None, skipped, lr).

    An update whose global loss or gradient norm is NaN/inf is never applied: the guard vetoes it inside
    DeepSpeed's step, or DeepSpeed's own overflow check drops it first (ZeRO 1-3 and bf16 drop a step with a
    NaN/inf norm before the basic step). Afterwards ``trainer.grad_nonfinite`` says whether the gradient norm
    was NaN/inf; the loop stops the run or skips on (``--skip-nan-steps``). fp16 is different: there an
    overflow is the dynamic loss scaler's routine signal to lower the scale, so DeepSpeed's skip is only a
    skipped iteration."""
    args, engine = trainer.args, trainer.engine
    lr = trainer.scheduler.apply()
    comm = _comm_device(trainer)
    if trainer.pipeline:
        module = trainer.module
        if trainer.loads_data:
            module.set_loss_scale(loss_scale(global_loss_tokens(trainer, micro_batches), trainer))

        def decide():  # inside DeepSpeed's optimizer step, on every rank: any non-finite loss on a last stage
            stats = getattr(module.loss_fn, "_stats", None)
            return _decide_update(trainer, stats is not None and not math.isfinite(float(stats["loss_sum"])))

        trainer.guard.begin(decide)
        batches = ([(documents.pipeline_inputs(args, trainer.tokenizer.eod, mb.tokens), (mb.labels, mb.risk))
                    for mb in micro_batches] if trainer.loads_data else None)
        engine.train_batch(iter(batches) if batches is not None else None)
        raw = module.loss_fn.pop_stats()
        stats = None
        if raw is not None:  # last stage
            stats = _empty_stats(comm)
            _add_stats(stats, raw["loss_sum"].to(comm), raw["num_tokens"].to(comm), raw["level_count"].to(comm),
                       raw["level_ce_sum"].to(comm))
            _all_reduce(stats, trainer.dp_group)
    else:
        scale = loss_scale(global_loss_tokens(trainer, micro_batches), trainer)
        stats = _empty_stats(comm)
        trainer.guard.begin(lambda: _decide_update(trainer, _nonfinite(stats)))
        for j, mb in enumerate(micro_batches):
            # The boundary said explicitly: DeepSpeed's own count (micro steps mod GAS) breaks when GAS changes.
            engine.set_gradient_accumulation_boundary(j == len(micro_batches) - 1)
            mb = mb.to(trainer.device)
            inputs = documents.model_inputs(args, trainer.tokenizer.eod, mb.tokens)
            output = engine(mb.tokens, return_hidden=True, **inputs) if args.fused_linear_ce else engine(mb.tokens, **inputs)
            out = _masked_ce(trainer, output, mb.labels, mb.risk)
            engine.backward(out.loss_sum * scale)
            _add_stats(stats, out.loss_sum.to(comm), out.num_tokens.to(comm), out.level_count.to(comm),
                       out.level_ce_sum.to(comm))
            if j == len(micro_batches) - 1:
                _all_reduce(stats, trainer.dp_group)  # the whole global batch, before the update
            engine.step()
    dropped_by_deepspeed = not engine.was_step_applied()  # its overflow check (ZeRO, bf16, fp16 loss scaling)
    verdict = trainer.guard.verdict or (False, False)
    trainer.grad_nonfinite = verdict[1] or (dropped_by_deepspeed and not args.fp16)
    skipped = trainer.guard.skipped or dropped_by_deepspeed
    trainer.guard.verdict = None
    if not skipped:  # Megatron's schedule counts samples: this update's global batch
        trainer.scheduler.step(engine.train_batch_size())
    norm = engine.get_global_grad_norm()
    trainer.grad_norm = None if norm is None else float(norm)
    return stats, skipped, lr


def set_global_batch_size(trainer: Trainer, global_batch_size: int) -> bool:
    """Give the engine ``global_batch_size`` (more or fewer micro-batches per step, the micro-batch kept);
    True when it changed. DeepSpeed's engines, the pipeline's included, resize their accumulation with
    ``set_train_batch_size``."""
    engine = trainer.engine
    if engine.train_batch_size() == global_batch_size:
        return False
    engine.set_train_batch_size(global_batch_size)
    _print_status(f"global batch size {global_batch_size} ({engine.gradient_accumulation_steps()} micro-batches "
                  "per data-parallel rank; " + ("--step-batch-size-schedule)" if trainer.args.step_batch_size_schedule
                                                    else "--rampup-batch-size)"))
    return True


def _stats_to_step(stats: torch.Tensor, lr: float, grad_norm, skipped: bool) -> StepStats:
    stats = stats.cpu()
    n = int(stats[1].item())
    loss = float(stats[0].item()) / n if n > 0 else 0.0
    return StepStats(loss=loss, num_tokens=n, level_count=stats[2:2 + NUM_LEVELS],
                     level_ce_sum=stats[2 + NUM_LEVELS:], lr=lr, grad_norm=grad_norm, skipped=skipped)


# --------------------------------------------------------------------------- evaluation
def evaluate(trainer: Trainer, loader, num_batches: int) -> Optional[torch.Tensor]:
    """Summed stats over ``num_batches`` global batches (on the ranks that have them, else None)."""
    args, engine = trainer.args, trainer.engine
    comm = _comm_device(trainer)
    stats = _empty_stats(comm)
    have = False
    for _ in range(num_batches):
        micro = ([to_micro_batch(s) for s in next_micro_batches(loader, args.gradient_accumulation_steps, "validation")]
                 if trainer.loads_data else None)
        if trainer.pipeline:
            trainer.module.set_loss_scale(None)
            data = (iter([(documents.pipeline_inputs(args, trainer.tokenizer.eod, mb.tokens), (mb.labels, mb.risk))
                          for mb in micro]) if micro is not None else None)
            engine.eval_batch(data, num_micro_batches=args.gradient_accumulation_steps)
            raw = trainer.module.loss_fn.pop_stats()
            if raw is not None:
                have = True
                _add_stats(stats, raw["loss_sum"].to(comm), raw["num_tokens"].to(comm), raw["level_count"].to(comm),
                           raw["level_ce_sum"].to(comm))
        else:
            engine.eval()
            with torch.no_grad():
                for mb in micro:
                    mb = mb.to(trainer.device)
                    inputs = documents.model_inputs(args, trainer.tokenizer.eod, mb.tokens)
                    output = (engine(mb.tokens, return_hidden=True, **inputs) if args.fused_linear_ce
                              else engine(mb.tokens, **inputs))
                    out = _masked_ce(trainer, output, mb.labels, mb.risk)
                    _add_stats(stats, out.loss_sum.to(comm), out.num_tokens.to(comm), out.level_count.to(comm),
                               out.level_ce_sum.to(comm))
            engine.train()
            have = True
    if not have:
        return None
    return _all_reduce(stats, trainer.dp_group)


# --------------------------------------------------------------------------- the loop
def _print_status(text: str) -> None:
    """Status lines come from the logging rank (the last: it is on the last pipeline stage, which has the loss)."""
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(text, flush=True)


def _train_state(trainer: Trainer, iteration: int, consumed_train: int, consumed_valid: int) -> dict:
    args = trainer.args
    return {"iteration": iteration, "consumed_train_samples": consumed_train,
            "consumed_valid_samples": consumed_valid, "scheduler": trainer.scheduler.state_dict(),
            "global_batch_size": trainer.engine.train_batch_size(),  # this iteration's (a ramp-up changes it)
            "world_size": dist.get_world_size(), "padded_vocab_size": args.padded_vocab_size,
            "model_architecture": checkpointing.model_architecture(trainer.config, trainer.tokenizer.vocab_size,
                                                                   args.make_vocab_size_divisible_by),
            "layout": checkpointing.layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                           args.data_parallel_size, args.zero_stage, args.sequence_parallel)}


def pretrain(argv: Optional[List[str]] = None) -> dict:
    """Run the whole job; returns a summary (iteration reached, last losses) for callers and tests."""
    world_size = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    args = parse_args(argv, world_size=world_size)
    # Paths, tokenizer and data/tokenizer fit first: a mistake there is a one-line error before any process
    # group or DeepSpeed engine exists.
    inputs = check_inputs(args)
    from megatron_slung.training import monitoring

    monitoring.check_device_flags(args, cuda=monitoring.will_use_cuda(args))  # --fp16, --profile (nsys) ...
    from megatron_slung.training.distributed import initialize_distributed

    device = initialize_distributed(args.distributed_backend, args.distributed_timeout_minutes)
    if dist.get_world_size() != args.world_size:
        raise ArgumentError(f"the launcher started {dist.get_world_size()} processes but the flags were checked for "
                            f"{args.world_size}")
    from megatron_slung.parallel import state

    try:
        return _run(args, device, inputs)
    finally:
        if state.model_parallel_is_initialized():
            state.destroy_model_parallel()


def _run(args, device, inputs: CheckedInputs) -> dict:
    from megatron_slung.model.gpt import flops_per_token
    from megatron_slung.training.monitoring import Monitor, init_wandb, megatron_flops_per_iteration

    t0 = time.time()
    if not hasattr(args, "load_metadata"):  # args not made by parse_args(validate=True): resolve --load here
        args.load_metadata, args.load_notes = (checkpointing.resolve_load(args, getattr(args, "explicit_flags", ()))
                                               if args.load else (None, []))
    for line in args.load_notes:  # what --load adopted from the checkpoint, or its warning
        _print_status(line)
    exit_conditions = ExitConditions(args)  # from here a signal stops the run after an iteration
    trainer = setup(args, device, inputs.tokenizer)
    exit_conditions.comm_device = _comm_device(trainer)
    engine = trainer.engine
    rank = dist.get_rank()
    _print_status(
        f"megatron-slung pretrain: {dist.get_world_size()} ranks (TP {args.tensor_model_parallel_size} x PP "
        f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size}) on {device.type}, "
        f"{_num_parameters_note(trainer.config)}, vocab {trainer.tokenizer.vocab_size} (padded "
        f"{args.padded_vocab_size}), global batch {args.global_batch_size} x {args.seq_length} tokens "
        f"(micro {args.micro_batch_size}, GAS {args.gradient_accumulation_steps}), ZeRO {args.zero_stage}, "
        f"{args.params_dtype}, loss policy {args.risk_loss_policy!r}, {inputs.describe()}"
        + (", transformer layers compiled (--torch-compile)" if args.torch_compile else "")
    )
    for prefix in inputs.without_risk if args.allow_missing_risk else ():
        _print_status(f"note: {prefix} has no risk channel: its tokens train as level 0 (--allow-missing-risk)")

    iteration, consumed_train, consumed_valid = 0, 0, 0
    load_metadata = args.load_metadata
    if load_metadata is not None:  # None: no checkpoint yet in --load = --save (warned above)
        state = checkpointing.load_checkpoint(engine, load_metadata.path, load_optimizer=not args.no_load_optim,
                                              load_rng=not args.no_load_rng, finetune=args.finetune,
                                              log=_print_status)
        if state is not None and not args.finetune:
            iteration = int(state["iteration"])
            consumed_train = int(state["consumed_train_samples"])
            consumed_valid = int(state["consumed_valid_samples"])
            if args.no_load_optim:  # Megatron loads the LR schedule with the optimizer: both start afresh
                _print_status("--no-load-optim: the optimizer state and the LR schedule start afresh; iteration "
                              f"{iteration} and the data position continue")
            else:
                trainer.scheduler.load_state_dict(state["scheduler"], state["args"].get("global_batch_size"))
            old_gbs = state["args"].get("global_batch_size")
            if old_gbs is not None and old_gbs != args.global_batch_size:
                _print_status(f"note: the checkpoint used global batch {old_gbs}, now {args.global_batch_size}")

    train_ds, valid_ds, test_ds = trainer.datasets
    loads = trainer.loads_data
    train_loader = build_loader(train_ds, consumed_train, args, trainer.dp_rank, trainer.dp_size) if loads else None
    valid_loader = (CyclicLoader(valid_ds, consumed_valid, args, trainer.dp_rank, trainer.dp_size)
                    if loads and valid_ds is not None else None)

    monitor = Monitor(args, trainer, _comm_device(trainer))  # --log-params-norm, timers, --profile, --manual-gc
    for line in monitor.notes(iteration):
        _print_status(line)
    wandb_run = init_wandb(args, args_to_dict(args)) if args.wandb_project and trainer.is_logging_rank else None
    logger = TrainingLogger(
        enabled=trainer.is_logging_rank, policy=trainer.policy, train_iters=args.train_iters,
        log_interval=args.log_interval, tokens_per_iteration=args.global_batch_size * args.seq_length,
        flops_per_token=flops_per_token(trainer.config, args.seq_length), world_size=dist.get_world_size(),
        device_name=torch.cuda.get_device_name() if device.type == "cuda" else None,
        peak_tflops_per_device=args.peak_tflops, tensorboard_dir=args.tensorboard_dir,
        metrics_jsonl=args.metrics_jsonl, progress_bar=False if args.no_progress_bar else None,
        start_iteration=iteration, tensorboard_log_interval=args.tensorboard_log_interval,
        tensorboard_queue_size=args.tensorboard_queue_size, wandb_run=wandb_run,
        throughput_flops_per_iteration=(megatron_flops_per_iteration(trainer.config, args.global_batch_size,
                                                                     args.seq_length) if args.log_throughput else None),
        log_timers=args.log_timers_to_tensorboard,
    )
    _print_status(f"setup took {time.time() - t0:.1f} s; training from iteration {iteration} to {args.train_iters}")
    last_saved = iteration if args.load and iteration > 0 else None
    evaluated_at = None
    saver = _async_saver(trainer) if args.async_save else None  # --async-save: files written in the background

    def run_eval(split_loader, split: str):
        nonlocal consumed_valid
        start = time.perf_counter()
        with monitor.evaluation():  # --manual-gc around evaluations, --empty-unused-memory-level 2
            stats = evaluate(trainer, split_loader, args.eval_iters)
        if split == "valid":
            consumed_valid += args.eval_iters * args.global_batch_size
        if stats is not None and trainer.is_logging_rank:
            s = _stats_to_step(stats, 0.0, None, False)
            logger.log_eval(iteration, split, s.loss, s.num_tokens, s.level_count, s.level_ce_sum)
        logger.exclude_time(time.perf_counter() - start)

    def save():
        nonlocal last_saved
        start = time.perf_counter()
        if saver is not None:
            stall = saver.save(args.save, iteration, _train_state(trainer, iteration, consumed_train, consumed_valid),
                               args_to_dict(args), save_optim=not args.no_save_optim, save_rng=not args.no_save_rng)
            last_saved = iteration
            _print_status(f"checkpoint of iteration {iteration}: training stopped {stall:.2f} s to copy it to host "
                          "memory; its files are being written in the background (--async-save)")
            logger.exclude_time(time.perf_counter() - start)
            return
        path = checkpointing.save_checkpoint(engine, args.save, iteration,
                                             _train_state(trainer, iteration, consumed_train, consumed_valid),
                                             args_to_dict(args), save_optim=not args.no_save_optim,
                                             save_rng=not args.no_save_rng)
        last_saved = iteration
        _print_status(f"saved checkpoint {path} ({time.perf_counter() - start:.1f} s)")
        if rank == 0:  # only once the new one is complete and `latest` names it
            deleted = checkpointing.prune_checkpoints(args.save, iteration, retain_interval=args.save_retain_interval,
                                                      keep_last=args.keep_last_checkpoints)
            if deleted:
                print(f"deleted older checkpoints {', '.join(deleted)} (--save-retain-interval / "
                      "--keep-last-checkpoints)", flush=True)
        logger.exclude_time(time.perf_counter() - start)

    stopped_early = False
    timers = monitor.timers
    batches = batch_size_schedule(args)
    monitor.start()
    try:
        while iteration < args.train_iters:
            # Global batch k is the next G_k samples (G_k from the consumed samples: a resumed ramp continues).
            if set_global_batch_size(trainer, batches.at(consumed_train)) and iteration > 0 and args.save \
                    and last_saved != iteration:
                save()  # Megatron saves when the number of micro-batches changes
            monitor.before_iteration(iteration)
            num_micro = engine.gradient_accumulation_steps()
            micro = None
            with timers.time("batch-generator"):
                if loads:
                    micro = [to_micro_batch(s) for s in next_micro_batches(train_loader, num_micro, "training")]
            with timers.time("forward-backward", excluding="optimizer"):
                stats, skipped, lr = train_step(trainer, micro)
            iteration += 1
            consumed_train += engine.train_batch_size()
            step_stats = _stats_to_step(stats, lr, trainer.grad_norm, skipped) if stats is not None else None
            # Loss (known where the stats are) and gradient norm: NaN/inf on any rank stops or skips on every rank.
            bad = torch.tensor([float(step_stats is not None and not math.isfinite(step_stats.loss)),
                                float(trainer.grad_nonfinite)])
            if dist.get_world_size() > 1:
                bad = bad.to(_comm_device(trainer))
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            loss_bad, grad_bad = bool(bad[0].item() > 0), bool(bad[1].item() > 0)
            what = "the loss" if loss_bad else "the gradient norm" if grad_bad else None
            if what and not args.skip_nan_steps:
                where = f"; the last checkpoint is in {args.save} (iteration {last_saved})" if last_saved else ""
                finite = "" if loss_bad else ", the loss is finite"
                raise NonFiniteLossError(
                    f"{what} is NaN/inf at iteration {iteration}{finite} (the update was not applied){where}. "
                    "Lower --lr, check the data, or pass --skip-nan-steps to skip such steps."
                )
            if what and trainer.is_logging_rank:
                logger.print(f"iteration {iteration}: {what} is NaN/inf, update skipped (--skip-nan-steps)")
            extras, timer_values = monitor.after_iteration(iteration, trainer.is_logging_rank)
            if trainer.is_logging_rank and step_stats is not None:
                logger.log_iteration(iteration, step_stats, consumed_train, extras, timer_values,
                                     tokens=engine.train_batch_size() * args.seq_length)
            if args.eval_interval and args.eval_iters > 0 and iteration % args.eval_interval == 0 and valid_ds is not None:
                run_eval(valid_loader, "valid")
                evaluated_at = iteration
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                save()
            if saver is not None:  # collective while a background write is under way: done? failed?
                saver.poll()
            reason = exit_conditions.reason(iteration)  # collective when a signal or time limit is watched
            if reason is not None and iteration < args.train_iters:
                if args.save and last_saved != iteration:
                    save()
                if saver is not None:
                    saver.finish()
                _print_status(f"exiting at iteration {iteration} ({reason})"
                              + ("" if args.save else "; no --save, so nothing was saved"))
                stopped_early = True
                break
        if not stopped_early:
            if args.eval_iters > 0 and valid_ds is not None and evaluated_at != iteration and args.train_iters > 0:
                run_eval(valid_loader, "valid")
            if args.eval_iters > 0 and test_ds is not None:
                test_loader = CyclicLoader(test_ds, 0, args, trainer.dp_rank, trainer.dp_size) if loads else None
                run_eval(test_loader, "test")
            if args.save and last_saved != iteration:
                save()
            if saver is not None:
                saver.finish()
    except DataExhausted as e:
        raise RuntimeError(f"{e} at iteration {iteration}; the datasets were sized for --train-iters "
                           f"{args.train_iters}") from None
    finally:
        if saver is not None:  # an error: let this rank's background write finish (no collective)
            saver.finish_after_error()
        exit_conditions.close()
        monitor.close()
        logger.close()
    train_records = [r for r in logger.records if r["kind"] == "train"]
    _print_status(f"done: iteration {iteration}, {time.time() - t0:.1f} s in all")
    return {"iteration": iteration, "records": logger.records, "rank": rank, "stopped_early": stopped_early,
            "last_loss": train_records[-1]["loss"] if train_records else None}


def _async_saver(trainer: Trainer):
    from megatron_slung.training.async_save import AsyncCheckpointSaver

    args = trainer.args

    def prune(save_dir, iteration):  # rank 0's writer, once the new checkpoint is complete and `latest` names it
        return checkpointing.prune_checkpoints(save_dir, iteration, retain_interval=args.save_retain_interval,
                                               keep_last=args.keep_last_checkpoints)

    return AsyncCheckpointSaver(trainer.engine, prune=prune, log=_print_status, comm_device=_comm_device(trainer),
                                timeout_s=60.0 * args.distributed_timeout_minutes)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        pretrain(argv)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except AsyncSaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
