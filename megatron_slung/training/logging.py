"""What a user sees while training: log lines, a progress bar, TensorBoard scalars and a JSONL file.

Every ``--log-interval`` iterations one line (and one JSONL record) with, averaged over the interval:
the loss (the policy loss that is optimised; mean of the per-iteration losses), the loss of each risk level
seen (plain cross-entropy per token, masked levels included: they carry no loss but are still watched), the
learning rate, the gradient norm, tokens/s, TFLOP/s per device and MFU, and the ETA. Evaluations report the
policy loss and, apart from it, the perplexity of the plain cross-entropy (``log_eval``). Only one rank (the
logging rank) writes. TensorBoard and W&B get each iteration's own values every ``tensorboard_log_interval``
iterations (Megatron's ``--tensorboard-log-interval``, default 1), the timing ones every ``log_interval``.

FLOPs: ``flops_per_token`` (the model's formula: 6 x matmul parameters + attention, training) x tokens/s /
devices = achieved TFLOP/s per device. MFU = that / the device's peak dense 16-bit tensor TFLOP/s, the
usual convention (PaLM, Megatron), whatever the training precision; the table below is looked up by the
GPU's name (``--peak-tflops`` overrides). On a CPU no peak is known: TFLOP/s only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_slung.data.risk import NUM_LEVELS, level_name
from megatron_slung.loss.policy import LossMode, LossPolicy

# Peak dense bf16/fp16 tensor-core TFLOP/s (vendor data sheets). Matched in order against the device
# name, so more specific names come first.
PEAK_TFLOPS_16BIT = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """Peak dense 16-bit TFLOP/s of a GPU by name, or None (unknown, or a CPU)."""
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS_16BIT:
        if key.lower() in device_name.lower():
            return value
    return None


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or inf (the message names which and the iteration)."""


# --------------------------------------------------------------------------- per-level statistics
def level_report(level_count: torch.Tensor, level_ce_sum: torch.Tensor, policy: LossPolicy) -> Dict[str, dict]:
    """``{"3": {"name": "toxic", "mode": "ignore", "tokens": 120, "ce": 4.21}, ...}`` for every level seen.

    ``ce`` is the mean plain cross-entropy of the level's tokens (no weight, smoothing or z-loss), so a
    masked level shows how well the model would predict it even though it is not trained on it.
    """
    counts = level_count.detach().double().cpu()
    sums = level_ce_sum.detach().double().cpu()
    out = {}
    for level in torch.nonzero(counts > 0).flatten().tolist():
        mode = policy.mode(level)
        weight = policy.weight(level)
        out[str(level)] = {
            "name": level_name(level),
            "mode": mode.name.lower() + (f"@{weight:g}" if weight != 1.0 and mode != LossMode.IGNORE else ""),
            "tokens": int(counts[level].item()),
            "ce": float(sums[level].item() / counts[level].item()),
        }
    return out


@dataclass
class StepStats:
    """One iteration's numbers (already reduced over micro-batches and data-parallel ranks)."""

    loss: float  # the optimised loss: sum of per-token losses / loss-carrying tokens of the global batch
    num_tokens: int  # loss-carrying tokens in the global batch
    level_count: torch.Tensor  # [256]
    level_ce_sum: torch.Tensor  # [256]
    lr: float
    grad_norm: Optional[float]
    skipped: bool = False


@dataclass
class _Window:
    iterations: int = 0
    skipped: int = 0
    loss_sum: float = 0.0
    loss_iters: int = 0
    num_tokens: int = 0
    trained_tokens: int = 0  # tokens of the samples trained (the global batches' sizes x sequence length)
    grad_norm_sum: float = 0.0
    grad_norm_iters: int = 0
    level_count: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_LEVELS, dtype=torch.float64))
    level_ce_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_LEVELS, dtype=torch.float64))
    start_time: float = field(default_factory=time.perf_counter)


class TrainingLogger:
    """Accumulates per-iteration stats and writes them every ``log_interval`` (on the logging rank only)."""

    def __init__(self, *, enabled: bool, policy, train_iters: int, log_interval: int, tokens_per_iteration: int,
                 flops_per_token: float, world_size: int, device_name: Optional[str] = None,
                 peak_tflops_per_device: Optional[float] = None, tensorboard_dir: Optional[str] = None,
                 metrics_jsonl: Optional[str] = None, progress_bar: Optional[bool] = None,
                 start_iteration: int = 0, stream=None, tensorboard_log_interval: int = 1,
                 tensorboard_queue_size: int = 1000, wandb_run=None,
                 throughput_flops_per_iteration: Optional[float] = None, log_timers: bool = False):
        self.enabled = enabled
        self.policy = LossPolicy.parse(policy)
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.tokens_per_iteration = tokens_per_iteration
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_tflops_per_device if peak_tflops_per_device is not None else peak_tflops(device_name)
        self.stream = stream or sys.stdout
        self.window = _Window()
        self.records: List[dict] = []  # everything written, kept for tests and the final summary
        self.tensorboard_log_interval = tensorboard_log_interval
        # --log-throughput: Megatron's FLOPs of one global batch (monitoring.megatron_flops_per_iteration)
        self.throughput_flops_per_iteration = throughput_flops_per_iteration
        self.log_timers = log_timers  # --log-timers-to-tensorboard
        self._wandb = wandb_run if enabled else None
        self._tb = None
        self._jsonl = None
        self._bar = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=tensorboard_queue_size,
                                     purge_step=start_iteration + 1 if start_iteration else None)
        if metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_jsonl)), exist_ok=True)
            self._jsonl = open(metrics_jsonl, "a", encoding="utf-8")
        if progress_bar is None:
            progress_bar = hasattr(self.stream, "isatty") and self.stream.isatty()
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=train_iters, initial=start_iteration, desc="train", unit="it",
                             dynamic_ncols=True, file=self.stream)

    # ------------------------------------------------------------------ output
    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _write(self, record: dict, scalars: Dict[str, float], step: int) -> None:
        self.records.append(record)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        self._scalars(scalars, step)
        if self._tb is not None:
            self._tb.flush()

    def _scalars(self, scalars: Dict[str, Optional[float]], step: int) -> None:
        """The same finite scalars to TensorBoard and W&B (a NaN or a missing value is left out)."""
        finite = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and finite:
            self._wandb.log(finite, step=step)

    # ------------------------------------------------------------------ training
    def exclude_time(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a checkpoint) out of the interval's training time."""
        self.window.start_time += seconds

    def is_log_iteration(self, iteration: int) -> bool:
        """Does ``log_iteration(iteration)`` write the interval's record (every ``log_interval``, and the last)?"""
        return iteration % self.log_interval == 0 or iteration == self.train_iters

    def is_tensorboard_iteration(self, iteration: int) -> bool:
        """Are the iteration's own scalars written (every ``--tensorboard-log-interval``)?"""
        return (self._tb is not None or self._wandb is not None) and iteration % self.tensorboard_log_interval == 0

    def log_iteration(self, iteration: int, stats: StepStats, consumed_samples: int,
                      extras: Optional[Dict[str, float]] = None,
                      timers: Optional[Dict[str, float]] = None, tokens: Optional[int] = None) -> Optional[dict]:
        """Add one iteration; every ``log_interval`` iterations write and return the record. ``tokens``: its
        global batch's (default ``tokens_per_iteration``: a batch-size ramp-up changes it).

        Every ``tensorboard_log_interval`` iterations the iteration's own values go to TensorBoard/W&B (as
        Megatron writes them: not averaged): loss, lr, grad norm, loss tokens, per-level ce and tokens, and
        ``extras`` (``params-norm``, ``mem-*``). ``timers``: seconds per iteration over the interval, given on
        log iterations (``--log-timers-to-tensorboard``).
        """
        extras = extras or {}
        if self.enabled and self.is_tensorboard_iteration(iteration):
            scalars = {"train/loss": stats.loss if stats.num_tokens else None, "train/lr": stats.lr,
                       "train/grad_norm": stats.grad_norm, "train/loss_tokens": float(stats.num_tokens)}
            for level, info in level_report(stats.level_count, stats.level_ce_sum, self.policy).items():
                scalars[f"train/ce_level/{level}_{info['name']}"] = info["ce"]
                scalars[f"train/tokens_level/{level}_{info['name']}"] = float(info["tokens"])
            scalars.update(extras)
            self._scalars(scalars, iteration)
        w = self.window
        w.iterations += 1
        w.trained_tokens += self.tokens_per_iteration if tokens is None else int(tokens)
        if stats.skipped:
            w.skipped += 1
        if math.isfinite(stats.loss):
            w.loss_sum += stats.loss
            w.loss_iters += 1
        w.num_tokens += int(stats.num_tokens)
        if stats.grad_norm is not None and math.isfinite(stats.grad_norm):
            w.grad_norm_sum += stats.grad_norm
            w.grad_norm_iters += 1
        w.level_count += stats.level_count.detach().double().cpu()
        w.level_ce_sum += stats.level_ce_sum.detach().double().cpu()
        if self._bar is not None:
            self._bar.update(1)
        if not self.is_log_iteration(iteration):
            return None
        record = self._flush_window(iteration, stats, consumed_samples, extras, timers)
        return record

    def _flush_window(self, iteration: int, last: StepStats, consumed_samples: int,
                      extras: Dict[str, float], timers: Optional[Dict[str, float]]) -> dict:
        w = self.window
        elapsed = max(time.perf_counter() - w.start_time, 1e-9)
        iter_time = elapsed / w.iterations
        tokens_per_s = w.trained_tokens / elapsed
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        mfu = tflops / self.peak if self.peak else None
        loss = w.loss_sum / w.loss_iters if w.loss_iters else float("nan")
        grad_norm = w.grad_norm_sum / w.grad_norm_iters if w.grad_norm_iters else None
        levels = level_report(w.level_count, w.level_ce_sum, self.policy)
        eta = iter_time * max(self.train_iters - iteration, 0)
        record = {
            "kind": "train",
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "loss": loss,
            "lr": last.lr,
            "grad_norm": grad_norm,
            "loss_tokens": w.num_tokens,
            "iter_time_s": iter_time,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": mfu,
            "eta_s": eta,
            "skipped_iterations": w.skipped,
            "levels": levels,
            "time": time.time(),
        }
        # Per-interval scalars (timing): the per-iteration ones went out in log_iteration.
        scalars = {"train/tokens_per_s": tokens_per_s, "train/tflops_per_device": tflops, "train/mfu": mfu}
        if "params-norm" in extras:
            record["params_norm"] = extras["params-norm"]
        if self.throughput_flops_per_iteration is not None:
            # Megatron's --log-throughput: its FLOPs of a global batch / (time per iteration x GPUs)
            # (scaled by the interval's tokens over the nominal batch's: a batch-size ramp-up changes them)
            flops = self.throughput_flops_per_iteration * w.trained_tokens / (w.iterations * self.tokens_per_iteration)
            record["throughput_tflops_per_gpu"] = flops / iter_time / self.world_size / 1e12
        if self.log_timers:
            scalars["iteration-time"] = iter_time
            if "throughput_tflops_per_gpu" in record:
                scalars["throughput"] = record["throughput_tflops_per_gpu"]
            record["timers"] = dict(timers or {})
            scalars.update({f"{name}-time": seconds for name, seconds in record["timers"].items()})
        if self.enabled:
            self._write(record, scalars, iteration)
            self.print(format_train_line(record, self.train_iters))
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last.lr:.2e}", refresh=False)
        self.window = _Window()
        return record

    # ------------------------------------------------------------------ evaluation
    def log_eval(self, iteration: int, split: str, policy_loss: float, num_tokens: int, level_count: torch.Tensor,
                 level_ce_sum: torch.Tensor) -> dict:
        """One evaluation's record. Two different numbers, each under its own name:

        * ``policy_loss``: the loss training optimises (the policy's modes and weights, label smoothing, z-loss),
          summed over the loss-carrying tokens / their number (``loss_tokens``). Not a perplexity's log when the
          policy ignores, down-weights or unlikelihood-trains some levels.
        * ``ce`` and ``ppl = exp(ce)``: the plain cross-entropy (no weight, smoothing or z-loss) averaged over
          every token whose label is kept (``ppl_tokens``: the loss mask applies, every risk level counts,
          whatever the policy does with it), i.e. the usual perplexity of the evaluation data.
        """
        levels = level_report(level_count, level_ce_sum, self.policy)
        ppl_tokens = int(level_count.detach().double().sum().item())
        ce = float(level_ce_sum.detach().double().sum().item()) / ppl_tokens if ppl_tokens else float("nan")
        ppl = math.exp(min(ce, 50.0)) if math.isfinite(ce) else float("nan")
        record = {"kind": split, "iteration": iteration, "policy_loss": policy_loss, "ce": ce, "ppl": ppl,
                  "ppl_tokens": ppl_tokens, "loss_tokens": int(num_tokens), "levels": levels, "time": time.time()}
        scalars = {f"{split}/policy_loss": policy_loss, f"{split}/ce": ce, f"{split}/ppl": ppl}
        for level, info in levels.items():
            scalars[f"{split}/ce_level/{level}_{info['name']}"] = info["ce"]
        if self.enabled:
            self._write(record, scalars, iteration)
            self.print(format_eval_line(record))
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# --------------------------------------------------------------------------- formatting
def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _format_levels(levels: Dict[str, dict]) -> str:
    parts = []
    for level, info in levels.items():
        tag = "" if info["mode"] == "ce" else f"[{info['mode']}]"
        parts.append(f"{level}:{info['name']}{tag}={info['ce']:.4f}")
    return " ".join(parts)


def format_train_line(r: dict, train_iters: int) -> str:
    width = len(str(train_iters))
    grad = f"{r['grad_norm']:.3f}" if r["grad_norm"] is not None else "n/a"
    mfu = f" | MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
    skipped = f" | skipped {r['skipped_iterations']}" if r["skipped_iterations"] else ""
    params = f" | params norm {r['params_norm']:.3f}" if "params_norm" in r else ""
    throughput = (f" | throughput per GPU (TFLOP/s/GPU): {r['throughput_tflops_per_gpu']:.3f}"
                  if "throughput_tflops_per_gpu" in r else "")
    return (
        f"iter {r['iteration']:>{width}}/{train_iters} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | "
        f"grad norm {grad}{params} | {r['iter_time_s'] * 1000:.1f} ms/it | {r['tokens_per_s']:.0f} tok/s | "
        f"{r['tflops_per_device']:.3f} TFLOP/s/dev{mfu}{throughput} | ETA {_format_duration(r['eta_s'])}{skipped}\n"
        f"    ce by risk level: {_format_levels(r['levels'])}"
    )


def format_eval_line(r: dict) -> str:
    return (f"{r['kind']} at iter {r['iteration']} | policy loss {r['policy_loss']:.4f} | ce {r['ce']:.4f} | "
            f"ppl {r['ppl']:.3f} ({r['ppl_tokens']} tokens) | ce by risk level: {_format_levels(r['levels'])}")
