"""Learning-rate schedule with Megatron's semantics: linear warmup, then constant / linear / cosine /
inverse-square-root decay to ``min_lr``.

With ``n`` = the number of optimizer updates applied so far, ``W`` warmup and ``D`` decay iterations:

    n <= W (and W > 0)  lr = max_lr * n / W                                  (so the first update uses 0)
    constant            lr = max_lr
    n > D               lr = min_lr
    inverse-square-root lr = max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))
    otherwise           r = (n - W) / (D - W);  lr = min_lr + c(r) (max_lr - min_lr)
                        c(r) = 1 - r (linear)  or  (1 + cos(pi r)) / 2 (cosine)

The trainer owns the step count: it sets the learning rate for update ``n`` before the update and counts
the update only when it was applied (an fp16 overflow or a skipped NaN step keeps ``n``), like Megatron's
``OptimizerParamScheduler``. The count is saved in the trainer's checkpoint state.
"""

from __future__ import annotations

import math
from typing import Optional

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def lr_at(num_steps: int, *, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
          decay_style: str) -> float:
    """The learning rate of update number ``num_steps`` (0-based count of applied updates)."""
    if decay_style not in DECAY_STYLES:
        raise ValueError(f"unknown lr decay style {decay_style!r} (choices: {', '.join(DECAY_STYLES)})")
    if warmup_steps > 0 and num_steps <= warmup_steps:
        return max_lr * num_steps / warmup_steps
    if decay_style == "constant":
        return max_lr
    if num_steps > decay_steps:
        return min_lr
    if decay_style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup_steps, 1)) / math.sqrt(max(num_steps, 1)))
    span = decay_steps - warmup_steps
    ratio = (num_steps - warmup_steps) / span if span > 0 else 1.0
    coeff = 1.0 - ratio if decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


class LRScheduler:
    """Sets ``lr`` on every param group of ``optimizer`` (groups may carry an ``lr_mult``)."""

    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 decay_style: str):
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"unknown lr decay style {decay_style!r}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)
        self.decay_style = decay_style
        self.num_steps = 0
        self.apply()

    @classmethod
    def from_args(cls, optimizer, args) -> "LRScheduler":
        return cls(optimizer, max_lr=args.lr, min_lr=args.min_lr, warmup_steps=args.lr_warmup_iters,
                   decay_steps=args.lr_decay_iters, decay_style=args.lr_decay_style)

    def get_lr(self, num_steps: Optional[int] = None) -> float:
        return lr_at(self.num_steps if num_steps is None else num_steps, max_lr=self.max_lr, min_lr=self.min_lr,
                     warmup_steps=self.warmup_steps, decay_steps=self.decay_steps, decay_style=self.decay_style)

    def apply(self) -> float:
        """Write the learning rate for the next update into the optimizer; return it."""
        lr = self.get_lr()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def step(self, increment: int = 1) -> float:
        """Count ``increment`` applied updates and set the next learning rate."""
        self.num_steps += increment
        return self.apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps, "decay_style": self.decay_style}

    def load_state_dict(self, state: dict) -> None:
        """Resume the step count; the schedule itself follows the current flags (as Megatron does)."""
        self.num_steps = int(state["num_steps"])
        self.apply()
