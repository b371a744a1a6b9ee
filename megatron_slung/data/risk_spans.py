"""From character risk spans to one risk level per token, and harmfulness-tag insertion.

A document's ``risk_spans`` are ``[[char_start, char_end, level], ...]`` (end exclusive, offsets in
characters of the text). Characters no span covers take a default level. A token takes the **highest**
level among the characters it covers; a token that covers no character (SentencePiece's dummy-prefix
``▁``, or the first byte pieces of a split emoji, which get empty spans) takes the level of the
character at its position, i.e. the one that follows it (the last one at the end of the text).

Harmfulness tags: a *risky span* is a maximal run of tokens with level >= L. Before each one, the tag
token is inserted with probability P, decided by a counter-based random number drawn from (seed,
input file number, line number, run number): the same document gets the same tags whatever the
number of workers or partitions. The tag token gets level 0.

Fast paths are numpy; ``token_levels_reference`` is the plain loop the tests compare against.
"""

from __future__ import annotations

import itertools

import numpy as np

from megatron_slung.data.risk import NUM_LEVELS

_MASK64 = (1 << 64) - 1


def normalize_spans(spans, text_len: int) -> list[tuple[int, int, int]]:
    """Validate spans and return them sorted as ``(start, end, level)`` tuples.

    Raises ValueError (with a message that names the span) when a span is not three integers, is out of
    ``0 <= start <= end <= text_len``, has a level outside 0..255, or overlaps a span of another level.
    Overlapping spans of one level are allowed; empty spans are dropped.
    """
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"risk spans must be a list of [start, end, level], got {type(spans).__name__}")
    out = []
    for i, span in enumerate(spans):
        if type(span) not in (list, tuple) or len(span) != 3:
            raise ValueError(f"risk span #{i} {span!r} is not [start, end, level] with integer values")
        s, e, level = span
        if type(s) is not int or type(e) is not int or type(level) is not int:  # bool is not int here
            raise ValueError(f"risk span #{i} {span!r} is not [start, end, level] with integer values")
        if not 0 <= s <= e <= text_len:
            raise ValueError(f"risk span #{i} {list(span)} is out of range for a text of {text_len} characters")
        if not 0 <= level < NUM_LEVELS:
            raise ValueError(f"risk span #{i} {list(span)} has level {level} outside 0..{NUM_LEVELS - 1}")
        if e > s:
            out.append((s, e, level))
    out.sort()
    # Sweep: the span reaching furthest so far must agree with every span that starts inside it.
    reach_end, reach_level, reach = -1, None, None
    for span in out:
        s, e, level = span
        if s < reach_end and level != reach_level:
            raise ValueError(f"risk spans {list(reach)} and {list(span)} overlap with different levels")
        if e > reach_end:
            reach_end, reach_level, reach = e, level, span
    return out


def char_levels(spans, text_len: int, default_level: int = 0) -> np.ndarray:
    """One uint8 level per character: ``default_level`` where no span covers it."""
    levels = np.full(text_len, default_level, dtype=np.uint8)
    for s, e, level in spans:
        levels[s:e] = level
    return levels


def _expand_empty(starts: np.ndarray, ends: np.ndarray, n: int):
    """Give empty spans the character at their position (or the last one at the end of the text)."""
    empty = ends <= starts
    if not empty.any():
        return starts, ends
    s = np.where(empty, np.minimum(starts, n - 1), starts)
    e = np.where(empty, s + 1, ends)
    return s, e


def token_levels(levels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Risk level per token: the max of ``levels[start:end]`` over each token's span (numpy, no loops per token).

    ``levels`` has one entry per character (or per byte, with byte offsets: the rule is the same);
    ``offsets`` is an ``[n_tokens, 2]`` array of spans.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n = len(levels)
    if len(offsets) == 0 or n == 0:
        return np.zeros(len(offsets), dtype=np.uint8)
    present = np.unique(levels)
    out = np.full(len(offsets), present[0], dtype=np.uint8)
    if len(present) == 1:
        return out
    starts, ends = _expand_empty(np.clip(offsets[:, 0], 0, n), np.clip(offsets[:, 1], 0, n), n)
    count = np.zeros(n + 1, dtype=np.int64)
    for level in present[1:]:  # ascending: a higher level overwrites a lower one
        np.cumsum(levels >= level, out=count[1:])
        out[count[ends] > count[starts]] = level
    return out


def token_levels_reference(levels, offsets) -> np.ndarray:
    """Plain-loop version of :func:`token_levels` (for tests)."""
    levels = list(np.asarray(levels).tolist())
    n = len(levels)
    out = []
    for start, end in np.asarray(offsets).reshape(-1, 2).tolist():
        start, end = min(max(start, 0), n), min(max(end, 0), n)
        if n == 0:
            out.append(0)
        elif end > start:
            out.append(max(levels[start:end]))
        else:
            out.append(levels[min(start, n - 1)])
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Counter-based random numbers for harmfulness tags


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_uniforms(seed: int, file_index: int, line: int, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) that depend only on (seed, file_index, line) and their position."""
    key = _doc_keys(seed, file_index, np.array([line]))
    with np.errstate(over="ignore"):
        bits = _splitmix64(key ^ np.arange(count, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def risky_run_starts(levels: np.ndarray, min_level: int) -> np.ndarray:
    """Indices where a maximal run of tokens with level >= ``min_level`` begins."""
    risky = np.asarray(levels) >= min_level
    if not risky.any():
        return np.zeros(0, dtype=np.int64)
    begins = risky.copy()
    begins[1:] &= ~risky[:-1]
    return np.flatnonzero(begins)


def insert_harm_tags(ids: np.ndarray, levels: np.ndarray, tag_id: int, min_level: int, prob: float,
                     seed: int, file_index: int, line: int):
    """Insert ``tag_id`` (level 0) before each risky run with probability ``prob``.

    Returns ``(ids, levels, n_inserted)``; the inputs are returned unchanged when nothing is inserted.
    """
    runs = risky_run_starts(levels, min_level)
    if len(runs) == 0 or prob <= 0:
        return ids, levels, 0
    chosen = runs[document_uniforms(seed, file_index, line, len(runs)) < prob]
    if len(chosen) == 0:
        return ids, levels, 0
    return (np.insert(ids, chosen, tag_id).astype(ids.dtype, copy=False),
            np.insert(levels, chosen, 0).astype(np.uint8, copy=False), len(chosen))


# ----------------------------------------------------------------------------------------------------
# Whole batches at once (the preprocessing fast path; the per-document functions above are the reference)


def _doc_keys(seed: int, file_index: int, lines: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64)) ^ np.uint64(file_index & _MASK64)
        key = _splitmix64(key)
        return _splitmix64(key ^ np.asarray(lines, dtype=np.int64).astype(np.uint64))


def token_levels_flat(enc, texts, spans, uniform, default_level: int) -> np.ndarray:
    """Token levels for a whole :class:`~megatron_slung.data.tokenizers.FlatEncoding`.

    ``spans[i]``: text i's normalised spans (character offsets); ``uniform[i]``: the level of all of text
    i's characters when they share one (then its spans are not needed), else None.
    """
    counts = np.diff(enc.bounds)
    is_mixed = np.fromiter((u is None for u in uniform), dtype=bool, count=len(uniform))
    out = np.repeat(np.array([default_level if u is None else u for u in uniform], dtype=np.uint8), counts)
    if not is_mixed.any():
        return out
    if is_mixed.all():
        return _mixed_levels(enc, texts, spans, default_level)
    # Only the mixed texts need the per-character work: take them out, laid end to end on their own.
    from megatron_slung.data.tokenizers import FlatEncoding

    m = np.flatnonzero(is_mixed)
    tokens = np.repeat(is_mixed, counts)
    sub_bases = np.concatenate([[0], np.cumsum(np.diff(enc.bases)[m])])
    shift = np.repeat(enc.bases[:-1][m] - sub_bases[:-1], counts[m])
    sub = FlatEncoding(enc.ids[tokens], np.concatenate([[0], np.cumsum(counts[m])]), enc.starts[tokens] - shift,
                       enc.ends[tokens] - shift, enc.unit, sub_bases)
    out[tokens] = _mixed_levels(sub, [texts[i] for i in m], [spans[i] for i in m], default_level)
    return out


def _mixed_levels(enc, texts, spans, default_level: int) -> np.ndarray:
    """:func:`token_levels_flat` when every text has its own spans."""
    counts = np.diff(enc.bounds)
    bases = enc.bases
    unit_levels = np.full(int(bases[-1]), default_level, dtype=np.uint8)
    per_doc = [len(sp) for sp in spans]
    if sum(per_doc):
        table = np.array(list(itertools.chain.from_iterable(spans)), dtype=np.int64).reshape(-1, 3)
        doc = np.repeat(np.arange(len(texts), dtype=np.int64), per_doc)
        s, e, lv = table[:, 0], table[:, 1], table[:, 2]
        if enc.unit == "byte" and not all(t.isascii() for t in texts):
            # character -> byte: positions of character starts in the texts laid end to end
            data = np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8)
            char_starts = np.append(np.flatnonzero((data & 0xC0) != 0x80), len(data))
            char_bases = np.concatenate([[0], np.cumsum([len(t) for t in texts])])
            s, e = char_starts[char_bases[doc] + s], char_starts[char_bases[doc] + e]
        else:
            s, e = bases[doc] + s, bases[doc] + e
        n = len(unit_levels)
        for level in np.unique(lv):  # spans of different levels never overlap: paint each level's cover
            pick = lv == level
            depth = np.cumsum(np.bincount(s[pick], minlength=n + 1)[:n] - np.bincount(e[pick], minlength=n + 1)[:n])
            unit_levels[depth > 0] = level
    if len(enc.ids) == 0:
        return np.zeros(0, dtype=np.uint8)
    # Empty spans take the unit at their position, but never one of the next text.
    doc_end = np.repeat(bases[1:], counts)
    starts, ends = enc.starts, enc.ends
    empty = ends <= starts
    if empty.any():
        starts = np.where(empty, np.minimum(starts, doc_end - 1), starts)
        ends = np.where(empty, starts + 1, ends)
    present = np.unique(unit_levels)
    out = np.full(len(starts), present[0] if len(present) else 0, dtype=np.uint8)
    count = np.zeros(len(unit_levels) + 1, dtype=np.int64)
    for level in present[1:]:
        np.cumsum(unit_levels >= level, out=count[1:])
        out[count[ends] > count[starts]] = level
    return out


def insert_harm_tags_flat(ids, levels, bounds, tag_id: int, min_level: int, prob: float, seed: int,
                          file_index: int, lines):
    """:func:`insert_harm_tags` for many documents laid end to end (text i = ``ids[bounds[i]:bounds[i+1]]``,
    keyed by ``lines[i]``). Returns ``(ids, levels, bounds, tags_per_document)``."""
    ndocs = len(bounds) - 1
    risky = levels >= min_level
    begins = risky.copy()
    if len(begins):
        begins[1:] &= ~risky[:-1]
        counts = np.diff(bounds)
        begins[bounds[:-1][counts > 0]] = risky[bounds[:-1][counts > 0]]  # a run never continues across texts
    pos = np.flatnonzero(begins)
    if len(pos) == 0 or prob <= 0:
        return ids, levels, bounds, np.zeros(ndocs, dtype=np.int64)
    doc = np.searchsorted(bounds, pos, side="right") - 1
    run_no = np.arange(len(pos)) - np.searchsorted(doc, doc, side="left")
    keys = _doc_keys(seed, file_index, np.asarray(lines))[doc]
    with np.errstate(over="ignore"):
        bits = _splitmix64(keys ^ run_no.astype(np.uint64))
    u = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    chosen = pos[u < prob]
    per_doc = np.bincount(doc[u < prob], minlength=ndocs)
    if len(chosen) == 0:
        return ids, levels, bounds, per_doc
    new_bounds = bounds + np.concatenate([[0], np.cumsum(per_doc)])
    return (np.insert(ids, chosen, tag_id).astype(ids.dtype, copy=False),
            np.insert(levels, chosen, 0).astype(np.uint8, copy=False), new_bounds, per_doc)
