"""Learning-rate, weight-decay and batch-size schedules with Megatron's semantics.

Megatron's ``OptimizerParamScheduler`` counts **samples**: after each applied update it advances by the
update's global batch size (so a batch-size ramp-up moves the schedule by the samples each step trained).
With ``--train-iters`` the lengths are iterations x ``--global-batch-size``; with ``--train-samples`` they
are given in samples (``schedule_steps``). With ``n`` = samples of the updates applied so far, ``W``
warmup, ``D`` decay, ``init`` = ``--lr-warmup-init``:

    n <= W (and W > 0)  lr = init + (max_lr - init) * n / W             (the first update uses init, default 0)
    constant            lr = max_lr
    n > D               lr = min_lr
    inverse-square-root lr = max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))
    otherwise           r = (n - W) / (D - W);  lr = min_lr + c (max_lr - min_lr)
                        c = 1 - r (linear)  or  (1 + cos(pi r)) / 2 (cosine)
                        WSD: A = D - S (S = the anneal's samples); c = 1 while n <= A, else with
                        q = (n - A) / S: 1 - q (linear), (1 + cos(pi q)) / 2 (cosine),
                        2 * 0.5^q - 1 (exponential), 1 - sqrt(q) (minus_sqrt)

Each parameter group may carry its own ``max_lr``/``min_lr`` (``--decoupled-lr``/``--decoupled-min-lr``
for the embedding and output layer, as Megatron's param groups do). Weight decay, with ``I`` = the
increment's samples (all of training), ``wd = end`` when n > I or the style is constant, else
``start + c (end - start)``, c = n / I (linear) or (1 + cos(pi (1 - n / I))) / 2 (cosine); each group gets
``wd * wd_mult`` (0 for norms and biases).

The trainer owns the count: it sets the values for the next update before it and counts the update only
when it was applied (an fp16 overflow or a skipped NaN step keeps ``n``). The count is saved in the
trainer's checkpoint state.

Batch-size ramp-up (``--rampup-batch-size START INCR SAMPLES``, Megatron's ``RampupBatchsizeNumMicro
BatchesCalculator``): the global batch after ``c`` consumed samples is ``START + INCR * int(c / (SAMPLES /
K))`` (K = (G - START) / INCR increments) while c <= SAMPLES, then G = ``--global-batch-size``. It depends on
the consumed samples only, so a resumed run continues the ramp exactly.
"""

from __future__ import annotations

import math
from typing import Optional

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


def lr_at(num_steps: float, *, max_lr: float, min_lr: float, warmup_steps: float, decay_steps: float,
          decay_style: str, init_lr: float = 0.0, wsd_decay_steps: Optional[float] = None,
          wsd_decay_style: str = "exponential") -> float:
    """The learning rate after ``num_steps`` (samples of the applied updates; any unit, used consistently)."""
    if decay_style not in DECAY_STYLES:
        raise ValueError(f"unknown lr decay style {decay_style!r} (choices: {', '.join(DECAY_STYLES)})")
    if warmup_steps > 0 and num_steps <= warmup_steps:
        return init_lr + (max_lr - init_lr) * num_steps / warmup_steps
    if decay_style == "constant":
        return max_lr
    if num_steps > decay_steps:
        return min_lr
    if decay_style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup_steps, 1)) / math.sqrt(max(num_steps, 1)))
    if decay_style == "WSD":
        if wsd_decay_steps is None:
            raise ValueError("the WSD schedule needs its anneal length (wsd_decay_steps)")
        anneal_start = decay_steps - wsd_decay_steps
        if num_steps <= anneal_start:
            coeff = 1.0
        else:
            q = (num_steps - anneal_start) / wsd_decay_steps
            if wsd_decay_style == "linear":
                coeff = 1.0 - q
            elif wsd_decay_style == "cosine":
                coeff = 0.5 * (math.cos(math.pi * q) + 1.0)
            elif wsd_decay_style == "exponential":
                coeff = 2.0 * math.pow(0.5, q) - 1.0
            elif wsd_decay_style == "minus_sqrt":
                coeff = 1.0 - math.sqrt(q)
            else:
                raise ValueError(f"unknown WSD decay style {wsd_decay_style!r} (choices: {', '.join(WSD_DECAY_STYLES)})")
        return min_lr + coeff * (max_lr - min_lr)
    span = decay_steps - warmup_steps
    ratio = (num_steps - warmup_steps) / span if span > 0 else 1.0
    coeff = 1.0 - ratio if decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


def wd_at(num_steps: float, *, start_wd: float, end_wd: float, incr_steps: float, incr_style: str) -> float:
    """Megatron's weight-decay increment after ``num_steps`` samples."""
    if incr_style not in WD_INCR_STYLES:
        raise ValueError(f"unknown weight decay increment style {incr_style!r} (choices: {', '.join(WD_INCR_STYLES)})")
    if num_steps > incr_steps or incr_style == "constant" or incr_steps <= 0:
        return end_wd
    ratio = num_steps / incr_steps
    coeff = ratio if incr_style == "linear" else 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
    return start_wd + coeff * (end_wd - start_wd)


def schedule_steps(args) -> dict:
    """The schedule's lengths in samples, from the flags (Megatron's ``get_optimizer_param_scheduler``)."""
    fraction = getattr(args, "lr_warmup_fraction", None)
    if getattr(args, "train_samples", None) is None:  # iteration-based: iterations x the global batch
        gbs = args.global_batch_size
        decay = args.lr_decay_iters * gbs
        wsd = args.lr_wsd_decay_iters * gbs if getattr(args, "lr_wsd_decay_iters", None) is not None else None
        warmup = fraction * decay if fraction is not None else args.lr_warmup_iters * gbs
        wd_incr = args.train_iters * gbs
    else:
        decay = args.lr_decay_samples
        wsd = getattr(args, "lr_wsd_decay_samples", None)
        warmup = fraction * decay if fraction is not None else args.lr_warmup_samples
        wd_incr = args.train_samples
    return {"warmup_steps": warmup, "decay_steps": decay, "wsd_decay_steps": wsd, "wd_incr_steps": wd_incr}


class LRScheduler:
    """Sets ``lr`` and ``weight_decay`` on every param group of ``optimizer`` (Megatron's
    ``OptimizerParamScheduler``). A group may carry ``max_lr``/``min_lr`` (its own schedule's ends),
    ``lr_mult`` and ``wd_mult``. ``num_steps`` counts the samples of the applied updates."""

    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_steps: float, decay_steps: float,
                 decay_style: str, init_lr: float = 0.0, wsd_decay_steps: Optional[float] = None,
                 wsd_decay_style: str = "exponential", start_wd: Optional[float] = None,
                 end_wd: Optional[float] = None, wd_incr_steps: float = 0, wd_incr_style: str = "constant"):
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"unknown lr decay style {decay_style!r}")
        if decay_style == "WSD" and wsd_decay_steps is None:
            raise ValueError("the WSD schedule needs its anneal length (wsd_decay_steps)")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = float(max_lr), float(min_lr), float(init_lr)
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.decay_style = decay_style
        self.wsd_decay_steps, self.wsd_decay_style = wsd_decay_steps, wsd_decay_style
        self.start_wd, self.end_wd = start_wd, end_wd  # None: leave each group's weight_decay as built
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.num_steps = 0
        self.apply()

    @classmethod
    def from_args(cls, optimizer, args) -> "LRScheduler":
        steps = schedule_steps(args)
        return cls(optimizer, max_lr=args.lr, min_lr=args.min_lr, warmup_steps=steps["warmup_steps"],
                   decay_steps=steps["decay_steps"], decay_style=args.lr_decay_style,
                   init_lr=getattr(args, "lr_warmup_init", 0.0), wsd_decay_steps=steps["wsd_decay_steps"],
                   wsd_decay_style=getattr(args, "lr_wsd_decay_style", "exponential"),
                   start_wd=args.start_weight_decay, end_wd=args.end_weight_decay,
                   wd_incr_steps=steps["wd_incr_steps"], wd_incr_style=args.weight_decay_incr_style)

    def get_lr(self, num_steps: Optional[float] = None, group: Optional[dict] = None) -> float:
        group = group or {}
        return lr_at(self.num_steps if num_steps is None else num_steps, max_lr=group.get("max_lr", self.max_lr),
                     min_lr=group.get("min_lr", self.min_lr), warmup_steps=self.warmup_steps,
                     decay_steps=self.decay_steps, decay_style=self.decay_style, init_lr=self.init_lr,
                     wsd_decay_steps=self.wsd_decay_steps, wsd_decay_style=self.wsd_decay_style)

    def get_wd(self, num_steps: Optional[float] = None) -> Optional[float]:
        if self.start_wd is None:
            return None
        return wd_at(self.num_steps if num_steps is None else num_steps, start_wd=self.start_wd, end_wd=self.end_wd,
                     incr_steps=self.wd_incr_steps, incr_style=self.wd_incr_style)

    def apply(self) -> float:
        """Write the learning rate and weight decay for the next update into the optimizer; return the lr of
        the default groups (those without their own ``max_lr``)."""
        wd = self.get_wd()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.get_lr(group=group) * group.get("lr_mult", 1.0)
                if wd is not None:
                    group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return self.get_lr()

    def step(self, increment: int) -> float:
        """Count an applied update of ``increment`` samples and set the next learning rate."""
        self.num_steps += increment
        return self.apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "step_unit": "samples", "max_lr": self.max_lr, "min_lr": self.min_lr,
                "lr_warmup_steps": self.warmup_steps, "lr_decay_steps": self.decay_steps,
                "lr_decay_style": self.decay_style, "wsd_decay_steps": self.wsd_decay_steps,
                "lr_wsd_decay_style": self.wsd_decay_style, "start_wd": self.start_wd, "end_wd": self.end_wd,
                "wd_incr_steps": self.wd_incr_steps, "wd_incr_style": self.wd_incr_style}

    def load_state_dict(self, state: dict, saved_global_batch_size: Optional[int] = None) -> None:
        """Resume the count; the schedule itself follows the current flags. A state without ``step_unit``
        (saved before the count was in samples) counted applied updates of ``saved_global_batch_size``."""
        num_steps = state["num_steps"]
        if state.get("step_unit") != "samples":
            if saved_global_batch_size is None:
                raise ValueError("this checkpoint's LR schedule counts updates, not samples, and does not say its "
                                 "global batch size; resume it with --no-load-optim")
            num_steps = int(num_steps) * int(saved_global_batch_size)
        self.num_steps = int(num_steps)
        self.apply()


# --------------------------------------------------------------------------- batch size
class BatchSizeSchedule:
    """The global batch size after ``consumed`` samples: constant ``global_batch_size``, or Megatron's ramp-up
    ``rampup = (start, increment, ramp_samples)`` (see the module docstring)."""

    def __init__(self, global_batch_size: int, rampup: Optional[tuple] = None):
        self.global_batch_size = int(global_batch_size)
        self.rampup = None if rampup is None else tuple(int(v) for v in rampup)
        if self.rampup is not None:
            start, increment, samples = self.rampup
            if start < 1 or increment < 1 or samples < 1:
                raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: each value must be >= 1")
            diff = self.global_batch_size - start
            if diff < 0 or diff % increment != 0:
                raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size "
                                 f"{self.global_batch_size} minus the start {start} must be a non-negative multiple "
                                 f"of the increment {increment}")
            self._per_increment = samples / (diff // increment) if diff > 0 else None

    def at(self, consumed_samples: int) -> int:
        if self.rampup is None or self._per_increment is None:
            return self.global_batch_size
        start, increment, samples = self.rampup
        if consumed_samples > samples:
            return self.global_batch_size
        return start + int(consumed_samples / self._per_increment) * increment

    def sizes(self):
        """Every global batch size the schedule can give (to check them against the layout)."""
        if self.rampup is None:
            return [self.global_batch_size]
        return list(range(self.rampup[0], self.global_batch_size + 1, self.rampup[1]))

    def iterations_for(self, train_samples: int) -> int:
        """The iterations whose global batches fit in ``train_samples`` (a partial last batch is dropped)."""
        iterations, consumed = 0, 0
        while self.rampup is not None and consumed <= self.rampup[2]:  # the ramp, one batch at a time
            size = self.at(consumed)
            if consumed + size > train_samples:
                return iterations
            consumed += size
            iterations += 1
        return iterations + (train_samples - consumed) // self.global_batch_size

    def samples_after(self, iterations: int) -> int:
        """Samples consumed by the first ``iterations`` global batches."""
        consumed = 0
        for _ in range(iterations):
            size = self.at(consumed)
            if size == self.global_batch_size:  # past the ramp: constant from here
                return consumed + (iterations - _) * size
            consumed += size
        return consumed
