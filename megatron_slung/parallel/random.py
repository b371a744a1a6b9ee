"""RNG states for tensor parallelism (Megatron's ``CudaRNGStatesTracker``, on CPU and CUDA alike).

Two kinds of randomness in a TP model:

* on tensors that are **replicated** across TP ranks (the residual stream without sequence
  parallelism), dropout must be the *same* on every TP rank: use the default generator, seeded
  identically on all ranks of a TP group;
* on tensors that are **split** across TP ranks (attention heads, sequence-parallel shards),
  dropout must *differ* between ranks, or every shard would get the same mask: run it inside
  ``get_rng_tracker().fork()``, which swaps in a per-TP-rank state for the duration.

``model_parallel_manual_seed(seed)`` sets both up (default generator = ``seed`` on every rank;
tracker state ``"model-parallel-rng"`` = ``seed + 2718 + tp_rank``, Megatron's offsets).
A forked state lives on: each fork continues where the previous one left off.

``checkpoint(fn, *args)`` is activation recomputation (``torch.utils.checkpoint``, non-reentrant)
that also replays the tracker's states, so dropout inside a fork gets the same mask on recompute.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
import torch.utils.checkpoint

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718


def _cuda() -> bool:
    return torch.cuda.is_available()


def _current_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if _cuda() else None}


def _restore(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and _cuda():
        torch.cuda.set_rng_state(state["cuda"])


class RNGStatesTracker:
    """Named RNG states (CPU, plus the current CUDA device's when CUDA is available)."""

    def __init__(self):
        self._states: Dict[str, dict] = {}
        self._seeds: set = set()

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def is_initialized(self) -> bool:
        return bool(self._states)

    def add(self, name: str, seed: int) -> None:
        """Register a state ``name`` started from ``seed`` (leaves the current RNG untouched)."""
        if seed in self._seeds:
            raise ValueError(f"RNG tracker: seed {seed} is already in use")
        if name in self._states:
            raise ValueError(f"RNG tracker: state {name!r} already exists")
        outer = _current_state()
        try:
            torch.manual_seed(seed)  # seeds the CPU and every CUDA device
            self._states[name] = _current_state()
        finally:
            _restore(outer)
        self._seeds.add(seed)

    def get_states(self) -> Dict[str, dict]:
        """A copy of the states (for checkpoints and for recomputation)."""
        return {name: dict(s) for name, s in self._states.items()}

    def set_states(self, states: Dict[str, dict]) -> None:
        self._states = {name: dict(s) for name, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with state ``name`` as the default generator; save where it got to."""
        if name not in self._states:
            raise KeyError(
                f"RNG tracker: no state {name!r}; call model_parallel_manual_seed(seed) "
                "(or get_rng_tracker().add(name, seed)) first"
            )
        outer = _current_state()
        _restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _current_state()
            _restore(outer)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_manual_seed(seed: int, tp_rank: Optional[int] = None) -> None:
    """Seed the default generators with ``seed`` and the tracker's TP state with ``seed + 2718 + tp_rank``.

    Call it on every rank after ``initialize_model_parallel`` (``tp_rank`` defaults to this rank's).
    Ranks of one TP group must pass the same ``seed``.
    """
    if tp_rank is None:
        from megatron_slung.parallel.state import get_tensor_model_parallel_rank

        tp_rank = get_tensor_model_parallel_rank()
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + tp_rank)


def _tracker_context_fn():
    """Contexts for torch's checkpoint: remember the tracker at forward, replay it at recompute."""
    saved: Dict[str, dict] = {}

    @contextlib.contextmanager
    def forward_context():
        saved.update(_TRACKER.get_states())
        yield

    @contextlib.contextmanager
    def recompute_context():
        current = _TRACKER.get_states()
        _TRACKER.set_states(saved)
        try:
            yield
        finally:
            _TRACKER.set_states(current)

    return forward_context(), recompute_context()


def checkpoint(function, *args):
    """Activation recomputation: keep only ``args``; rerun ``function`` in the backward pass with
    the same default-generator and tracker RNG states, so dropout masks are identical."""
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_tracker_context_fn
    )
