"""Sample order by consumed samples (any data-parallel layout sees the same global batches), mock data, counts."""

import pytest
import torch

from megatron_slung.loss import LossPolicy
from megatron_slung.training.data import (
    IGNORE_INDEX,
    CyclicLoader,
    MicroBatch,
    MicroBatchSampler,
    MockGPTDataset,
    count_loss_tokens,
    to_micro_batch,
)


def _global_batches(total, micro, dp, gas, consumed=0):
    """Sample ids of each global batch, gathered over the DP ranks' micro-batches."""
    per_rank = [list(MicroBatchSampler(total, consumed, micro, r, dp)) for r in range(dp)]
    steps = len(per_rank[0]) // gas
    out = []
    for k in range(steps):
        ids = []
        for r in range(dp):
            for j in range(gas):
                ids += per_rank[r][k * gas + j]
        out.append(sorted(ids))
    return out


def test_every_layout_trains_on_the_same_global_batches():
    g = 8
    expected = [list(range(k * g, (k + 1) * g)) for k in range(5)]
    for micro, dp in [(8, 1), (2, 1), (2, 2), (1, 4), (2, 4), (1, 8)]:
        assert _global_batches(40, micro, dp, g // (micro * dp)) == expected, (micro, dp)


def test_resuming_at_consumed_samples_continues_the_same_order():
    full = list(MicroBatchSampler(48, 0, 2, 1, 2))
    resumed = list(MicroBatchSampler(48, 16, 2, 1, 2))
    assert resumed == full[4:]  # 16 samples = 4 steps of micro 2 x DP 2
    assert full[0] == [2, 3] and full[1] == [6, 7]  # rank 1's slice of each micro step
    assert len(MicroBatchSampler(10, 0, 2, 0, 2)) == 2  # an incomplete last step is dropped
    with pytest.raises(ValueError):
        MicroBatchSampler(10, 0, 2, 2, 2)


def test_mock_dataset_is_deterministic_learnable_and_risk_tagged():
    ds = MockGPTDataset(100, 32, 50, seed=3, eod=49, eod_mask_loss=True)
    a, b = ds[7], MockGPTDataset(100, 32, 50, seed=3, eod=49, eod_mask_loss=True)[7]
    for key in ("tokens", "labels", "risk", "loss_mask"):
        assert torch.equal(a[key], b[key])
    assert a["tokens"].dtype == torch.int64 and a["risk"].dtype == torch.uint8 and a["loss_mask"].dtype == torch.float32
    assert torch.equal(a["tokens"][1:], a["labels"][:-1])  # labels are the next tokens
    assert not torch.equal(ds[7]["tokens"], ds[8]["tokens"])
    levels = torch.cat([ds[i]["risk"] for i in range(20)])
    assert set(levels.unique().tolist()) == {0, 1, 2, 3}
    masked = torch.cat([ds[i]["loss_mask"] == 0 for i in range(100)])
    eod = torch.cat([ds[i]["tokens"] == 49 for i in range(100)])  # Megatron: the EOD input positions
    assert torch.equal(masked, eod)
    # mostly an arithmetic progression: the next token is predictable from the previous two
    t = a["tokens"]
    steps = (t[1:] - t[:-1]) % 50
    assert (steps[1:] == steps[:-1]).float().mean() > 0.7
    with pytest.raises(IndexError):
        ds[100]


def test_loss_token_count_follows_labels_mask_and_policy():
    sample = {"tokens": torch.zeros(2, 4, dtype=torch.long), "labels": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]),
              "risk": torch.tensor([[0, 1, 2, 3], [3, 3, 2, 1]], dtype=torch.uint8),
              "loss_mask": torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])}
    mb = to_micro_batch(sample)
    assert mb.labels[0, 3] == IGNORE_INDEX
    assert count_loss_tokens(mb, LossPolicy.parse("ce")) == 7
    assert count_loss_tokens(mb, LossPolicy.parse("masked")) == 3  # levels 2 and 3 carry no loss
    assert count_loss_tokens(mb, LossPolicy.parse("unlikelihood")) == 7  # unlikelihood tokens do carry loss
    empty = MicroBatch(mb.tokens, torch.full_like(mb.labels, IGNORE_INDEX), mb.risk)
    assert count_loss_tokens(empty, LossPolicy.parse("ce")) == 0


def test_cyclic_loader_wraps_around():
    class Args:
        micro_batch_size, num_workers, seed = 2, 0, 0

    ds = MockGPTDataset(5, 4, 10, seed=0)
    loader = CyclicLoader(ds, 2, Args, 0, 1)
    first = [next(loader)["tokens"] for _ in range(3)]
    assert torch.equal(first[0], torch.stack([ds[2]["tokens"], ds[3]["tokens"]]))
    assert torch.equal(first[1], torch.stack([ds[0]["tokens"], ds[1]["tokens"]]))  # sample 4 is a partial batch


def test_levels_unlike_level_0_say_when_missing_risk_levels_change_the_loss():
    from megatron_slung.training.data import levels_unlike_level_0

    assert levels_unlike_level_0(LossPolicy.parse("ce")) == []
    assert levels_unlike_level_0(LossPolicy.parse("*:ce@0.5")) == []  # uniform: level 0 everywhere is the same
    assert levels_unlike_level_0(LossPolicy.parse("masked")) == [2, 3]
    assert levels_unlike_level_0(LossPolicy.parse("unlikelihood")) == [3]
    assert levels_unlike_level_0(LossPolicy.parse("1:ce@2")) == [1]  # a weight alone counts
    assert levels_unlike_level_0(LossPolicy.parse("0:ignore")) == list(range(1, 256))


def test_token_id_range_is_scanned_once_and_rescanned_when_the_data_changes(tmp_path, monkeypatch):
    import os

    import numpy as np

    from megatron_slung.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from megatron_slung.training.data import token_id_range

    def write(top):
        with IndexedDatasetBuilder(str(tmp_path / "d"), dtype=np.uint16) as b:
            b.add_documents(np.array([5, top, 7, 0, 9], np.uint16), [2, 3])

    write(300)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.token_id_range(chunk=2) == (0, 300)  # chunk boundaries do not matter
    cache = tmp_path / "cache"
    assert token_id_range(ds, str(cache)) == (0, 300)
    assert len(os.listdir(cache)) == 1
    scans = []
    original = IndexedDataset.token_id_range
    monkeypatch.setattr(IndexedDataset, "token_id_range", lambda self, *a: scans.append(1) or original(self, *a))
    assert token_id_range(IndexedDataset(str(tmp_path / "d")), str(cache)) == (0, 300) and scans == []  # cached
    write(40000)  # same sizes, new contents and modification time
    st = os.stat(tmp_path / "d.bin")  # (a coarse file-system clock could give the rewrite the same time)
    os.utime(tmp_path / "d.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert token_id_range(IndexedDataset(str(tmp_path / "d")), str(cache)) == (0, 40000) and scans == [1]
    empty = tmp_path / "e"
    IndexedDatasetBuilder(str(empty), dtype=np.uint16).finalize()
    assert token_id_range(IndexedDataset(str(empty)), str(cache)) is None
