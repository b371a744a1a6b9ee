"""Span validation, characters-to-tokens level mapping (numpy vs the plain loop), harmfulness tags."""

import math

import numpy as np
import pytest

from megatron_slung.data.risk_spans import (
    char_levels,
    document_uniforms,
    insert_harm_tags,
    normalize_spans,
    risky_run_starts,
    token_levels,
    token_levels_reference,
)


def test_normalize_spans_accepts_and_sorts():
    assert normalize_spans([[5, 9, 3], [0, 5, 1], [2, 2, 7]], 9) == [(0, 5, 1), (5, 9, 3)]  # empty span dropped
    assert normalize_spans([[0, 6, 2], [3, 9, 2], [4, 5, 2]], 9) == [(0, 6, 2), (3, 9, 2), (4, 5, 2)]  # same level
    assert normalize_spans([], 0) == []


@pytest.mark.parametrize("spans, message", [
    ([[0, 10, 1]], "out of range"),
    ([[-1, 2, 1]], "out of range"),
    ([[3, 2, 1]], "out of range"),
    ([[0, 2, 256]], "outside 0..255"),
    ([[0, 2, -1]], "outside 0..255"),
    ([[0, 2]], "not \\[start, end, level\\]"),
    ([[0, 2.5, 1]], "not \\[start, end, level\\]"),
    ([[0, True, 1]], "not \\[start, end, level\\]"),
    ("0,2,1", "must be a list"),
    ([[0, 5, 1], [4, 8, 3]], "overlap with different levels"),
    ([[0, 9, 1], [1, 2, 1], [5, 6, 2]], "overlap with different levels"),  # inside the long one, not the last
])
def test_normalize_spans_rejects(spans, message):
    with pytest.raises(ValueError, match=message):
        normalize_spans(spans, 9)


def test_token_levels_rules():
    levels = char_levels([(2, 4, 3), (6, 7, 2)], 8, default_level=1)
    assert levels.tolist() == [1, 1, 3, 3, 1, 1, 2, 1]
    offsets = np.array([[0, 2], [1, 3], [4, 6], [6, 6], [0, 0], [8, 8], [5, 8], [3, 3]])
    # max over covered characters; an empty span takes the character at its position (the last at the end)
    assert token_levels(levels, offsets).tolist() == [1, 3, 1, 2, 1, 1, 2, 3]
    assert token_levels_reference(levels, offsets).tolist() == [1, 3, 1, 2, 1, 1, 2, 3]
    assert token_levels(np.zeros(0, np.uint8), np.zeros((0, 2))).tolist() == []


def test_token_levels_matches_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        levels = rng.choice([0, 1, 2, 3, 4, 200], size=n).astype(np.uint8)
        if rng.random() < 0.3:
            levels[:] = levels[0]
        k = int(rng.integers(0, 40))
        starts = rng.integers(0, n + 1, size=k)
        ends = np.minimum(starts + rng.integers(0, 5, size=k), n)
        offsets = np.stack([starts, ends], axis=1)
        assert np.array_equal(token_levels(levels, offsets), token_levels_reference(levels, offsets))


def test_uniforms_are_keyed_and_uniform():
    a = document_uniforms(1234, 0, 17, 5)
    assert np.array_equal(a, document_uniforms(1234, 0, 17, 5))
    assert np.array_equal(a[:3], document_uniforms(1234, 0, 17, 3))  # a prefix does not depend on the count
    assert not np.array_equal(a, document_uniforms(1234, 0, 18, 5))
    assert not np.array_equal(a, document_uniforms(1234, 1, 17, 5))
    assert not np.array_equal(a, document_uniforms(99, 0, 17, 5))
    u = np.concatenate([document_uniforms(7, 0, line, 4) for line in range(5000)])
    assert ((0 <= u) & (u < 1)).all()
    # Kolmogorov-Smirnov against U(0, 1): D < 1.63 / sqrt(n) at the 1% level
    u.sort()
    d = np.max(np.abs(u - (np.arange(1, len(u) + 1) / len(u))))
    assert d < 1.63 / math.sqrt(len(u))


def test_risky_runs_and_tag_insertion():
    levels = np.array([0, 3, 3, 1, 4, 0, 3], np.uint8)
    assert risky_run_starts(levels, 3).tolist() == [1, 4, 6]  # 3,3 then 4 then 3: three runs
    assert risky_run_starts(levels, 4).tolist() == [4]
    ids = np.arange(10, 17, dtype=np.int32)
    new_ids, new_levels, n = insert_harm_tags(ids, levels, 99, 3, 1.0, 0, 0, 1)
    assert n == 3
    assert new_ids.tolist() == [10, 99, 11, 12, 13, 99, 14, 15, 99, 16]
    assert new_levels.tolist() == [0, 0, 3, 3, 1, 0, 4, 0, 0, 3]  # the tag is level 0
    same = insert_harm_tags(ids, levels, 99, 3, 0.0, 0, 0, 1)
    assert same[2] == 0 and same[0] is ids


def test_tag_rate_is_binomial():
    """Over many documents with one risky run each, the number tagged is Binomial(n, p)."""
    n, p = 4000, 0.05
    levels = np.array([1, 3, 3, 1], np.uint8)
    ids = np.arange(4, dtype=np.int32)
    tagged = sum(insert_harm_tags(ids, levels, 9, 3, p, 1234, 0, line)[2] for line in range(n))
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    assert abs(tagged - mean) < 4 * sd, (tagged, mean, sd)


def test_flat_harm_tags_match_per_document_reference():
    from megatron_slung.data.risk_spans import insert_harm_tags_flat

    rng = np.random.default_rng(1)
    docs = [rng.choice([0, 1, 3, 4], size=int(rng.integers(0, 12))).astype(np.uint8) for _ in range(200)]
    lines = rng.integers(1, 10**6, size=len(docs))
    bounds = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    levels = np.concatenate(docs)
    ids = np.arange(len(levels), dtype=np.int32)
    new_ids, new_levels, new_bounds, per_doc = insert_harm_tags_flat(ids, levels, bounds, -1, 3, 0.5, 42, 2, lines)
    for i, d in enumerate(docs):
        want_ids, want_levels, n = insert_harm_tags(ids[bounds[i]:bounds[i + 1]], d, -1, 3, 0.5, 42, 2, int(lines[i]))
        assert new_ids[new_bounds[i]:new_bounds[i + 1]].tolist() == want_ids.tolist()
        assert new_levels[new_bounds[i]:new_bounds[i + 1]].tolist() == want_levels.tolist()
        assert per_doc[i] == n


@pytest.mark.parametrize("unit", ["char", "byte"])
def test_flat_token_levels_match_per_document_reference(unit):
    """Texts laid end to end (with empty texts and empty spans at text ends) give per-text results."""
    from megatron_slung.data.risk_spans import token_levels_flat
    from megatron_slung.data.tokenizers import FlatEncoding, char_to_byte_offsets

    rng = np.random.default_rng(2)
    alphabet = list("ab é東😀")
    texts, spans, uniform, offsets = [], [], [], []
    for _ in range(120):
        n = int(rng.integers(0, 15))
        text = "".join(rng.choice(alphabet, size=n))
        cuts = sorted(set(rng.integers(0, n + 1, size=3).tolist()))
        sp = [(a, b, int(rng.choice([1, 2, 3, 5]))) for a, b in zip(cuts, cuts[1:]) if b > a]
        k = int(rng.integers(0, 8)) if n else 0
        st = np.sort(rng.integers(0, n + 1, size=k))
        off = np.stack([st, np.minimum(st + rng.integers(0, 3, size=k), n)], axis=1).reshape(-1, 2)
        if n and rng.random() < 0.3:
            off = np.concatenate([off, [[n, n]]])  # an empty token at the very end of the text
        texts.append(text)
        spans.append(normalize_spans(sp, n))
        uniform.append(None if rng.random() < 0.8 else 2)
        offsets.append(off)
    counts = [len(o) for o in offsets]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    if unit == "char":
        bases = np.concatenate([[0], np.cumsum([len(t) for t in texts])])
        conv = [o for o in offsets]
    else:
        bases = np.concatenate([[0], np.cumsum([len(t.encode()) for t in texts])])
        conv = [char_to_byte_offsets(t, o.reshape(-1)).reshape(-1, 2) for t, o in zip(texts, offsets)]
    flat = np.concatenate([c + bases[i] for i, c in enumerate(conv)]).reshape(-1, 2)
    enc = FlatEncoding(np.zeros(len(flat), np.int32), bounds, flat[:, 0], flat[:, 1], unit, bases)
    got = token_levels_flat(enc, texts, spans, uniform, default_level=1)
    for i, text in enumerate(texts):
        lv = np.full(len(text), uniform[i], np.uint8) if uniform[i] is not None else char_levels(spans[i], len(text), 1)
        want = token_levels_reference(lv, offsets[i])
        assert got[bounds[i]:bounds[i + 1]].tolist() == want.tolist(), (text, spans[i], offsets[i])
