"""The GPT dataset: samples rebuild the token stream, risk follows the labels, splits, blends, the cache."""

import os

import numpy as np
import pytest
import torch

from megatron_slung.data import gpt_dataset as gd
from megatron_slung.data.gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    build_gpt_datasets,
    parse_data_path,
    parse_split,
    split_document_ranges,
)
from megatron_slung.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tests.distributed import run_distributed

EOD = 0


def make_corpus(prefix, num_docs, source=0, seed=0, max_len=40, multi_sequence=True):
    """Documents whose tokens name their source and document (source*1e6 + doc*1000 + position + 1),
    ending in EOD; risk = token % 7, so every token carries a level that can be checked."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetBuilder(prefix, vocab_size=None) as b:  # int32 tokens
        for d in range(num_docs):
            n = int(rng.integers(1, max_len))
            tokens = np.concatenate([source * 10**6 + d * 1000 + np.arange(n) + 1, [EOD]])
            split = None
            if multi_sequence and n > 2:
                split = [n // 2, len(tokens) - n // 2]
            b.add_document(tokens, risk=tokens % 7, sequence_lengths=split)
            docs.append(tokens)
    return docs


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "data" / "corpus_text_document")
    return prefix, make_corpus(prefix, 60)


def doc_of(token):
    return (token % 10**6) // 1000


def test_parse_data_path():
    assert parse_data_path(["A"]) == (["A"], [1.0])
    assert parse_data_path(["A", "B"]) == (["A", "B"], [0.5, 0.5])
    prefixes, weights = parse_data_path(["0.7", "A", "0.3", "B"])
    assert prefixes == ["A", "B"] and np.allclose(weights, [0.7, 0.3])
    assert parse_data_path("2 A 6 B")[1] == [0.25, 0.75]
    for bad in (["0.5", "A", "B"], ["A", "0.3"], [], ["-1", "A"], ["0", "A"]):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)


def test_parse_split_and_ranges():
    assert np.allclose(parse_split("969,30,1"), [0.969, 0.030, 0.001])
    assert parse_split("98/2") == [0.98, 0.02, 0.0]
    assert parse_split("1") == [1.0, 0.0, 0.0]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)
    assert split_document_ranges(100, parse_split("969,30,1")) == [(0, 97), (97, 100), (100, 100)]
    assert split_document_ranges(3, [0.5, 0.5, 0.0]) == [(0, 1), (1, 3), (3, 3)]
    for n in range(0, 50):
        ranges = split_document_ranges(n, parse_split("8,1,1"))
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_samples_rebuild_the_stream(corpus, tmp_path):
    prefix, docs = corpus
    ds_ix = IndexedDataset(prefix)
    seq = 16
    tokens_per_epoch = sum(len(d) for d in docs)
    num = (tokens_per_epoch - 1) // seq  # exactly one epoch: shuffle_idx is a full permutation
    ds = GPTDataset(ds_ix, np.arange(len(docs)), seq, 1234, num, str(tmp_path / "cache"))
    assert ds.num_epochs == 1 and len(ds) == num
    assert sorted(np.asarray(ds.shuffle_idx).tolist()) == list(range(num))
    assert sorted(np.asarray(ds.doc_order).tolist()) == list(range(len(docs)))
    raw = {int(ds.shuffle_idx[i]): ds.get_raw(i) for i in range(num)}
    stream = np.concatenate([docs[d] for d in ds.doc_order])
    risk_stream = stream % 7
    for j in range(num):
        tokens, risk = raw[j]
        assert len(tokens) == seq + 1
        np.testing.assert_array_equal(tokens, stream[j * seq : j * seq + seq + 1])
        np.testing.assert_array_equal(risk, risk_stream[j * seq : j * seq + seq + 1])
    # the dict: inputs, next-token labels, the labels' risk, the loss mask
    for i in range(0, num, 7):
        s = ds[i]
        tokens, risk = ds.get_raw(i)
        assert s["tokens"].dtype == torch.int64 and s["labels"].dtype == torch.int64
        assert s["risk"].dtype == torch.uint8 and s["loss_mask"].dtype == torch.float32
        assert all(v.shape == (seq,) for v in s.values())
        assert s["tokens"].tolist() == tokens[:-1].tolist() and s["labels"].tolist() == tokens[1:].tolist()
        assert torch.equal(s["risk"], (s["labels"] % 7).to(torch.uint8))  # the level of each label token
        assert torch.all(s["loss_mask"] == 1)


def test_multiple_epochs_use_every_earlier_epoch(corpus, tmp_path):
    prefix, docs = corpus
    tokens_per_epoch = sum(len(d) for d in docs)
    seq = 10
    num = int(2.5 * tokens_per_epoch / seq)
    ds = GPTDataset(IndexedDataset(prefix), np.arange(len(docs)), seq, 5, num, str(tmp_path / "c"))
    assert ds.num_epochs == 3
    order = np.asarray(ds.doc_order).reshape(3, len(docs))
    for epoch in order:  # each epoch is a fresh permutation
        assert sorted(epoch.tolist()) == list(range(len(docs)))
    assert not np.array_equal(order[0], order[1])
    before_last = (2 * tokens_per_epoch - 1) // seq
    used = set(np.asarray(ds.shuffle_idx).tolist())
    assert set(range(before_last)) <= used and len(used) == num
    stream = np.concatenate([docs[d] for d in ds.doc_order])
    for i in range(0, num, 13):
        j = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(ds.get_raw(i)[0], stream[j * seq : j * seq + seq + 1])


def test_eod_mask_loss(corpus, tmp_path):
    prefix, docs = corpus
    train, _, _ = build_gpt_datasets([prefix], "1", 12, 0, (50, 0, 0), str(tmp_path / "c"), EOD, True)
    seen_eod = 0
    for i in range(len(train)):
        s = train[i]
        # Megatron's meaning: no loss where the *input* is the EOD (the guess of the next document's start)
        assert torch.equal(s["loss_mask"], (s["tokens"] != EOD).float())
        seen_eod += int((s["tokens"] == EOD).sum())
    assert seen_eod > 0
    with pytest.raises(ValueError, match="eod_mask_loss needs eod_token"):
        build_gpt_datasets([prefix], "1", 12, 0, (5, 0, 0), str(tmp_path / "c"), None, True)


def test_splits_sizes_and_documents(corpus, tmp_path):
    prefix, docs = corpus
    train, valid, test = build_gpt_datasets([prefix], "80,10,10", 8, 3, (100, 20, 7), str(tmp_path / "c"))
    assert (len(train), len(valid), len(test)) == (100, 20, 7)
    ranges = split_document_ranges(len(docs), parse_split("80,10,10"))
    for ds, (lo, hi) in zip((train, valid, test), ranges):
        for i in range(len(ds)):
            tokens, _ = ds.get_raw(i)
            real = tokens[tokens != EOD]
            assert np.all((doc_of(real) >= lo) & (doc_of(real) < hi))
    # 0 samples or 0 weight -> None
    train, valid, test = build_gpt_datasets([prefix], "90,10,0", 8, 3, (10, 0, 5), str(tmp_path / "c"))
    assert train is not None and valid is None and test is None
    with pytest.raises(ValueError, match="corpus_text_document: the test split is empty"):
        build_gpt_datasets([prefix], "999,0,1", 8, 3, (10, 0, 5), str(tmp_path / "c"))


def test_blend_proportions(tmp_path):
    prefixes = [str(tmp_path / f"src{k}") for k in range(3)]
    for k, p in enumerate(prefixes):
        make_corpus(p, 30 + 10 * k, source=k + 1, seed=k)
    weights = [0.5, 0.3, 0.2]
    data_path = [x for w, p in zip(weights, prefixes) for x in (str(w), p)]
    size = 600
    train, valid, _ = build_gpt_datasets(data_path, "9,1,0", 8, 11, (size, 40, 0), str(tmp_path / "c"))
    assert isinstance(train, BlendedDataset) and len(train) == size and len(valid) == 40
    counts = np.zeros(3)
    for i in range(size):
        tokens = train[i]["tokens"].numpy()
        sources = set((tokens[tokens != EOD] // 10**6).tolist())
        assert len(sources) == 1  # a sample comes from one dataset
        counts[sources.pop() - 1] += 1
    assert np.abs(counts - np.array(weights) * size).max() < 1.0 + 1e-9
    # every prefix of the blend is within one sample of the weights
    which = np.asarray(train.dataset_index)
    running = np.cumsum(np.eye(3)[which], axis=0)
    assert np.abs(running - np.outer(np.arange(1, size + 1), weights)).max() < 1.0 + 1e-9
    # each component dataset was asked for exactly what the blend takes from it
    assert [len(d) for d in train.datasets] == np.bincount(which, minlength=3).tolist()
    # equal weights from prefixes alone; weight 0 drops a dataset
    eq, _, _ = build_gpt_datasets(prefixes[:2], "1", 8, 11, (100, 0, 0), str(tmp_path / "c"))
    assert np.bincount(np.asarray(eq.dataset_index)).tolist() == [50, 50]
    one, _, _ = build_gpt_datasets(["0", prefixes[0], "1", prefixes[1]], "1", 8, 1, (20, 0, 0), str(tmp_path / "c"))
    assert isinstance(one, GPTDataset) and one.indexed.prefix == prefixes[1]


def test_determinism_and_cache(corpus, tmp_path, monkeypatch):
    prefix, _ = corpus
    cache = str(tmp_path / "cache")
    a = build_gpt_datasets([prefix], "1", 8, 42, (80, 0, 0), cache)[0]
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and sum(f.endswith(".npy") for f in files) == 3
    assert not any(".partial-" in f for f in files)

    # a second build reads the cache and builds nothing
    def no_build(*args, **kwargs):
        raise AssertionError("the cached indices should have been used")

    monkeypatch.setattr(gd, "build_sample_idx", no_build)
    b = build_gpt_datasets([prefix], "1", 8, 42, (80, 0, 0), cache)[0]
    assert isinstance(b.sample_idx, np.memmap) and b.cache_key == a.cache_key
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    # any changed parameter is a new cache entry
    for args in [(8, 43, (80, 0, 0)), (9, 42, (80, 0, 0)), (8, 42, (81, 0, 0))]:
        with pytest.raises(AssertionError, match="cached indices"):
            build_gpt_datasets([prefix], "1", args[0], args[1], args[2], cache)
    # a rewritten dataset with the same number of documents and tokens but other lengths is a new entry too
    docs = [np.arange(1, 11, dtype=np.int32)] * 10
    with IndexedDatasetBuilder(str(tmp_path / "re"), dtype=np.int32) as b:
        for d in docs:
            b.add_document(d)
    monkeypatch.undo()
    build_gpt_datasets([str(tmp_path / "re")], "1", 8, 42, (5, 0, 0), cache)
    with IndexedDatasetBuilder(str(tmp_path / "re"), dtype=np.int32) as b:
        b.add_document(np.arange(1, 6, dtype=np.int32))
        for d in docs[1:-1]:
            b.add_document(d)
        b.add_document(np.arange(1, 16, dtype=np.int32))
    monkeypatch.setattr(gd, "build_sample_idx", no_build)
    with pytest.raises(AssertionError, match="cached indices"):
        build_gpt_datasets([str(tmp_path / "re")], "1", 8, 42, (5, 0, 0), cache)
    monkeypatch.undo()
    c = build_gpt_datasets([prefix], "1", 8, 43, (80, 0, 0), cache)[0]
    assert c.cache_key != a.cache_key
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(len(a)))
    # without a cache (fresh directory) the same seed gives the same samples
    d = build_gpt_datasets([prefix], "1", 8, 42, (80, 0, 0), str(tmp_path / "other"))[0]
    assert all(torch.equal(a[i]["tokens"], d[i]["tokens"]) for i in range(len(a)))
    # default cache directory: beside the data
    build_gpt_datasets([prefix], "1", 8, 42, (10, 0, 0))
    assert os.path.isdir(os.path.join(os.path.dirname(prefix), "cache", "GPTDataset_indices"))


def test_dataset_pickles_for_dataloader_workers(corpus, tmp_path):
    import pickle

    prefix, _ = corpus
    build_gpt_datasets([prefix], "1", 8, 1, (30, 0, 0), str(tmp_path / "c"))
    ds = build_gpt_datasets([prefix], "1", 8, 1, (30, 0, 0), str(tmp_path / "c"))[0]  # memory-mapped cache
    blob = pickle.dumps(ds)
    assert len(blob) < 4000
    copy = pickle.loads(blob)
    assert all(torch.equal(ds[i]["tokens"], copy[i]["tokens"]) for i in range(len(ds)))
    # a blend read from its cache pickles small too
    other = str(tmp_path / "other")
    make_corpus(other, 20, source=2)
    blend_args = (["1", prefix, "1", other], "1", 8, 1, (300, 0, 0), str(tmp_path / "c"))
    build_gpt_datasets(*blend_args)
    blend = build_gpt_datasets(*blend_args)[0]
    assert isinstance(blend.dataset_index, np.memmap)
    blob = pickle.dumps(blend)
    assert len(blob) < 8000
    copy = pickle.loads(blob)
    assert all(torch.equal(blend[i]["tokens"], copy[i]["tokens"]) for i in range(0, len(blend), 17))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=0)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (5, 8) and batch["risk"].dtype == torch.uint8


def _distributed_body(rank, world_size, prefix, cache):
    train, _, _ = build_gpt_datasets([prefix], "1", 8, 7, (40, 0, 0), cache)
    loaded_from_cache = isinstance(train.sample_idx, np.memmap)
    return [train[i]["tokens"].tolist() for i in range(len(train))], loaded_from_cache


@pytest.mark.distributed
def test_rank_zero_builds_the_cache(corpus, tmp_path):
    prefix, _ = corpus
    cache = str(tmp_path / "dist_cache")
    results = run_distributed(_distributed_body, world_size=2, args=(prefix, cache))
    assert results[0][0] == results[1][0]
    assert results[0][1] is False and results[1][1] is True  # rank 0 built, rank 1 read its cache
    assert len(os.listdir(cache)) == 4


def test_numpy_fallback_gives_the_same_samples(tmp_path, monkeypatch):
    from megatron_slung import _ext

    prefixes = [str(tmp_path / f"s{k}") for k in range(2)]
    for k, p in enumerate(prefixes):
        make_corpus(p, 25, source=k + 1, seed=k)
    data_path = ["0.6", prefixes[0], "0.4", prefixes[1]]
    fast = build_gpt_datasets(data_path, "1", 8, 3, (120, 0, 0), str(tmp_path / "c1"))[0]
    monkeypatch.setattr(_ext, "HAVE_C", False)
    slow = build_gpt_datasets(data_path, "1", 8, 3, (120, 0, 0), str(tmp_path / "c2"))[0]
    for i in range(len(fast)):
        assert torch.equal(fast[i]["tokens"], slow[i]["tokens"]) and torch.equal(fast[i]["risk"], slow[i]["risk"])
