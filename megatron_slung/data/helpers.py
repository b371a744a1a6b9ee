"""Index builders for the GPT dataset: the C++ versions (csrc/dataset_helpers.cpp) and numpy references.

``build_sample_idx`` and ``build_blending_indices`` use the extension when it is built and the numpy
versions otherwise; the two give identical arrays (tests compare them on random inputs).
"""

from __future__ import annotations

import numpy as np

from megatron_slung import _ext


def build_sample_idx_numpy(doc_lengths, doc_order, seq_length: int, num_samples: int) -> np.ndarray:
    """Row i = (position in ``doc_order``, token offset in that document) of global token ``i * seq_length``
    of the documents concatenated in ``doc_order``; int64 [num_samples + 1, 2]. Sample i is the
    ``seq_length + 1`` tokens from row i to row i + 1 inclusive. Rows never point into empty documents."""
    if seq_length < 1 or num_samples < 0:
        raise ValueError(f"build_sample_idx: need seq_length >= 1 and num_samples >= 0, got {seq_length}, {num_samples}")
    doc_lengths = np.asarray(doc_lengths, np.int64)
    doc_order = np.asarray(doc_order, np.int64)
    bad = (doc_order < 0) | (doc_order >= len(doc_lengths))
    if bad.any():
        pos = int(np.argmax(bad))
        raise ValueError(
            f"build_sample_idx: doc_order[{pos}] = {doc_order[pos]} is not a document id (0..{len(doc_lengths) - 1})"
        )
    starts = np.zeros(len(doc_order) + 1, np.int64)
    np.cumsum(doc_lengths[doc_order], out=starts[1:])
    targets = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if targets[-1] >= starts[-1]:
        raise ValueError(
            f"build_sample_idx: the documents hold too few tokens for {num_samples} samples of {seq_length} + 1 tokens"
        )
    # The last document starting at or before each target; among equal starts (empty documents) the
    # last one, which is the one that holds the token.
    pos = np.searchsorted(starts, targets, side="right") - 1
    return np.stack([pos, targets - starts[pos]], axis=1)


def build_blending_indices_numpy(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blending: step i takes the dataset with the largest ``weights[k] * (i + 1) - count[k]`` (lowest k
    on ties), so every prefix of the blend is as close to the weights as one sample allows.
    Returns (dataset index per step, int16; sample index within that dataset, int64)."""
    w = [float(x) for x in np.asarray(weights, np.float64).reshape(-1)]
    if not w or len(w) > 32767 or size < 0:
        raise ValueError(f"build_blending_indices: need 1..32767 weights and size >= 0, got {len(w)} and {size}")
    counts = [0] * len(w)
    which = np.empty(size, np.int16)
    within = np.empty(size, np.int64)
    for i in range(size):
        steps = float(i + 1)
        best, best_lag = 0, w[0] * steps - counts[0]
        for d in range(1, len(w)):
            lag = w[d] * steps - counts[d]
            if lag > best_lag:
                best, best_lag = d, lag
        which[i] = best
        within[i] = counts[best]
        counts[best] += 1
    return which, within


def build_sample_idx(doc_lengths, doc_order, seq_length: int, num_samples: int) -> np.ndarray:
    if not _ext.HAVE_C:
        return build_sample_idx_numpy(doc_lengths, doc_order, seq_length, num_samples)
    return _ext._C.build_sample_idx(
        np.ascontiguousarray(doc_lengths, np.int64), np.ascontiguousarray(doc_order, np.int64),
        int(seq_length), int(num_samples),
    )


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    if not _ext.HAVE_C:
        return build_blending_indices_numpy(weights, size)
    return _ext._C.build_blending_indices(np.ascontiguousarray(weights, np.float64).reshape(-1), int(size))


build_sample_idx.__doc__ = build_sample_idx_numpy.__doc__
build_blending_indices.__doc__ = build_blending_indices_numpy.__doc__
