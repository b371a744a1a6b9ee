"""The C++ sample/blending index builders against their numpy references and against their definitions."""

import numpy as np
import pytest

from megatron_slung import _ext
from megatron_slung.data import helpers

needs_c = pytest.mark.skipif(not _ext.HAVE_C, reason="megatron_slung._C is not built")


def random_docs(rng, num_docs, max_len, epochs):
    lengths = rng.integers(0, max_len, num_docs)
    lengths[rng.random(num_docs) < 0.2] = 0  # some empty documents
    order = np.concatenate([rng.permutation(num_docs) for _ in range(epochs)])
    return lengths, order


def test_sample_idx_numpy_matches_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths, order = random_docs(rng, int(rng.integers(1, 30)), 20, int(rng.integers(1, 4)))
        total = int(lengths[order].sum())
        if total < 2:
            continue
        seq = int(rng.integers(1, 12))
        num = (total - 1) // seq
        idx = helpers.build_sample_idx_numpy(lengths, order, seq, num)
        # (position, offset) of every token of the stream, written out one by one
        where = [(p, o) for p, d in enumerate(order) for o in range(lengths[d])]
        assert idx.shape == (num + 1, 2) and idx.dtype == np.int64
        assert [tuple(r) for r in idx.tolist()] == [where[i * seq] for i in range(num + 1)]


@needs_c
def test_sample_idx_cpp_equals_numpy():
    rng = np.random.default_rng(1)
    for trial in range(50):
        lengths, order = random_docs(rng, int(rng.integers(1, 200)), int(rng.integers(1, 300)), int(rng.integers(1, 4)))
        total = int(lengths[order].sum())
        if total < 2:
            continue
        seq = int(rng.integers(1, 600))
        num = int(rng.integers(0, (total - 1) // seq + 1))
        a = helpers.build_sample_idx_numpy(lengths, order, seq, num)
        b = _ext._C.build_sample_idx(lengths.astype(np.int64), order.astype(np.int64), seq, num)
        assert b.dtype == np.int64
        np.testing.assert_array_equal(a, b, err_msg=f"trial {trial}")
    # the dispatching wrapper takes other integer dtypes
    np.testing.assert_array_equal(
        helpers.build_sample_idx(lengths.astype(np.int32), order.astype(np.int32), 3, 2),
        helpers.build_sample_idx_numpy(lengths, order, 3, 2),
    )


@pytest.mark.parametrize("impl", ["numpy", pytest.param("cpp", marks=needs_c)])
def test_sample_idx_errors(impl):
    fn = helpers.build_sample_idx_numpy if impl == "numpy" else (lambda *a: _ext._C.build_sample_idx(*a))
    lengths, order = np.array([3, 0, 2], np.int64), np.array([0, 1, 2], np.int64)
    assert fn(lengths, order, 2, 2).tolist() == [[0, 0], [0, 2], [2, 1]]
    with pytest.raises(ValueError, match="too few tokens for 3 samples of 2 \\+ 1"):
        fn(lengths, order, 2, 3)
    with pytest.raises(ValueError, match=r"doc_order\[1\] = 7 is not a document id"):
        fn(lengths, np.array([0, 7, 2], np.int64), 2, 2)


def test_blending_numpy_matches_definition_and_bound():
    rng = np.random.default_rng(2)
    for _ in range(10):
        k = int(rng.integers(1, 7))
        w = rng.random(k) + 0.01
        w /= w.sum()
        which, within = helpers.build_blending_indices_numpy(w, 3000)
        assert which.dtype == np.int16 and within.dtype == np.int64
        counts = np.zeros(k, np.int64)
        for i, d in enumerate(which):
            lag = w * (i + 1) - counts
            assert d == int(np.argmax(lag))  # the largest lag, lowest index on ties
            assert within[i] == counts[d]
            counts[d] += 1
            # every prefix of the blend stays within one sample of the weights
            assert np.abs(counts - w * (i + 1)).max() < 1.0 + 1e-9


@needs_c
def test_blending_cpp_equals_numpy():
    rng = np.random.default_rng(3)
    for _ in range(30):
        k = int(rng.integers(1, 12))
        w = rng.random(k)
        w[rng.random(k) < 0.2] = 0.0
        w = w / w.sum() if w.sum() > 0 else np.full(k, 1.0 / k)
        size = int(rng.integers(0, 5000))
        a = helpers.build_blending_indices_numpy(w, size)
        b = _ext._C.build_blending_indices(w, size)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert b[0].dtype == np.int16 and b[1].dtype == np.int64
    # equal weights alternate exactly
    assert helpers.build_blending_indices([0.5, 0.5], 6)[0].tolist() == [0, 1, 0, 1, 0, 1]
