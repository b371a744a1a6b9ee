"""What Megatron-LM's monitoring flags do here: throughput, timers, the parameter norm, memory, W&B, the
profiler, manual garbage collection, ``--empty-unused-memory-level``; and the device checks of flags that
need a GPU (refused on the CPU before anything starts).

The trainer calls these from small hooks (``training/pretrain.py``); ``training/logging.py`` writes what they
measure. Megatron's names for the TensorBoard/W&B scalars these flags add: ``params-norm``,
``iteration-time``, ``throughput``, ``<timer>-time``, ``mem-*``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist


# --------------------------------------------------------------------------- throughput
def megatron_flops_per_iteration(config, batch_size: int, seq_length: int) -> float:
    """Megatron-LM's ``num_floating_point_operations`` (``megatron/training/training.py``) for one global batch
    of this dense GPT: what its ``--log-throughput`` divides by time and GPUs.

    Every matmul counted 3 x (forward, data-gradient, weight-gradient) x 2 (multiply-add), per token:

        MLP        h x ffn x (3 with SwiGLU: gate, up, down; else 2)                          per layer
        attention  h x (q + 2 kv) + q x h   (QKV and output projections; q = heads x head dim,
                                             kv = query groups x head dim)                    per layer
        logits     h x padded vocab                                                           once
    and the core attention (Q K^T and A V) over the causal half of the S x S scores: S x q per token
    per layer. No embedding lookup, norms or biases (not matmuls). Untied output weights change nothing:
    the logits are one matmul either way.

    Unlike ``model.gpt.flops_per_token`` (the always-logged TFLOP/s and MFU, PaLM's convention), the core
    attention is halved by the causal mask, so this matches a Megatron run's log number for number.
    """
    c = config
    h, layers, d = c.hidden_size, c.num_layers, c.kv_channels
    q, kv = c.num_attention_heads * d, c.num_query_groups * d
    per_token_matmul = (layers * (h * c.ffn_hidden_size * (3 if c.swiglu else 2) + h * (q + 2 * kv) + q * h)
                        + h * c.vocab_size)
    tokens = batch_size * seq_length
    core_attention = batch_size * seq_length * seq_length * q * layers  # causal half of QK^T and AV, x 2 FMA
    return float(3 * 2 * (tokens * per_token_matmul + core_attention))


# --------------------------------------------------------------------------- timers
class Timers:
    """Named wall-clock timers summed over a logging interval (Megatron's ``timers(name).start()/.stop()``).

    On a GPU each start/stop synchronises the device first, as Megatron's timers do, so a timer measures
    the work and not the launch. Only ``enabled`` timers cost anything; a disabled one is a no-op.
    """

    def __init__(self, enabled: bool, cuda: bool = False):
        self.enabled = enabled
        self.cuda = cuda
        self.elapsed: Dict[str, float] = {}
        self._started: Dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, name: str) -> None:
        if self.enabled:
            self._started[name] = self._now()

    def stop(self, name: str) -> float:
        """Stop ``name``; returns the seconds of this start/stop (0 when disabled)."""
        if not self.enabled:
            return 0.0
        seconds = self._now() - self._started.pop(name)
        self.elapsed[name] = self.elapsed.get(name, 0.0) + seconds
        return seconds

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.elapsed[name] = self.elapsed.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def time(self, name: str, excluding: Optional[str] = None):
        """Time the block as ``name``, less what timer ``excluding`` measured inside it."""
        inner = self.elapsed.get(excluding, 0.0) if excluding else 0.0
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)
            if self.enabled and excluding:
                self.elapsed[name] -= self.elapsed.get(excluding, 0.0) - inner

    def reduce_max(self, names: Iterable[str], iterations: int, group=None, device=None) -> Dict[str, float]:
        """Seconds per iteration of each timer over the interval, the maximum over ranks (what Megatron writes
        to TensorBoard); resets them. A collective when more than one rank: every rank calls it."""
        names = list(names)
        values = torch.tensor([self.elapsed.get(n, 0.0) for n in names], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        self.elapsed = {}
        return {n: float(v) / max(iterations, 1) for n, v in zip(names, values.tolist())}


# The timers of --log-timers-to-tensorboard, Megatron's names:
#   batch-generator   reading this iteration's micro-batches from the data loader
#   forward-backward  forward passes, losses and backward passes of all micro-batches (with a pipeline:
#                     DeepSpeed's whole schedule, send/receive included, less the optimizer)
#   optimizer         DeepSpeed's model step: gradient clipping, ZeRO's gradient/parameter work, the update
TIMER_NAMES = ("batch-generator", "forward-backward", "optimizer")


def time_optimizer_step(engine, timers: Timers) -> None:
    """Time DeepSpeed's ``_take_model_step`` (the update, with or without a pipeline) as ``optimizer``."""
    if not timers.enabled:
        return
    original = engine._take_model_step

    def timed(*a, **k):
        timers.start("optimizer")
        try:
            return original(*a, **k)
        finally:
            timers.stop("optimizer")

    engine._take_model_step = timed


# --------------------------------------------------------------------------- parameter norm
def params_norm(module: torch.nn.Module, model_parallel_group=None, data_parallel_group=None,
                device=None) -> float:
    """L2 norm of all the model's weights, the whole model (Megatron's ``calc_params_l2_norm``).

    Each weight counts once: a tensor-parallel shard on every TP rank (``tensor_model_parallel``), a
    replicated one where ``model_parallel`` says (TP rank 0; the pipeline's copy of a tied embedding nowhere),
    summed over the model-parallel group (TP x PP). Under ZeRO-3 a rank holds a partition of each weight
    (``ds_tensor``): those are summed over the data-parallel group too. A collective: every rank calls it.
    """
    from megatron_slung.parallel import state

    tp_rank0 = state.get_tensor_model_parallel_rank() == 0 if state.model_parallel_is_initialized() else True
    total = torch.zeros((), dtype=torch.float64, device=device)
    zero3 = False
    for p in module.parameters():
        counted = getattr(p, "tensor_model_parallel", False) or getattr(p, "model_parallel", tp_rank0)
        if not counted:
            continue
        data = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        zero3 = zero3 or hasattr(p, "ds_tensor")
        total += data.detach().double().pow(2).sum().to(total.device)
    if dist.is_initialized():
        if dist.get_world_size(model_parallel_group) > 1:
            dist.all_reduce(total, group=model_parallel_group)
        if zero3 and dist.get_world_size(data_parallel_group) > 1:
            dist.all_reduce(total, group=data_parallel_group)
    return float(total.sqrt().item())


# --------------------------------------------------------------------------- memory
def cuda_memory_scalars() -> Dict[str, float]:
    """``--log-memory-to-tensorboard``: Megatron's four numbers from ``torch.cuda.memory_stats()``."""
    stats = torch.cuda.memory_stats()
    return {"mem-reserved-bytes": float(stats["reserved_bytes.all.current"]),
            "mem-allocated-bytes": float(stats["allocated_bytes.all.current"]),
            "mem-max-allocated-bytes": float(stats["allocated_bytes.all.peak"]),
            "mem-allocated-count": float(stats["allocation.all.current"])}


def empty_unused_memory(level: int, after: str) -> None:
    """``--empty-unused-memory-level``: return the CUDA caching allocator's unused blocks to the driver,
    level 1 after each training iteration, level 2 also after each evaluation (``after``: "train" | "eval").
    A no-op without CUDA (torch's ``empty_cache`` does nothing before CUDA is initialised)."""
    if level >= 1 and after == "train" or level >= 2 and after == "eval":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- W&B
def wandb_save_dir(args) -> str:
    """Megatron's rule: ``--wandb-save-dir``, else ``--save``/wandb."""
    return args.wandb_save_dir or os.path.join(args.save, "wandb")


def init_wandb(args, config: dict):
    """Start the W&B run (on the logging rank only), as Megatron does: project, name, entity, the run's
    flags as its config, files under ``wandb_save_dir``. Offline runs: ``WANDB_MODE=offline``."""
    try:
        import wandb
    except ImportError:
        raise ImportError("--wandb-project needs the wandb package: pip install wandb "
                          "(or pip install megatron-slung[test])") from None
    save_dir = wandb_save_dir(args)
    os.makedirs(save_dir, exist_ok=True)
    kwargs = dict(dir=save_dir, name=args.wandb_exp_name, project=args.wandb_project, config=config)
    if args.wandb_entity:
        kwargs["entity"] = args.wandb_entity
    return wandb.init(**kwargs)


# --------------------------------------------------------------------------- profiler
class StepProfiler:
    """``--profile``: profile iterations ``--profile-step-start`` + 1 .. ``--profile-step-end`` (the iteration
    counter, resumed runs included, is at ``start`` when profiling begins and at ``end`` when it stops, as in
    Megatron), on the ranks of ``--profile-ranks`` (default all).

    * ``--use-pytorch-profiler``: ``torch.profiler`` (CPU, and CUDA on a GPU), one ``ProfilerStep#N`` per
      iteration, written as ``rankR.<time>.pt.trace.json`` under ``--tensorboard-dir`` when the window ends:
      TensorBoard's profiler plugin (torch-tb-profiler) opens it, and so do chrome://tracing and Perfetto.
    * otherwise: Nsight Systems' capture range (``cudaProfilerStart``/``Stop``); run under
      ``nsys profile --capture-range=cudaProfilerApi``. Needs a GPU (refused on the CPU at start).
    """

    def __init__(self, args, rank: int):
        self.args = args
        self.enabled = bool(args.profile) and (not args.profile_ranks or rank in args.profile_ranks)
        self.rank = rank
        self._prof = None
        self._nsys = False
        self.trace_dir = args.tensorboard_dir
        self.done = False

    def before_iteration(self, iteration: int) -> None:
        """``iteration``: iterations completed so far."""
        start, end = self.args.profile_step_start, self.args.profile_step_end
        if not self.enabled or self.done:
            return
        if self.args.use_pytorch_profiler:
            # One warm-up iteration before the window when there is one (Megatron's schedule), then one
            # ProfilerStep#N per profiled iteration; the trace is written when the last one ends.
            warmup = 1 if start > 0 else 0
            if iteration != start - warmup or self._prof is not None:
                return
            from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with warnings.catch_warnings():  # "won't be using warmup" when the window starts at 0
                warnings.simplefilter("ignore", UserWarning)
                when = schedule(wait=0, warmup=warmup, active=end - start, repeat=1)
            self._prof = profile(activities=activities, schedule=when,
                                 on_trace_ready=tensorboard_trace_handler(self.trace_dir, worker_name=f"rank{self.rank}"))
            self._prof.start()
        elif iteration == start and not self._nsys:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self._nsys = True

    def after_iteration(self, iteration: int) -> None:
        """``iteration``: iterations completed, this one included."""
        if self._prof is not None:
            self._prof.step()
        if iteration == self.args.profile_step_end:
            self.stop()

    def stop(self) -> None:
        if self._prof is not None:
            self._prof.stop()  # writes the trace (on_trace_ready)
            self._prof = None
            self.done = True
        if self._nsys:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            self._nsys = False
            self.done = True


# --------------------------------------------------------------------------- manual garbage collection
class ManualGC:
    """``--manual-gc``: Python's threshold-triggered collector is off for the run (so collections happen at
    the same point on every rank, not whenever one rank's allocation count says so); a full collection at
    the start, every ``--manual-gc-interval`` iterations (0: never), and around each evaluation unless
    ``--no-manual-gc-eval`` (a full one before, a young-generation one after, as in Megatron). ``close``
    turns the automatic collector back on."""

    def __init__(self, enabled: bool, interval: int = 0, around_eval: bool = True):
        self.enabled = enabled
        self.interval = interval
        self.around_eval = around_eval
        self._was_enabled = None

    def start(self) -> None:
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        if self.enabled and self.interval > 0 and iteration % self.interval == 0:
            gc.collect()

    def before_eval(self) -> None:
        if self.enabled and self.around_eval:
            gc.collect()

    def after_eval(self) -> None:
        if self.enabled and self.around_eval:
            gc.collect(generation=0)

    def close(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()
        self._was_enabled = None


# --------------------------------------------------------------------------- flags that need a GPU
def check_device_flags(args, cuda: bool) -> None:
    """Refuse, before any process group starts, the flags this device cannot honour (ArgumentError)."""
    from megatron_slung.training.arguments import ArgumentError

    if cuda:
        return
    if args.fp16:
        raise ArgumentError("--fp16 needs a CUDA GPU (DeepSpeed has no fp16 training on the CPU); use --bf16 or "
                            "fp32 (no flag)")
    if args.profile and not args.use_pytorch_profiler:
        raise ArgumentError("--profile without --use-pytorch-profiler opens Nsight Systems' CUDA capture range "
                            "(cudaProfilerStart), which needs a CUDA GPU; add --use-pytorch-profiler for a torch "
                            "profiler trace")
    if args.log_memory_to_tensorboard:
        raise ArgumentError("--log-memory-to-tensorboard writes torch.cuda.memory_stats(), which needs a CUDA GPU")


def profile_ranks_note(args, world_size: int) -> List[str]:
    """Status lines for the start of the run (what --profile will write, and where)."""
    if not args.profile:
        return []
    ranks = "all ranks" if not args.profile_ranks else "ranks " + ",".join(map(str, args.profile_ranks))
    what = (f"a torch profiler trace (rank*.pt.trace.json) in {args.tensorboard_dir}" if args.use_pytorch_profiler
            else "an Nsight Systems capture range (cudaProfilerStart/Stop)")
    return [f"--profile: iterations {args.profile_step_start + 1}..{args.profile_step_end} on {ranks}: {what}"]


def will_use_cuda(args) -> bool:
    """The device ``distributed.initialize_distributed`` will pick: CUDA when visible, unless gloo is asked."""
    return torch.cuda.is_available() and args.distributed_backend != "gloo"


# --------------------------------------------------------------------------- the trainer's hooks
class Monitor:
    """Everything above, for one run: the training loop calls ``before_iteration``, times with ``timers``,
    calls ``after_iteration`` (on every rank: the parameter norm and the timers' maximum are collectives),
    wraps evaluations in ``evaluation()``, and ``close()``s at the end."""

    def __init__(self, args, trainer, comm_device):
        from megatron_slung.parallel import state

        self.args = args
        self.trainer = trainer
        self.comm_device = comm_device
        self.cuda = trainer.device.type == "cuda"
        self.timers = Timers(enabled=bool(args.log_timers_to_tensorboard), cuda=self.cuda)
        time_optimizer_step(trainer.engine, self.timers)
        self.profiler = StepProfiler(args, dist.get_rank())
        self.gc = ManualGC(args.manual_gc, args.manual_gc_interval, args.manual_gc_eval)
        self._mp_group = state.get_model_parallel_group() if state.model_parallel_is_initialized() else None
        self._iterations_since_log = 0

    def notes(self, start_iteration: int) -> List[str]:
        lines = profile_ranks_note(self.args, dist.get_world_size())
        if self.args.profile and start_iteration > self.args.profile_step_start:
            lines.append(f"note: --profile: this run starts at iteration {start_iteration}, past "
                         f"--profile-step-start {self.args.profile_step_start}: nothing will be profiled")
        return lines

    def start(self) -> None:
        self.gc.start()

    def before_iteration(self, iteration: int) -> None:
        self.profiler.before_iteration(iteration)

    def after_iteration(self, iteration: int, is_logging_rank: bool):
        """(extras, timers) for the logger: ``params-norm`` and ``mem-*`` on TensorBoard iterations and log
        iterations, the timers' seconds per iteration on log iterations."""
        args = self.args
        self._iterations_since_log += 1
        empty_unused_memory(args.empty_unused_memory_level, "train")
        self.gc.after_iteration(iteration)
        self.profiler.after_iteration(iteration)
        log_now = iteration % args.log_interval == 0 or iteration == args.train_iters
        tb_now = iteration % args.tensorboard_log_interval == 0
        extras: Dict[str, float] = {}
        if args.log_params_norm and (log_now or tb_now):
            extras["params-norm"] = params_norm(self.trainer.module, self._mp_group, self.trainer.dp_group,
                                                device=self.comm_device)
        if args.log_memory_to_tensorboard and tb_now and is_logging_rank:
            extras.update(cuda_memory_scalars())
        timers = None
        if self.timers.enabled and log_now:
            timers = self.timers.reduce_max(TIMER_NAMES, self._iterations_since_log, device=self.comm_device)
        if log_now:
            self._iterations_since_log = 0
        return extras, timers

    @contextlib.contextmanager
    def evaluation(self):
        self.gc.before_eval()
        try:
            yield
        finally:
            self.gc.after_eval()
            empty_unused_memory(self.args.empty_unused_memory_level, "eval")

    def close(self) -> None:
        self.profiler.stop()
        self.gc.close()
