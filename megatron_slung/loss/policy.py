"""Loss policy: how the loss treats each risk level. The one parser used by trainer, kernel and tools.

A policy maps every risk level (0..255) to a mode and a weight:

* ``ce``            weight x cross-entropy (the ordinary LM loss);
* ``ignore``        no loss and no gradient; the token still sits in the context;
* ``unlikelihood``  weight x -log(max(1 - p(label), eps)): push probability *away* from the token.

Written as comma-separated ``LEVELS:MODE[@WEIGHT]`` items, e.g. ``"0:ce,1:ce,2:ignore,3:unlikelihood"``
or ``"3:ce@0.1"``. LEVELS is one level (``3``), a range (``4-255``) or ``*`` (every level not named
elsewhere). Levels never named use ``ce`` with weight 1. Preset names are accepted too:

* ``ce``            every level ``ce`` (plain pretraining);
* ``masked``        SLUNG's masked variant: no loss on levels 2 and 3;
* ``unlikelihood``  SLUNG's unlikelihood variant: ``ce`` on 0..2, unlikelihood on 3.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Tuple

import torch

from megatron_slung.data.risk import NUM_LEVELS


class LossMode(enum.IntEnum):
    """Integer codes shared with the C++/CUDA kernels (keep in sync with csrc/masked_ce.h)."""

    CE = 0
    IGNORE = 1
    UNLIKELIHOOD = 2


_MODE_NAMES = {"ce": LossMode.CE, "ignore": LossMode.IGNORE, "unlikelihood": LossMode.UNLIKELIHOOD}

PRESETS = {
    "ce": "*:ce",
    "masked": "*:ce,2:ignore,3:ignore",
    "unlikelihood": "*:ce,3:unlikelihood",
}


@dataclass(frozen=True)
class LossPolicy:
    """Mode and weight for each of the 256 risk levels (immutable, hashable)."""

    modes: Tuple[LossMode, ...]
    weights: Tuple[float, ...]

    def __post_init__(self):
        if len(self.modes) != NUM_LEVELS or len(self.weights) != NUM_LEVELS:
            raise ValueError(f"a loss policy needs exactly {NUM_LEVELS} modes and weights")

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, spec: "str | LossPolicy") -> "LossPolicy":
        """Parse ``"0:ce,1:ce,2:ignore,3:unlikelihood"``-style text (or a preset name)."""
        if isinstance(spec, LossPolicy):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"loss policy must be a string, got {type(spec).__name__}")
        text = PRESETS.get(spec.strip(), spec)
        default = (LossMode.CE, 1.0)
        named: dict[int, Tuple[LossMode, float]] = {}
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            levels_text, sep, mode_text = item.partition(":")
            if not sep:
                raise ValueError(f"loss policy {spec!r}: item {item!r} is not LEVELS:MODE[@WEIGHT]")
            mode, weight = _parse_mode(mode_text.strip(), spec, item)
            levels_text = levels_text.strip()
            if levels_text == "*":
                default = (mode, weight)
                continue
            for level in _parse_levels(levels_text, spec, item):
                if level in named and named[level] != (mode, weight):
                    raise ValueError(f"loss policy {spec!r}: level {level} is given two different modes")
                named[level] = (mode, weight)
        pairs = [named.get(level, default) for level in range(NUM_LEVELS)]
        return cls(tuple(m for m, _ in pairs), tuple(w for _, w in pairs))

    # ------------------------------------------------------------------ queries
    def mode(self, level: int) -> LossMode:
        return self.modes[level]

    def weight(self, level: int) -> float:
        return self.weights[level]

    @property
    def is_plain_ce(self) -> bool:
        """True when every level is ``ce`` with weight 1 (the policy changes nothing)."""
        return all(m == LossMode.CE for m in self.modes) and all(w == 1.0 for w in self.weights)

    def mode_tensor(self, device=None) -> torch.Tensor:
        """[256] uint8 mode codes, for indexing by a uint8 risk tensor."""
        return torch.tensor([int(m) for m in self.modes], dtype=torch.uint8, device=device)

    def weight_tensor(self, device=None) -> torch.Tensor:
        """[256] float32 weights."""
        return torch.tensor(self.weights, dtype=torch.float32, device=device)

    def __str__(self) -> str:
        """Canonical text: the most common (mode, weight) as ``*``, then the exceptions, by level."""
        pairs = list(zip(self.modes, self.weights))
        default = max(set(pairs), key=lambda p: (pairs.count(p), p == (LossMode.CE, 1.0)))
        items = [f"*:{_format_mode(*default)}"]
        items += [f"{lvl}:{_format_mode(m, w)}" for lvl, (m, w) in enumerate(pairs) if (m, w) != default]
        return ",".join(items)


def _format_mode(mode: LossMode, weight: float) -> str:
    name = mode.name.lower()
    return name if weight == 1.0 or mode == LossMode.IGNORE else f"{name}@{weight:g}"


def _parse_mode(text: str, spec: str, item: str) -> Tuple[LossMode, float]:
    name, at, weight_text = text.partition("@")
    mode = _MODE_NAMES.get(name.strip().lower())
    if mode is None:
        raise ValueError(
            f"loss policy {spec!r}: unknown mode {name.strip()!r} in {item!r} "
            f"(modes: {', '.join(_MODE_NAMES)})"
        )
    weight = 1.0
    if at:
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(f"loss policy {spec!r}: weight {weight_text!r} in {item!r} is not a number") from None
        if not weight >= 0.0 or weight == float("inf"):
            raise ValueError(f"loss policy {spec!r}: weight in {item!r} must be finite and >= 0")
        if mode == LossMode.IGNORE:
            raise ValueError(f"loss policy {spec!r}: {item!r} gives a weight to 'ignore', which has no loss")
    return mode, weight


def _parse_levels(text: str, spec: str, item: str) -> range:
    lo_text, dash, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if dash else lo
    except ValueError:
        raise ValueError(f"loss policy {spec!r}: levels {text!r} in {item!r} are not N, N-M or *") from None
    if not (0 <= lo <= hi < NUM_LEVELS):
        raise ValueError(f"loss policy {spec!r}: levels {text!r} in {item!r} are outside 0..{NUM_LEVELS - 1}")
    return range(lo, hi + 1)
