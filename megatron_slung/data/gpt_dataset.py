"""Megatron-style GPT dataset over one indexed dataset or a weighted blend, with per-token risk levels.

For one prefix and one split (a contiguous range of its documents):

1. ``doc_order``: the split's document ids, freshly shuffled for every epoch, for as many epochs as
   ``num_samples`` samples need.
2. ``sample_idx``: where each sample of ``seq_length + 1`` tokens starts in that document stream
   (consecutive samples share one token: the last label of one is the first input of the next).
3. ``shuffle_idx``: a shuffle of the samples; the samples of all but the last epoch are shuffled together,
   those of the last (partly used) epoch separately, so every earlier epoch is used whole.

Blends (``--data-path 0.7 A 0.3 B``) interleave the datasets by the greedy blending index, which keeps
every prefix of the blend within about one sample of the weights; each dataset is asked for exactly the
number of samples the blend takes from it.

The arrays are cached as ``.npy`` under a name that hashes every parameter (and the dataset's size), so
changing anything builds new ones. With torch.distributed initialised, rank 0 builds them while the other
ranks wait; ``build_gpt_datasets`` is then a collective call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings

import numpy as np
import torch

from megatron_slung.data.helpers import build_blending_indices, build_sample_idx
from megatron_slung.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
_CACHE_FORMAT = 1  # bump when the index arrays change meaning


# ---------------------------------------------------------------------------------------- arguments


def parse_data_path(data_path: list[str] | str) -> tuple[list[str], list[float]]:
    """Megatron's ``--data-path``: ``["A"]``, ``["A", "B"]`` (equal weights) or ``["0.7", "A", "0.3", "B"]``.
    Returns (prefixes, weights normalised to sum 1)."""
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path is empty")

    def number(s):
        try:
            return float(s)
        except ValueError:
            return None

    weights = [number(s) for s in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        prefixes = items[1::2]
    elif all(number(s) is None for s in items):
        prefixes, weights = items, [1.0] * len(items)
    else:
        raise ValueError(
            f"--data-path {' '.join(items)}: give either prefixes only or WEIGHT PREFIX pairs (e.g. 0.7 A 0.3 B)"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path {' '.join(items)}: weights must be finite, >= 0 and not all 0")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def parse_split(split: str) -> list[float]:
    """Megatron's ``--split`` ("969,30,1", "98/2/0", "1"): three fractions (train, valid, test) summing to 1."""
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three numbers such as 969,30,1") from None
    if not 1 <= len(parts) <= 3 or any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers, not all 0, such as 969,30,1")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_document_ranges(num_documents: int, fractions: list[float]) -> list[tuple[int, int]]:
    """Split ``num_documents`` into consecutive (start, stop) ranges by ``fractions`` (Megatron's rounding)."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


# ---------------------------------------------------------------------------------------- the cache


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _save_npy(path: str, array: np.ndarray) -> None:
    temp = f"{path}.partial-{os.getpid()}"
    try:
        with open(temp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


class _IndexCache:
    """``{cache_dir}/{hash}-{kind}-{split}-{array}.npy`` for one set of parameters (``{hash}`` covers all of
    them), plus a ``...-description.json`` that lists the parameters."""

    def __init__(self, cache_dir: str | None, description: dict):
        self.description = dict(description, cache_format=_CACHE_FORMAT)
        text = json.dumps(self.description, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:20]
        self.cache_dir = cache_dir

    def path(self, name: str) -> str:
        d = self.description
        return os.path.join(self.cache_dir, f"{self.key}-{d['kind']}-{d['split']}-{name}.npy")

    def load_or_build(self, names: tuple[str, ...], build) -> dict[str, np.ndarray]:
        """The cached arrays (memory-mapped) when all exist, else ``build()``'s, saved when the directory is writable."""
        if self.cache_dir is not None and all(os.path.isfile(self.path(n)) for n in names):
            try:
                return {n: np.load(self.path(n), mmap_mode="r", allow_pickle=False) for n in names}
            except (OSError, ValueError) as e:  # a damaged file: rebuild below
                warnings.warn(f"ignoring unreadable index cache in {self.cache_dir} ({e}); rebuilding", RuntimeWarning)
        start = time.time()
        arrays = build()
        logger.info("built %s indices in %.2fs", self.description.get("kind"), time.time() - start)
        if self.cache_dir is not None:
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
                for n in names:
                    _save_npy(self.path(n), np.ascontiguousarray(arrays[n]))
                desc = self.path("description")[: -len(".npy")] + ".json"
                with open(f"{desc}.partial-{os.getpid()}", "w") as f:
                    json.dump(self.description, f, indent=1, sort_keys=True)
                os.replace(f"{desc}.partial-{os.getpid()}", desc)
            except OSError as e:
                warnings.warn(f"cannot write the index cache to {self.cache_dir} ({e}); using it uncached", RuntimeWarning)
        return arrays


def _pickle_memmaps_by_name(self):
    """Pickle cached index arrays by file name, so DataLoader workers map them instead of copying them."""
    state = dict(self.__dict__)
    for name, value in state.items():
        if isinstance(value, np.memmap) and value.filename:
            state[name] = _Reopen(value.filename)
    return state


def _reopen_memmaps(self, state):
    self.__dict__.update({k: v.load() if isinstance(v, _Reopen) else v for k, v in state.items()})


class _Reopen:
    def __init__(self, filename: str):
        self.filename = filename

    def load(self) -> np.ndarray:
        return np.load(self.filename, mmap_mode="r", allow_pickle=False)


# ---------------------------------------------------------------------------------------- datasets


class GPTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples of ``seq_length + 1`` tokens over documents ``documents`` of ``indexed``.

    ``ds[i]`` is a dict of tensors: ``tokens`` int64 [seq_length], ``labels`` int64 [seq_length] (the next
    tokens), ``risk`` uint8 [seq_length] (the level of each label token), ``loss_mask`` float32 [seq_length]
    (0 where the input token is the EOD when ``eod_mask_loss``, as in Megatron, else 1).
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, seq_length: int, seed: int,
                 num_samples: int, cache_dir: str | None = None, split: str = "train",
                 eod_token: int | None = None, eod_mask_loss: bool = False):
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"{indexed.prefix}: need seq_length >= 1 and num_samples >= 1, got {seq_length}, {num_samples}")
        if eod_mask_loss and eod_token is None:
            raise ValueError("eod_mask_loss needs eod_token")
        self.indexed = indexed
        self.documents = np.asarray(documents, np.int64)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.split = split
        self.eod_token = eod_token
        self.eod_mask_loss = bool(eod_mask_loss)
        self._doc_starts = indexed.document_offsets
        doc_lengths = indexed.document_lengths
        self.tokens_per_epoch = int(doc_lengths[self.documents].sum())
        if self.tokens_per_epoch < 2:
            raise ValueError(
                f"{indexed.prefix}: the {split} split ({len(self.documents)} documents) holds "
                f"{self.tokens_per_epoch} tokens; a sample needs at least 2"
            )
        # The fewest epochs whose samples cover num_samples (a sample needs seq_length + 1 tokens).
        self.num_epochs = -(-(self.num_samples * self.seq_length + 1) // self.tokens_per_epoch)
        first = int(self.documents[0]) if len(self.documents) else 0
        cache = _IndexCache(cache_dir, {
            "kind": "GPTDataset", "prefix": os.path.abspath(indexed.prefix), "num_tokens": indexed.num_tokens,
            "num_documents": indexed.num_documents, "split": split, "documents": [first, len(self.documents)],
            # the indices depend on the document lengths only: a rewritten dataset with other lengths is a new entry
            "document_lengths_sha1": hashlib.sha1(np.ascontiguousarray(doc_lengths[self.documents]).tobytes()).hexdigest(),
            "seq_length": self.seq_length, "seed": self.seed, "num_samples": self.num_samples,
        })
        arrays = cache.load_or_build(("doc_order", "sample_idx", "shuffle_idx"), lambda: self._build(doc_lengths))
        self.doc_order, self.sample_idx, self.shuffle_idx = arrays["doc_order"], arrays["sample_idx"], arrays["shuffle_idx"]
        self.cache_key = cache.key

    def _build(self, doc_lengths: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        doc_order = np.concatenate([rng.permutation(self.documents) for _ in range(self.num_epochs)])
        total = (self.num_epochs * self.tokens_per_epoch - 1) // self.seq_length
        sample_idx = build_sample_idx(doc_lengths, doc_order, self.seq_length, total)
        # Samples starting in the earlier epochs are all used: shuffle them apart from the last epoch's.
        before_last = max(0, ((self.num_epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length)
        shuffle_idx = np.concatenate([rng.permutation(before_last), before_last + rng.permutation(total - before_last)])
        return {"doc_order": doc_order, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx[: self.num_samples]}

    def __len__(self) -> int:
        return self.num_samples

    def get_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``seq_length + 1`` tokens of sample ``i`` and their risk levels (uint8)."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples ({self.indexed.prefix}, {self.split})")
        j = int(self.shuffle_idx[i])
        (pos0, off0), (pos1, off1) = self.sample_idx[j], self.sample_idx[j + 1]
        tokens, risk = [], []
        for pos in range(int(pos0), int(pos1) + 1):
            doc = int(self.doc_order[pos])
            lo = int(off0) if pos == pos0 else 0
            hi = int(off1) + 1 if pos == pos1 else int(self._doc_starts[doc + 1] - self._doc_starts[doc])
            start = int(self._doc_starts[doc]) + lo
            tokens.append(self.indexed.read(start, hi - lo))
            risk.append(self.indexed.read_risk(start, hi - lo))
        return np.concatenate(tokens), np.concatenate(risk)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens, risk = self.get_raw(i)
        return make_sample(tokens, risk, self.eod_token, self.eod_mask_loss)

    __getstate__ = _pickle_memmaps_by_name
    __setstate__ = _reopen_memmaps


def make_sample(tokens: np.ndarray, risk: np.ndarray, eod_token: int | None, eod_mask_loss: bool) -> dict[str, torch.Tensor]:
    """Inputs, next-token labels, the labels' risk levels and the loss mask from ``seq_length + 1`` tokens."""
    tokens = torch.from_numpy(tokens.astype(np.int64))
    labels = tokens[1:].clone()
    loss_mask = torch.ones(len(labels), dtype=torch.float32)
    if eod_mask_loss:  # Megatron's: where the input token is the EOD (predicting the next document's start)
        loss_mask[tokens[:-1] == eod_token] = 0.0
    return {
        "tokens": tokens[:-1].contiguous(),
        "labels": labels,
        "risk": torch.from_numpy(np.array(risk[1:], dtype=np.uint8)),
        "loss_mask": loss_mask,
    }


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples taken from ``datasets`` in proportion to ``weights`` (greedy blending index)."""

    def __init__(self, datasets: list, weights: list[float], size: int, dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray):
        self.datasets = datasets
        self.weights = list(weights)
        self.size = int(size)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return self.size

    __getstate__ = _pickle_memmaps_by_name
    __setstate__ = _reopen_memmaps

    def __getitem__(self, i: int):
        if not -self.size <= i < self.size:
            raise IndexError(f"sample {i} out of range for a blend of {self.size} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


# ---------------------------------------------------------------------------------------- entry point


def default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], cache_dir: str | None = None,
                       eod_token: int | None = None, eod_mask_loss: bool = False, mmap: bool = True):
    """(train, valid, test) datasets for ``--data-path`` / ``--split``; a split with 0 samples or 0 weight is None.
    ``mmap=False``: read the ``.bin`` files with file reads (``--no-mmap-bin-files``).

    ``cache_dir`` (Megatron's ``--data-cache-path``) holds the index arrays; by default
    ``<data dir>/cache/GPTDataset_indices`` beside each prefix. Collective when torch.distributed is initialised.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not _is_rank_zero():
        torch.distributed.barrier()  # rank 0 builds and caches the indices first
    try:
        return _build_gpt_datasets(data_path, split, seq_length, seed, num_samples, cache_dir, eod_token, eod_mask_loss,
                                   mmap)
    finally:
        if distributed and _is_rank_zero():
            torch.distributed.barrier()


def _build_gpt_datasets(data_path, split, seq_length, seed, num_samples, cache_dir, eod_token, eod_mask_loss, mmap):
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must give (train, valid, test), got {num_samples!r}")
    active = [(p, w) for p, w in zip(prefixes, weights) if w > 0]
    indexed = {p: IndexedDataset(p, mmap=mmap) for p, _ in active}
    results = []
    for s, name in enumerate(SPLIT_NAMES):
        size = int(num_samples[s])
        if size <= 0 or fractions[s] == 0:
            results.append(None)
            continue

        def component(prefix, count):
            ds = indexed[prefix]
            start, stop = split_document_ranges(ds.num_documents, fractions)[s]
            if stop <= start:
                raise ValueError(
                    f"{prefix}: the {name} split is empty ({ds.num_documents} documents, --split {split}); "
                    "use more data or another --split"
                )
            return GPTDataset(ds, np.arange(start, stop), seq_length, seed, count,
                              cache_dir if cache_dir is not None else default_cache_dir(prefix),
                              name, eod_token, eod_mask_loss)

        if len(active) == 1:
            results.append(component(active[0][0], size))
            continue
        blend_weights = np.array([w for _, w in active], np.float64)
        blend_cache = _IndexCache(
            cache_dir if cache_dir is not None else default_cache_dir(active[0][0]),
            {"kind": "BlendedDataset", "prefixes": [os.path.abspath(p) for p, _ in active],
             "weights": blend_weights.tolist(), "size": size, "split": name},
        )
        arrays = blend_cache.load_or_build(
            ("dataset_index", "dataset_sample_index"),
            lambda: dict(zip(("dataset_index", "dataset_sample_index"), build_blending_indices(blend_weights, size))),
        )
        counts = np.bincount(arrays["dataset_index"], minlength=len(active))
        parts = [component(p, int(c)) if c > 0 else None for (p, _), c in zip(active, counts)]
        results.append(BlendedDataset(parts, blend_weights.tolist(), size, arrays["dataset_index"],
                                      arrays["dataset_sample_index"]))
    return tuple(results)
