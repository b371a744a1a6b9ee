"""Training data: datasets for the flags, the data-parallel sampler by consumed samples, mock data, batches.

Sample order (Megatron's ``MegatronPretrainingSampler``). Global batch ``k`` is samples
``[k G, (k+1) G)`` of the dataset, whatever the parallel layout (G = global batch size). Data-parallel rank
``d`` takes, for its micro-batch ``j`` (of GAS), the samples

    k G + j (m D) + d m + [0, m)         m = micro batch, D = data-parallel size

so the same global batch is trained on by 1 rank with GAS micro-batches or by D ranks with GAS / D each,
and a run resumed after ``c`` consumed samples continues at sample ``c`` (it is saved with the checkpoint).
TP ranks of one replica read the same samples; middle pipeline stages read nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from megatron_slung.loss.policy import LossMode, LossPolicy

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- tokenizers
def build_tokenizer_for_args(args):
    """The tokenizer Megatron's flags name (``--tokenizer-type`` and its files; the same as tools/preprocess_data.py)."""
    from megatron_slung.data.tokenizers import build_tokenizer, tokenizer_kwargs

    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, **tokenizer_kwargs(args))


def tokenizer_files(args) -> str:
    """The flags naming the tokenizer's files, for messages."""
    if args.tokenizer_type == "GPT2BPETokenizer":
        return f"--vocab-file {args.vocab_file} --merge-file {args.merge_file}"
    if args.tokenizer_type == "NullTokenizer":
        return f"--vocab-size {args.vocab_size}"
    return f"--tokenizer-model {args.tokenizer_model}"


# --------------------------------------------------------------------------- mock data
class MockGPTDataset(torch.utils.data.Dataset):
    """Synthetic samples with a learnable pattern and risk levels, for benchmarks and tests.

    Sample ``i`` (its own generator, seeded by ``seed`` and ``i``, so any order and any worker give the same
    data) is an arithmetic progression modulo the vocabulary with a random start and a stride of 1..3, with
    ~5% random tokens, so a model can learn it. Risk levels: mostly 1 (benign), plus one span of level 2 and
    one of level 3 in each sample, and a few level-0 tokens. The loss mask is all ones (0 where the input
    token is the end-of-document token with ``eod_mask_loss``, as Megatron masks it).
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, *, eod: Optional[int] = None,
                 eod_mask_loss: bool = False):
        if vocab_size < 2:
            raise ValueError("MockGPTDataset: vocab_size must be >= 2")
        self.num_samples, self.seq_length, self.vocab_size = int(num_samples), int(seq_length), int(vocab_size)
        self.seed = int(seed)
        self.eod = eod
        self.eod_mask_loss = eod_mask_loss

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"MockGPTDataset: sample {i} out of range [0, {self.num_samples})")
        s = self.seq_length
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        start = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        text = (start + stride * torch.arange(s + 1)) % self.vocab_size
        noise = torch.rand(s + 1, generator=g) < 0.05
        text = torch.where(noise, torch.randint(0, self.vocab_size, (s + 1,), generator=g), text)
        risk = torch.ones(s + 1, dtype=torch.uint8)
        for level in (2, 3):
            length = int(torch.randint(1, max(2, s // 4), (1,), generator=g))
            begin = int(torch.randint(0, max(1, s + 1 - length), (1,), generator=g))
            risk[begin:begin + length] = level
        risk[torch.rand(s + 1, generator=g) < 0.02] = 0
        tokens, labels = text[:-1].clone(), text[1:].clone()
        loss_mask = torch.ones(s, dtype=torch.float32)
        if self.eod_mask_loss and self.eod is not None:  # Megatron's: where the input token is the EOD
            loss_mask[tokens == self.eod] = 0.0
        return {"tokens": tokens.long(), "labels": labels.long(), "risk": risk[1:].clone(), "loss_mask": loss_mask}


# --------------------------------------------------------------------------- datasets for the flags
def dataset_sizes(args) -> tuple:
    """Samples needed from each split: (train, valid, test), as Megatron computes them (``--train-samples``
    when given, else iterations x the global batch; evaluation batches are of the final global batch)."""
    train_samples = getattr(args, "train_samples", None)
    train = train_samples if train_samples is not None else args.train_iters * args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 1
    valid = evals * args.eval_iters * args.global_batch_size
    test = args.eval_iters * args.global_batch_size
    return train, valid, test


PER_SPLIT_FLAGS = ("train_data_path", "valid_data_path", "test_data_path")
WHOLE_SPLIT = ("1,0,0", "0,1,0", "0,0,1")  # a per-split blend is read whole by its own split


def data_sources(args) -> list:
    """(flag, blend list, --split) pairs the datasets come from: ``--data-path`` with ``--split``, or each
    per-split path given with the whole of it going to its split."""
    if getattr(args, "data_path", None):
        return [("--data-path", list(args.data_path), args.split)]
    return [(f"--{name.replace('_', '-')}", list(getattr(args, name)), WHOLE_SPLIT[i])
            for i, name in enumerate(PER_SPLIT_FLAGS) if getattr(args, name, None)]


def build_datasets(args, tokenizer):
    """(train, valid, test) for ``--data-path``, the per-split paths or ``--mock-data``. Collective (the index
    cache is built by rank 0)."""
    train_n, valid_n, test_n = dataset_sizes(args)
    if args.mock_data:
        def make(n, offset):
            return MockGPTDataset(max(n, 1), args.seq_length, tokenizer.vocab_size, args.seed + offset,
                                  eod=tokenizer.eod, eod_mask_loss=args.eod_mask_loss) if n > 0 else None

        return make(train_n, 0), make(valid_n, 1), make(test_n, 2)
    from megatron_slung.data.gpt_dataset import build_gpt_datasets

    def build(paths, split, sizes):
        return build_gpt_datasets(paths, split, args.seq_length, args.seed, sizes, cache_dir=args.data_cache_path,
                                  eod_token=getattr(tokenizer, "eod", None), eod_mask_loss=args.eod_mask_loss,
                                  mmap=getattr(args, "mmap_bin_files", True))

    sizes = (train_n, valid_n, test_n)
    if args.data_path:
        return build(list(args.data_path), args.split, sizes)
    out = [None, None, None]  # Megatron's blend_per_split: each split its own blend; a split not given is None
    for i, name in enumerate(PER_SPLIT_FLAGS):
        if getattr(args, name, None) and sizes[i] > 0:
            out[i] = build(list(getattr(args, name)), WHOLE_SPLIT[i], tuple(n if j == i else 0
                                                                           for j, n in enumerate(sizes)))[i]
    return tuple(out)


# --------------------------------------------------------------------------- checks before the job starts
def levels_unlike_level_0(policy: LossPolicy) -> List[int]:
    """The levels the policy gives another mode or weight than level 0. Data without a risk channel reads as
    all level 0, so when this is not empty such data would not train as the policy says."""
    first = (policy.modes[0], policy.weights[0])
    return [level for level, mw in enumerate(zip(policy.modes, policy.weights)) if mw != first]


def _format_levels(levels: List[int]) -> str:
    """[2, 3, 5, 6, 7] -> "2-3, 5-7"."""
    runs = []
    for level in levels:
        if runs and level == runs[-1][1] + 1:
            runs[-1][1] = level
        else:
            runs.append([level, level])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass
class CheckedInputs:
    """What ``check_inputs`` found: the tokenizer (reused by the job) and the datasets' risk channels."""

    tokenizer: object
    prefixes: List[str] = field(default_factory=list)  # the datasets read (weight > 0); empty with --mock-data
    without_risk: List[str] = field(default_factory=list)

    def describe(self) -> str:
        if not self.prefixes:
            return "mock data (risk levels built in)"
        n = len(self.prefixes)
        return f"{n} dataset{'s' if n > 1 else ''}, risk channel: {n - len(self.without_risk)} of {n}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _token_range_cache_path(prefix: str, cache_dir: Optional[str]) -> str:
    from megatron_slung.data.gpt_dataset import default_cache_dir

    key = hashlib.sha256(os.path.abspath(prefix).encode()).hexdigest()[:20]
    return os.path.join(cache_dir if cache_dir is not None else default_cache_dir(prefix), f"{key}-token-range.json")


def token_id_range(indexed, cache_dir: Optional[str] = None):
    """(min, max) token id of a dataset: one scan of its ``.bin`` (about 1-2 GB/s), then cached as a small
    JSON in the index cache directory, keyed by the files' sizes and modification times (a rewritten dataset
    is scanned again). None for an empty dataset."""
    from megatron_slung.data.corpus import atomic_output
    from megatron_slung.data.indexed_dataset import bin_path, idx_path

    prefix = indexed.prefix
    stamp = [[st.st_size, st.st_mtime_ns] for st in map(os.stat, (bin_path(prefix), idx_path(prefix)))]
    path = _token_range_cache_path(prefix, cache_dir)
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("prefix") == os.path.abspath(prefix) and cached.get("files") == stamp:
            return None if cached["range"] is None else tuple(cached["range"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = indexed.token_id_range()
    try:  # a cache is a convenience: a read-only data directory just means scanning again next time
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_output(path) as temp, open(temp, "w", encoding="utf-8") as f:
            json.dump({"prefix": os.path.abspath(prefix), "files": stamp,
                       "range": None if found is None else list(found)}, f)
    except OSError:
        pass
    return found


def check_inputs(args) -> CheckedInputs:
    """The tokenizer, the datasets and their fit, checked from the files alone, before torch.distributed and
    DeepSpeed start, so that a wrong path or a mismatch is a one-line error in seconds (``ArgumentError``),
    not a traceback after initialisation. Every rank runs the same checks.

    * the tokenizer loads (``--tokenizer-type`` / ``--tokenizer-model``), ``--vocab-size`` agrees with it,
      ``--eod-mask-loss`` has an end-of-document token;
    * every ``--data-path`` (or per-split path) prefix read (weight > 0) opens (index and data file consistent);
    * its token ids lie in [0, vocabulary size) (else the embedding fails mid-step);
    * it has a risk channel, or the policy treats every level like level 0, or ``--allow-missing-risk``.
    """
    from megatron_slung.training.arguments import ArgumentError

    try:
        tokenizer = build_tokenizer_for_args(args)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise ArgumentError(f"{tokenizer_files(args)}: cannot load the {args.tokenizer_type}: "
                            f"{_one_line(e)}") from None
    vocab = int(tokenizer.vocab_size)
    if args.tokenizer_type not in ("NullTokenizer", "TikTokenizer") and args.vocab_size is not None and args.vocab_size != vocab:
        raise ArgumentError(f"--vocab-size {args.vocab_size} contradicts the tokenizer {args.tokenizer_model}, which "
                            f"has {vocab} tokens; leave --vocab-size out (it is for NullTokenizer)")
    if args.eod_mask_loss and getattr(tokenizer, "eod", None) is None:
        raise ArgumentError(f"--eod-mask-loss needs an end-of-document token; the {args.tokenizer_type} has none")
    checked = CheckedInputs(tokenizer)
    if args.mock_data:
        return checked

    from megatron_slung.data.gpt_dataset import SPLIT_NAMES, parse_data_path, parse_split, split_document_ranges
    from megatron_slung.data.indexed_dataset import IndexedDataset, IndexedDatasetError

    all_needed = dataset_sizes(args)
    without_risk_flag = {}
    for flag, paths, split in data_sources(args):
        try:
            prefixes, weights = parse_data_path(paths)
            fractions = parse_split(split)
        except ValueError as e:
            raise ArgumentError(_one_line(e)) from None
        # per-split paths: only their own split's samples are read from them
        needed = all_needed if flag == "--data-path" else [n if f > 0 else 0 for n, f in zip(all_needed, fractions)]
        what_split = f"--split {split}" if flag == "--data-path" else flag
        active = [p for p, w in zip(prefixes, weights) if w > 0]
        for prefix in active:
            try:
                indexed = IndexedDataset(prefix, mmap=getattr(args, "mmap_bin_files", True))
            except IndexedDatasetError as e:
                raise ArgumentError(f"{flag}: {_one_line(e)}") from None  # the message names the file
            except OSError as e:
                raise ArgumentError(f"{flag} {prefix}: cannot read it ({_one_line(e)})") from None
            # A split that is read but holds no document (in a blend, a part may be asked for no sample of a
            # split: build_gpt_datasets decides there).
            ranges = split_document_ranges(indexed.num_documents, fractions)
            for name, n, fraction, (start, stop) in zip(SPLIT_NAMES, needed, fractions, ranges):
                if len(active) == 1 and n > 0 and fraction > 0 and stop <= start:
                    raise ArgumentError(f"{flag} {prefix}: the {name} split is empty ({indexed.num_documents} "
                                        f"documents, {what_split}); use more data or another --split")
            found = token_id_range(indexed, args.data_cache_path)
            if found is not None and (found[0] < 0 or found[1] >= vocab):
                which = (f"--vocab-size {vocab}" if args.tokenizer_type == "NullTokenizer"
                         else f"the tokenizer ({tokenizer_files(args)})")
                what = (f"holds a negative token id ({found[0]})" if found[0] < 0 else
                        f"holds token ids up to {found[1]}, but {which} has {vocab} tokens (ids 0..{vocab - 1})")
                raise ArgumentError(f"{flag} {prefix}: {what}; preprocess the data with this tokenizer, or train "
                                    "with the one it was made with")
            if prefix not in checked.prefixes:
                checked.prefixes.append(prefix)
                if not indexed.has_risk:
                    checked.without_risk.append(prefix)
                    without_risk_flag.setdefault(prefix, flag)
    unlike = levels_unlike_level_0(LossPolicy.parse(args.risk_loss_policy))
    if checked.without_risk and unlike and not args.allow_missing_risk:
        missing = checked.without_risk
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        levels = f"level{'s' if len(unlike) > 1 else ''} {_format_levels(unlike)}"
        raise ArgumentError(
            f"{without_risk_flag[missing[0]]} {missing[0]}{more} has no risk channel ({missing[0]}.risk.idx/.bin), so every token would "
            f"be level 0, but --risk-loss-policy {args.risk_loss_policy!r} treats {levels} differently; "
            "preprocess the data with risk levels, or pass --allow-missing-risk to train it as level 0")
    return checked


# --------------------------------------------------------------------------- sampler and loader
class MicroBatchSampler(torch.utils.data.Sampler):
    """Index lists of this data-parallel rank's micro-batches, from ``consumed_samples`` on (see module doc)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int):
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total = int(total_samples)
        self.consumed = int(consumed_samples)
        self.m, self.d, self.size = int(micro_batch_size), int(data_parallel_rank), int(data_parallel_size)

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.m * self.size))

    def __iter__(self) -> Iterator[List[int]]:
        step = self.m * self.size
        first = self.consumed
        while first + step <= self.total:
            lo = first + self.d * self.m
            yield list(range(lo, lo + self.m))
            first += step


def build_loader(dataset, consumed_samples: int, args, data_parallel_rank: int, data_parallel_size: int):
    """An iterator of this rank's micro-batches (dicts of stacked tensors), or None without a dataset."""
    if dataset is None:
        return None
    sampler = MicroBatchSampler(len(dataset), consumed_samples, args.micro_batch_size, data_parallel_rank,
                                data_parallel_size)
    # Its own generator: creating the iterator draws a seed, which must not disturb the global RNG (a
    # resumed run creates its iterators at a different point of the RNG stream than a run that never stopped).
    watched = getattr(args, "exit_signal", None) if getattr(args, "exit_signal_handler", False) else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=functools.partial(_ignore_signal, watched) if watched and args.num_workers > 0 else None,
    )
    return iter(loader)


def _ignore_signal(name: str, _worker_id: int) -> None:
    """In a DataLoader worker: --exit-signal is for the trainer, which stops after its iteration and then shuts
    the workers down. SLURM signals every process of a task, and PyTorch's workers die of SIGTERM (their
    handler), which would fail the trainer instead of letting it save."""
    import signal

    signal.signal(signal.Signals[name], signal.SIG_IGN)


class CyclicLoader:
    """Evaluation batches that wrap around: after the last full batch of the dataset, start again at sample 0
    (a resumed or extended run may evaluate more often than the validation set was sized for)."""

    def __init__(self, dataset, consumed_samples: int, args, data_parallel_rank: int, data_parallel_size: int):
        self.dataset, self.args = dataset, args
        self.rank, self.size = data_parallel_rank, data_parallel_size
        step = args.micro_batch_size * data_parallel_size
        usable = len(dataset) // step * step
        if usable == 0:
            raise ValueError(f"the evaluation dataset has {len(dataset)} samples, fewer than one micro-batch on "
                             f"every data-parallel rank ({step})")
        self._it = build_loader(dataset, consumed_samples % usable, args, data_parallel_rank, data_parallel_size)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = build_loader(self.dataset, 0, self.args, self.rank, self.size)
            return next(self._it)


class DataExhausted(RuntimeError):
    pass


def next_micro_batches(loader, count: int, what: str) -> List[dict]:
    out = []
    for _ in range(count):
        try:
            out.append(next(loader))
        except StopIteration:
            raise DataExhausted(f"the {what} dataset ran out of samples") from None
    return out


# --------------------------------------------------------------------------- batches
@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64, IGNORE_INDEX where the loss mask is 0
    risk: torch.Tensor  # [B, S] uint8

    def to(self, device) -> "MicroBatch":
        nb = device is not None and torch.device(device).type == "cuda"
        return MicroBatch(self.tokens.to(device, non_blocking=nb), self.labels.to(device, non_blocking=nb),
                          self.risk.to(device, non_blocking=nb))


def to_micro_batch(sample: dict) -> MicroBatch:
    labels = sample["labels"].long()
    if "loss_mask" in sample:
        labels = labels.masked_fill(sample["loss_mask"] == 0, IGNORE_INDEX)
    risk = sample.get("risk")
    if risk is None:
        risk = torch.zeros_like(labels, dtype=torch.uint8)
    return MicroBatch(sample["tokens"].long(), labels, risk.to(torch.uint8))


def count_loss_tokens(batch: MicroBatch, policy: LossPolicy) -> int:
    """Tokens of ``batch`` that carry loss: label kept (not ignore_index) and the level's mode is not ``ignore``.

    A data-only quantity, so it is known before any forward pass (see the normalisation in pretrain.py)."""
    ignore_levels = torch.tensor([m == LossMode.IGNORE for m in policy.modes], dtype=torch.bool)
    carries = (batch.labels != IGNORE_INDEX) & ~ignore_levels[batch.risk.long().cpu()].to(batch.labels.device)
    return int(carries.sum())
