"""The MMIDIDX indexed dataset and its risk channel: format bytes, round trips, and every bad input."""

import os
import pickle
import struct

import numpy as np
import pytest

from megatron_slung.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    bin_path,
    dataset_exists,
    idx_path,
    risk_prefix,
    token_dtype,
)

MAGIC = b"MMIDIDX\x00\x00"


def idx_bytes(code, lengths, itemsize, doc_indices, version=1, magic=MAGIC):
    """An .idx file written field by field from the format description (independent of the module)."""
    out = magic + struct.pack("<Q", version) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_indices))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    pointer = 0
    for n in lengths:
        out += struct.pack("<q", pointer)
        pointer += n * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_indices)
    return out


# Two documents: the first holds two sequences ([5, 6, 7] and [8]), the second one ([65535, 0]).
SEQS = [[5, 6, 7], [8], [65535, 0]]
DOCS = [0, 2, 3]
RISK = [[0, 3, 3], [1], [2, 0]]


def write_hand_built(prefix, with_risk=True):
    lengths = [len(s) for s in SEQS]
    with open(idx_path(prefix), "wb") as f:
        f.write(idx_bytes(8, lengths, 2, DOCS))  # 8 = uint16
    with open(bin_path(prefix), "wb") as f:
        f.write(b"".join(struct.pack("<H", t) for s in SEQS for t in s))
    if with_risk:
        rp = risk_prefix(prefix)
        with open(idx_path(rp), "wb") as f:
            f.write(idx_bytes(1, lengths, 1, DOCS))  # 1 = uint8
        with open(bin_path(rp), "wb") as f:
            f.write(bytes(v for s in RISK for v in s))


def build(prefix, docs, risks=None, seq_splits=None, **kw):
    with IndexedDatasetBuilder(prefix, **kw) as b:
        for i, doc in enumerate(docs):
            b.add_document(doc, None if risks is None else risks[i], None if seq_splits is None else seq_splits[i])
    return b


def test_reads_hand_built_bytes(tmp_path):
    prefix = str(tmp_path / "hand")
    write_hand_built(prefix)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and ds.has_risk
    assert len(ds) == 3 and ds.num_documents == 2 and ds.num_tokens == 6
    assert ds.sequence_lengths.tolist() == [3, 1, 2]
    assert ds.sequence_pointers.tolist() == [0, 6, 8]
    assert ds.document_indices.tolist() == DOCS
    for i, s in enumerate(SEQS):
        assert ds[i].tolist() == s
        assert ds.get_risk(i).dtype == np.uint8 and ds.get_risk(i).tolist() == RISK[i]
    assert ds.get(0, offset=1).tolist() == [6, 7]
    assert ds.get(0, offset=1, length=1).tolist() == [6]
    assert ds.get_risk(0, offset=1, length=2).tolist() == [3, 3]
    assert ds[-1].tolist() == [65535, 0]
    assert ds.document_offsets.tolist() == [0, 4, 6]
    assert ds.document_lengths.tolist() == [4, 2]
    assert ds.read(2, 3).tolist() == [7, 8, 65535]
    assert ds.read_risk(2, 3).tolist() == [3, 1, 2]


def test_builder_writes_the_same_bytes(tmp_path):
    hand, ours = str(tmp_path / "hand"), str(tmp_path / "ours")
    write_hand_built(hand)
    with IndexedDatasetBuilder(ours, vocab_size=65536) as b:
        b.add_document(SEQS[0] + SEQS[1], risk=RISK[0] + RISK[1], sequence_lengths=[3, 1])
        b.add_document(np.array(SEQS[2]), risk=np.array(RISK[2], np.uint8))
    for a, c in [(hand, ours), (risk_prefix(hand), risk_prefix(ours))]:
        for path in (idx_path, bin_path):
            assert open(path(a), "rb").read() == open(path(c), "rb").read(), path(c)
    assert b.num_documents == 2 and b.num_sequences == 3 and b.num_tokens == 6
    assert b.risk_counts[[0, 1, 2, 3]].tolist() == [2, 1, 1, 2]


@pytest.mark.parametrize(
    "kw, dtype",
    [({"vocab_size": 50257}, np.uint16), ({"vocab_size": 65536}, np.uint16), ({"vocab_size": 65537}, np.int32),
     ({}, np.int32), ({"vocab_size": 100, "dtype": np.int64}, np.int64)],
)
def test_round_trip_dtypes(tmp_path, kw, dtype):
    rng = np.random.default_rng(0)
    hi = 2**31 - 1 if dtype != np.uint16 else 65535
    docs = [rng.integers(0, min(hi, kw.get("vocab_size", hi)), rng.integers(0, 50)) for _ in range(40)]
    risks = [rng.integers(0, 256, len(d)).astype(np.uint8) for d in docs]
    splits = []
    for d in docs:  # cut each document into 1..3 sequences
        cuts = np.sort(rng.integers(0, len(d) + 1, rng.integers(0, 3)))
        splits.append(np.diff(np.concatenate(([0], cuts, [len(d)]))))
    prefix = str(tmp_path / "rt")
    build(prefix, docs, risks, splits, **kw)
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and ds.has_risk
    assert ds.num_documents == len(docs) and len(ds) == sum(len(s) for s in splits)
    assert ds.num_tokens == sum(len(d) for d in docs)
    seq = 0
    for d, (doc, risk, split) in enumerate(zip(docs, risks, splits)):
        assert ds.document_indices[d + 1] - ds.document_indices[d] == len(split)
        got = [ds[s] for s in range(seq, seq + len(split))]
        got_risk = [ds.get_risk(s) for s in range(seq, seq + len(split))]
        assert [len(g) for g in got] == list(split)
        np.testing.assert_array_equal(np.concatenate(got) if got else [], doc)
        np.testing.assert_array_equal(np.concatenate(got_risk) if got_risk else [], risk)
        start = ds.document_offsets[d]
        np.testing.assert_array_equal(ds.read(start, len(doc)), doc)
        np.testing.assert_array_equal(ds.read_risk(start, len(doc)), risk)
        seq += len(split)


def test_token_dtype_rule():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    assert token_dtype(None) == np.int32 and token_dtype(10, np.int32) == np.int32
    with pytest.raises(ValueError, match="no Megatron dtype code"):
        token_dtype(None, np.uint32)


def test_missing_risk_reads_as_zeros_and_default_level(tmp_path):
    prefix = str(tmp_path / "norisk")
    write_hand_built(prefix, with_risk=False)
    ds = IndexedDataset(prefix)
    assert not ds.has_risk
    assert ds.get_risk(0).tolist() == [0, 0, 0] and ds.get_risk(2, 1).dtype == np.uint8
    assert ds.read_risk(1, 4).tolist() == [0] * 4
    # risk=None with a default level; with_risk=False writes no risk files at all
    build(str(tmp_path / "dflt"), [[1, 2, 3]], default_risk_level=2)
    assert IndexedDataset(str(tmp_path / "dflt")).get_risk(0).tolist() == [2, 2, 2]
    build(str(tmp_path / "plain"), [[1, 2, 3]], with_risk=False)
    assert not os.path.exists(idx_path(risk_prefix(str(tmp_path / "plain"))))
    assert IndexedDataset(str(tmp_path / "plain")).get_risk(0).tolist() == [0, 0, 0]


def test_empty_dataset_and_empty_documents(tmp_path):
    build(str(tmp_path / "empty"), [])
    ds = IndexedDataset(str(tmp_path / "empty"))
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0
    build(str(tmp_path / "e2"), [[], [4, 5], []])
    ds = IndexedDataset(str(tmp_path / "e2"))
    assert ds.document_lengths.tolist() == [0, 2, 0] and ds[1].tolist() == [4, 5] and len(ds[0]) == 0


def test_out_of_range_reads(tmp_path):
    prefix = str(tmp_path / "hand")
    write_hand_built(prefix)
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError, match="sequence 3 out of range"):
        ds[3]
    with pytest.raises(IndexError, match="out of range for sequence 0 of length 3"):
        ds.get(0, offset=2, length=2)
    with pytest.raises(IndexError):
        ds.read(5, 2)


def test_pickle_reopens_by_prefix(tmp_path):
    prefix = str(tmp_path / "hand")
    write_hand_built(prefix)
    blob = pickle.dumps(IndexedDataset(prefix))
    assert len(blob) < 500  # the data is not copied into the pickle
    assert pickle.loads(blob).get_risk(0).tolist() == RISK[0]


# ------------------------------------------------------------------------------------------ bad input


def corrupt(prefix, which, data):
    with open(which(prefix), "wb") as f:
        f.write(data)


@pytest.fixture
def hand(tmp_path):
    prefix = str(tmp_path / "hand")
    write_hand_built(prefix)
    return prefix


def test_truncated_index(hand):
    good = open(idx_path(hand), "rb").read()
    corrupt(hand, idx_path, good[:20])
    with pytest.raises(IndexedDatasetError, match=r"hand\.idx: truncated index: 20 bytes, the header"):
        IndexedDataset(hand)
    corrupt(hand, idx_path, good[:-8])
    with pytest.raises(IndexedDatasetError, match=r"hand\.idx: truncated index: .* need"):
        IndexedDataset(hand)


def test_truncated_or_long_bin(hand):
    good = open(bin_path(hand), "rb").read()
    corrupt(hand, bin_path, good[:-2])
    with pytest.raises(IndexedDatasetError, match=r"hand\.bin: truncated data file: 10 bytes.* 12 bytes"):
        IndexedDataset(hand)
    corrupt(hand, bin_path, good + b"\0\0")
    with pytest.raises(IndexedDatasetError, match=r"hand\.bin: data file is longer"):
        IndexedDataset(hand)


def test_foreign_magic_version_dtype(hand):
    good = open(idx_path(hand), "rb").read()
    corrupt(hand, idx_path, b"TNTIDX\x00\x00" + good[8:])
    with pytest.raises(IndexedDatasetError, match=r"hand\.idx: not a Megatron indexed dataset index"):
        IndexedDataset(hand)
    corrupt(hand, idx_path, good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(IndexedDatasetError, match=r"hand\.idx: unsupported index version 2"):
        IndexedDataset(hand)
    corrupt(hand, idx_path, good[:17] + b"\x09" + good[18:])
    with pytest.raises(IndexedDatasetError, match=r"hand\.idx: unknown dtype code 9"):
        IndexedDataset(hand)
    corrupt(hand, idx_path, good + b"junk!")
    with pytest.raises(IndexedDatasetError, match=r"hand\.idx: 5 unexpected bytes"):
        IndexedDataset(hand)


def test_inconsistent_index_fields(hand):
    corrupt(hand, idx_path, idx_bytes(8, [3, 1, 2], 2, [0, 2, 2]))
    with pytest.raises(IndexedDatasetError, match=r"hand\.idx: document_indices must run from 0 to .* 3"):
        IndexedDataset(hand)
    corrupt(hand, idx_path, idx_bytes(8, [3, 1, 2], 2, [0, 3, 2, 3]))
    with pytest.raises(IndexedDatasetError, match=r"decrease at document 1"):
        IndexedDataset(hand)
    bad = bytearray(idx_bytes(8, [3, 1, 2], 2, DOCS))
    bad[34 + 12 + 8 : 34 + 12 + 16] = struct.pack("<q", 4)  # second pointer should be 6
    corrupt(hand, idx_path, bytes(bad))
    with pytest.raises(IndexedDatasetError, match=r"sequence 1 starts at byte 4.* end at byte 6"):
        IndexedDataset(hand)


def test_missing_files(tmp_path, hand):
    with pytest.raises(IndexedDatasetError, match="no dataset here"):
        IndexedDataset(str(tmp_path / "nothing"))
    os.remove(bin_path(hand))
    with pytest.raises(IndexedDatasetError, match=r"hand\.bin: cannot open"):
        IndexedDataset(hand)


def test_risk_channel_mismatches(hand):
    rp = risk_prefix(hand)
    corrupt(rp, idx_path, idx_bytes(1, [3, 2, 2], 1, DOCS))
    corrupt(rp, bin_path, bytes(7))
    with pytest.raises(IndexedDatasetError, match=r"hand\.risk\.idx: risk channel length of sequence 1 is 2, .*says 1"):
        IndexedDataset(hand)
    corrupt(rp, idx_path, idx_bytes(1, [3, 1], 1, [0, 2]))
    with pytest.raises(IndexedDatasetError, match=r"hand\.risk\.idx: risk channel has 2 sequences"):
        IndexedDataset(hand)
    corrupt(rp, idx_path, idx_bytes(1, [3, 1, 2], 1, [0, 1, 3]))
    corrupt(rp, bin_path, bytes(6))
    with pytest.raises(IndexedDatasetError, match=r"hand\.risk\.idx: risk channel document_indices differ"):
        IndexedDataset(hand)
    corrupt(rp, idx_path, idx_bytes(8, [3, 1, 2], 2, DOCS))
    with pytest.raises(IndexedDatasetError, match=r"hand\.risk\.idx: a risk channel must have dtype uint8"):
        IndexedDataset(hand)
    corrupt(rp, idx_path, idx_bytes(1, [3, 1, 2], 1, DOCS))
    corrupt(rp, bin_path, bytes(5))
    with pytest.raises(IndexedDatasetError, match=r"hand\.risk\.bin: truncated data file"):
        IndexedDataset(hand)
    os.remove(bin_path(rp))
    with pytest.raises(IndexedDatasetError, match=r"hand\.risk\.bin: missing"):
        IndexedDataset(hand)


def test_builder_rejects_bad_documents(tmp_path):
    prefix = str(tmp_path / "bad")
    b = IndexedDatasetBuilder(prefix, vocab_size=1000)
    with pytest.raises(ValueError, match="document 0 has token ids in \\[0, 70000\\], outside the range of uint16"):
        b.add_document([0, 70000])
    with pytest.raises(ValueError, match="document 0 has 2 tokens but 3 risk levels"):
        b.add_document([1, 2], risk=[0, 0, 0])
    with pytest.raises(ValueError, match="risk levels outside 0..255"):
        b.add_document([1, 2], risk=[0, 256])
    with pytest.raises(ValueError, match="sequence_lengths \\[1, 2\\] sum to 3"):
        b.add_document([1, 2], sequence_lengths=[1, 2])
    with pytest.raises(ValueError, match="non-integer"):
        b.add_document([1.5, 2.0])
    b.abort()
    assert os.listdir(tmp_path) == []


def test_builder_is_atomic(tmp_path):
    prefix = str(tmp_path / "atomic")
    b = IndexedDatasetBuilder(prefix, vocab_size=100)
    b.add_document([1, 2, 3], risk=[0, 1, 2])
    assert not dataset_exists(prefix) and not dataset_exists(risk_prefix(prefix))
    assert all(".partial-" in name for name in os.listdir(tmp_path))
    b.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(prefix, vocab_size=100) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="already aborted"):
        b.add_document([1])
    with IndexedDatasetBuilder(prefix, vocab_size=100) as b:
        b.add_document([1, 2, 3])
    assert sorted(os.listdir(tmp_path)) == ["atomic.bin", "atomic.idx", "atomic.risk.bin", "atomic.risk.idx"]


def test_rebuild_without_risk_removes_the_old_channel(tmp_path):
    prefix = str(tmp_path / "x")
    build(prefix, [[1, 2]], [[3, 3]], vocab_size=10)
    assert IndexedDataset(prefix).has_risk
    build(prefix, [[4, 5, 6]], with_risk=False, vocab_size=10)
    ds = IndexedDataset(prefix)
    assert not ds.has_risk and ds[0].tolist() == [4, 5, 6]
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]


def test_add_documents_batch_equals_one_by_one(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, rng.integers(0, 20)) for _ in range(30)]
    risks = [rng.integers(0, 4, len(d)) for d in docs]
    build(str(tmp_path / "one"), docs, risks, vocab_size=1000)
    with IndexedDatasetBuilder(str(tmp_path / "batch"), vocab_size=1000) as b:
        b.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]], np.concatenate(risks[:10]))
        b.add_documents(np.concatenate(docs[10:]), [len(d) for d in docs[10:]], np.concatenate(risks[10:]))
    for suffix in (".idx", ".bin", ".risk.idx", ".risk.bin"):
        assert open(str(tmp_path / "one") + suffix, "rb").read() == open(str(tmp_path / "batch") + suffix, "rb").read()


def test_add_index_concatenates_tokens_and_risk(tmp_path):
    a, b_, c, out = (str(tmp_path / n) for n in "abco")
    build(a, [[1, 2, 3], [4]], [[1, 1, 3], [2]], seq_splits=[[2, 1], [1]], vocab_size=100)
    build(b_, [[5, 6]], with_risk=False, vocab_size=100)
    build(c, [[7], [8, 9]], [[3], [0, 1]], vocab_size=100)
    with IndexedDatasetBuilder(out, vocab_size=100) as builder:
        builder.add_index(a)
        builder.add_document([10], risk=[2])
        builder.add_index(b_)
        builder.add_index(c)
    ds = IndexedDataset(out)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4], [10], [5, 6], [7], [8, 9]]
    assert [ds.get_risk(i).tolist() for i in range(len(ds))] == [[1, 1], [3], [2], [2], [0, 0], [3], [0, 1]]
    assert ds.document_indices.tolist() == [0, 2, 3, 4, 5, 6, 7]
    assert builder.risk_counts[:4].tolist() == [3, 3, 2, 2]
    with IndexedDatasetBuilder(str(tmp_path / "wide"), dtype=np.int32) as builder:
        with pytest.raises(IndexedDatasetError, match=r"a\.idx: token dtype uint16 differs from .* int32"):
            builder.add_index(a)
