"""Megatron-LM's indexed dataset format (MMIDIDX), with a per-token risk channel beside it.

A dataset ``PREFIX`` is two files, exactly as Megatron-LM writes and reads them:

``PREFIX.bin``   the tokens of every sequence, concatenated (no header, little-endian).
``PREFIX.idx``   the index, all integers little-endian::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version, always 1
    u8        dtype code of the tokens (see DTYPE_CODES)
    u64       S, the number of sequences
    u64       D, the number of entries in document_indices (= documents + 1)
    int32[S]  sequence_lengths, in tokens
    int64[S]  sequence_pointers, byte offset of each sequence in the .bin
    int64[D]  document_indices: document d holds sequences [doc[d], doc[d+1]); doc[0] = 0, doc[-1] = S

A document may hold several sequences (Megatron's sentence split); they are contiguous in the .bin.

The risk channel is a second dataset ``PREFIX.risk`` (``PREFIX.risk.bin`` / ``PREFIX.risk.idx``) in the
same format with dtype uint8 and exactly the same sequence lengths and document indices: one risk level
per token. Megatron-LM reads either file pair as an ordinary dataset. A dataset without a risk channel
reads as all level 0 (unlabelled).

The builder streams tokens to temporary files and renames them into place only in ``finalize``, the
token ``.idx`` last, so an interrupted build never leaves a dataset that opens.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from array import array

import numpy as np

from megatron_slung.data.leftovers import claim, release, remove_leftovers

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
RISK_SUFFIX = ".risk"

# Megatron-LM's dtype codes (megatron/core/datasets/indexed_dataset.py, class DType).
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_CHUNK = 1 << 22  # elements per step when checking or writing large index arrays


class IndexedDatasetError(ValueError):
    """A dataset file is missing, truncated, foreign or inconsistent. The message names the file."""


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def risk_prefix(prefix: str) -> str:
    return f"{prefix}{RISK_SUFFIX}"


def dataset_exists(prefix: str) -> bool:
    """True when ``PREFIX.idx`` and ``PREFIX.bin`` both exist (the risk channel is optional)."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


# preprocess --partitions writes its part datasets into ``.PREFIX.partitions-PID``: complete-looking
# datasets that are not finished data. Readers refuse them (only the concatenation step may open them).
_TEMPORARY_DIR = re.compile(r"^\..+\.partitions-\d+$")


def partitions_dir(output_prefix: str, pid: int | str | None = None) -> str:
    """The temporary directory of preprocess's part datasets for ``output_prefix``, written by process
    ``pid`` (default: this one; ``""`` gives the name without a PID)."""
    parent, base = os.path.split(os.path.abspath(output_prefix))
    return os.path.join(parent, f".{base}.partitions-{os.getpid() if pid is None else pid}")


def in_temporary_dir(prefix: str) -> bool:
    return bool(_TEMPORARY_DIR.match(os.path.basename(os.path.dirname(os.path.abspath(prefix)))))


def has_risk_channel(prefix: str) -> bool:
    return dataset_exists(risk_prefix(prefix))


def token_dtype(vocab_size: int | None = None, dtype=None) -> np.dtype:
    """The token dtype: ``dtype`` when given, else uint16 when the vocabulary fits (<= 65536), else int32."""
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {dtype} has no Megatron dtype code; use one of {sorted(map(str, CODE_OF_DTYPE))}")
        return dtype
    if vocab_size is not None and vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


# ----------------------------------------------------------------------------------------------- reading


class _Index:
    """A parsed, checked ``.idx`` file. The arrays are read-only views of a memory map."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise IndexedDatasetError(f"{path}: cannot open the index ({e.strerror or e})") from None
        if size < HEADER_SIZE:
            raise IndexedDatasetError(f"{path}: truncated index: {size} bytes, the header alone is {HEADER_SIZE}")
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[: len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(
                f"{path}: not a Megatron indexed dataset index (magic {header[:len(MAGIC)]!r}, expected {MAGIC!r})"
            )
        version, code, num_sequences, num_doc_entries = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise IndexedDatasetError(f"{path}: unsupported index version {version} (only version {VERSION} exists)")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = DTYPE_CODES[code]
        if num_doc_entries < 1:
            raise IndexedDatasetError(f"{path}: document count is 0; document_indices must at least hold the leading 0")
        expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_entries
        if size < expected:
            raise IndexedDatasetError(
                f"{path}: truncated index: {size} bytes, but {num_sequences} sequences and "
                f"{num_doc_entries - 1} documents need {expected}"
            )
        # Megatron's multimodal datasets append one int8 mode per sequence; nothing else may follow.
        if size not in (expected, expected + num_sequences):
            raise IndexedDatasetError(
                f"{path}: {size - expected} unexpected bytes after the document indices (expected {expected} bytes)"
            )
        self._mmap = np.memmap(path, mode="r")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._mmap, np.int32, num_sequences, offset)
        offset += 4 * num_sequences
        self.sequence_pointers = np.frombuffer(self._mmap, np.int64, num_sequences, offset)
        offset += 8 * num_sequences
        self.document_indices = np.frombuffer(self._mmap, np.int64, num_doc_entries, offset)
        self._check()

    def _check(self):
        path, lengths, pointers, docs = self.path, self.sequence_lengths, self.sequence_pointers, self.document_indices
        n = len(lengths)
        if docs[0] != 0 or docs[-1] != n:
            raise IndexedDatasetError(
                f"{path}: document_indices must run from 0 to the sequence count {n}, found {docs[0]} .. {docs[-1]}"
            )
        for start in range(0, len(docs) - 1, _CHUNK):
            step = np.diff(docs[start : start + _CHUNK + 1])
            if (step < 0).any():
                bad = start + int(np.argmax(step < 0))
                raise IndexedDatasetError(f"{path}: document_indices decrease at document {bad}")
        # Sequences must be stored back to back (Megatron's writer always does so): pointer = bytes before it.
        itemsize = self.dtype.itemsize
        total = 0
        for start in range(0, n, _CHUNK):
            chunk = lengths[start : start + _CHUNK].astype(np.int64)
            if (chunk < 0).any():
                bad = start + int(np.argmax(chunk < 0))
                raise IndexedDatasetError(f"{path}: sequence {bad} has negative length {chunk[bad - start]}")
            expected = total + np.cumsum(chunk) - chunk  # tokens before each sequence
            if not np.array_equal(pointers[start : start + _CHUNK], expected * itemsize):
                bad = start + int(np.argmax(pointers[start : start + _CHUNK] != expected * itemsize))
                raise IndexedDatasetError(
                    f"{path}: sequence {bad} starts at byte {pointers[bad]}, but the sequences before it end at "
                    f"byte {int(expected[bad - start]) * itemsize} (sequences must be contiguous)"
                )
            total += int(chunk.sum())
        self.num_tokens = total


class FileBinReader:
    """A ``.bin`` read with one file read per access instead of a memory map (Megatron's
    ``--no-mmap-bin-files``: for file systems where mapping large files is slow or not allowed). Supports
    the contiguous slices the readers take: ``reader[a:b]`` is a fresh array."""

    def __init__(self, path: str, dtype: np.dtype, num_tokens: int):
        self.path, self.dtype, self.num_tokens = path, np.dtype(dtype), int(num_tokens)

    def __len__(self) -> int:
        return self.num_tokens

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.num_tokens)
        if step != 1:
            raise IndexError(f"{self.path}: only contiguous slices can be read")
        count = max(0, stop - start)
        with open(self.path, "rb") as f:  # opened per read: nothing shared with forked loader workers
            f.seek(start * self.dtype.itemsize)
            return np.fromfile(f, self.dtype, count)


def _map_bin(path: str, dtype: np.dtype, num_tokens: int, idx: str, mmap: bool = True) -> np.ndarray:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise IndexedDatasetError(f"{path}: cannot open the data file ({e.strerror or e})") from None
    expected = num_tokens * dtype.itemsize
    if size != expected:
        what = "truncated data file" if size < expected else "data file is longer than its index says"
        raise IndexedDatasetError(
            f"{path}: {what}: {size} bytes, but {idx} lists {num_tokens} {dtype} tokens = {expected} bytes"
        )
    if size == 0:  # numpy cannot memory-map an empty file
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r") if mmap else FileBinReader(path, dtype, num_tokens)


class IndexedDataset:
    """Memory-mapped reader of ``PREFIX.bin/.idx`` and, when present, its risk channel ``PREFIX.risk.bin/.idx``.

    ``len(ds)`` is the number of sequences; ``ds[i]`` / ``ds.get(i, offset, length)`` return the tokens of
    sequence ``i`` and ``ds.get_risk(...)`` its risk levels (uint8; zeros when there is no risk channel).
    ``read(start, count)`` / ``read_risk(start, count)`` read the flat token stream (documents are contiguous,
    ``document_offsets`` gives each document's first token).
    """

    def __init__(self, prefix: str, *, temporary_ok: bool = False, mmap: bool = True):
        self.prefix = str(prefix)
        self.mmap = bool(mmap)  # False: the .bin files are read with file reads (--no-mmap-bin-files)
        if not temporary_ok and in_temporary_dir(self.prefix):
            raise IndexedDatasetError(f"{prefix}: a part dataset inside the temporary directory of a preprocessing "
                                      "run (finished or killed), not a finished dataset; use that run's output")
        self._open()

    def _open(self):
        prefix = self.prefix
        if not os.path.exists(idx_path(prefix)) and not os.path.exists(bin_path(prefix)):
            raise IndexedDatasetError(f"{prefix}: no dataset here (neither {idx_path(prefix)} nor {bin_path(prefix)} exists)")
        self._index = _Index(idx_path(prefix))
        self._bin = _map_bin(bin_path(prefix), self._index.dtype, self._index.num_tokens, idx_path(prefix), self.mmap)
        self._risk_index = None
        self._risk_bin = None
        rprefix = risk_prefix(prefix)
        ridx, rbin = idx_path(rprefix), bin_path(rprefix)
        if os.path.exists(ridx) or os.path.exists(rbin):
            if not (os.path.exists(ridx) and os.path.exists(rbin)):
                missing = rbin if os.path.exists(ridx) else ridx
                raise IndexedDatasetError(f"{missing}: missing; the risk channel of {prefix} needs both .risk.idx and .risk.bin")
            rindex = _Index(ridx)
            if rindex.dtype != np.uint8:
                raise IndexedDatasetError(f"{ridx}: a risk channel must have dtype uint8, found {rindex.dtype}")
            if len(rindex.sequence_lengths) != len(self._index.sequence_lengths):
                raise IndexedDatasetError(
                    f"{ridx}: risk channel has {len(rindex.sequence_lengths)} sequences, "
                    f"{idx_path(prefix)} has {len(self._index.sequence_lengths)}"
                )
            for start in range(0, len(rindex.sequence_lengths), _CHUNK):
                a = rindex.sequence_lengths[start : start + _CHUNK]
                b = self._index.sequence_lengths[start : start + _CHUNK]
                if not np.array_equal(a, b):
                    bad = start + int(np.argmax(a != b))
                    raise IndexedDatasetError(
                        f"{ridx}: risk channel length of sequence {bad} is {a[bad - start]}, "
                        f"but {idx_path(prefix)} says {b[bad - start]} tokens"
                    )
            if not np.array_equal(rindex.document_indices, self._index.document_indices):
                raise IndexedDatasetError(f"{ridx}: risk channel document_indices differ from those of {idx_path(prefix)}")
            self._risk_index = rindex
            self._risk_bin = _map_bin(rbin, rindex.dtype, rindex.num_tokens, ridx, self.mmap)
        self._document_offsets = None

    # Pickle by prefix (DataLoader workers reopen the memory maps instead of copying the data).
    def __getstate__(self):
        return {"prefix": self.prefix, "mmap": self.mmap}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self.mmap = state.get("mmap", True)
        self._open()

    def __repr__(self):
        return (
            f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_documents} documents, "
            f"{self.num_tokens} {self.dtype} tokens, risk={'yes' if self.has_risk else 'no'})"
        )

    # -- metadata
    def __len__(self) -> int:
        return len(self._index.sequence_lengths)

    @property
    def dtype(self) -> np.dtype:
        return self._index.dtype

    @property
    def has_risk(self) -> bool:
        return self._risk_index is not None

    @property
    def num_tokens(self) -> int:
        return self._index.num_tokens

    @property
    def num_documents(self) -> int:
        return len(self._index.document_indices) - 1

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self._index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self._index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self._index.document_indices

    @property
    def document_offsets(self) -> np.ndarray:
        """int64 [num_documents + 1]: the first token of each document in the flat stream, then num_tokens."""
        if self._document_offsets is None:
            starts = np.empty(len(self) + 1, np.int64)
            starts[:-1] = self.sequence_pointers // self.dtype.itemsize
            starts[-1] = self.num_tokens
            self._document_offsets = starts[self.document_indices]
        return self._document_offsets

    @property
    def document_lengths(self) -> np.ndarray:
        """int64 [num_documents]: tokens per document (all its sequences)."""
        return np.diff(self.document_offsets)

    # -- reading
    def _span(self, i: int, offset: int, length: int | None) -> tuple[int, int]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{self.prefix}: sequence index must be an integer, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range (the dataset has {n} sequences)")
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"{self.prefix}: tokens [{offset}, {offset + length}) out of range for sequence {i} of length {seq_len}"
            )
        return int(self.sequence_pointers[i]) // self.dtype.itemsize + offset, length

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start, length = self._span(i, offset, length)
        return self._bin[start : start + length]

    def get_risk(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start, length = self._span(i, offset, length)
        return self.read_risk(start, length)

    def read(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens of the flat token stream from token ``start`` (may cross documents)."""
        if start < 0 or count < 0 or start + count > self.num_tokens:
            raise IndexError(f"{self.prefix}: tokens [{start}, {start + count}) outside 0..{self.num_tokens}")
        return self._bin[start : start + count]

    def token_id_range(self, chunk: int = 1 << 20) -> tuple[int, int] | None:
        """(smallest, largest) token id in the whole ``.bin``, or None when it holds no token.

        One pass over the file in chunks of ``chunk`` tokens (small enough that min and max of a chunk both
        read it from the CPU cache); memory stays at one chunk whatever the file's size."""
        lo = hi = None
        for start in range(0, self.num_tokens, chunk):
            part = self._bin[start : start + chunk]
            a, b = int(part.min()), int(part.max())
            lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
        return None if lo is None else (lo, hi)

    def read_risk(self, start: int, count: int) -> np.ndarray:
        """The risk levels (uint8) of ``read(start, count)``; zeros when there is no risk channel."""
        if start < 0 or count < 0 or start + count > self.num_tokens:
            raise IndexError(f"{self.prefix}: tokens [{start}, {start + count}) outside 0..{self.num_tokens}")
        if self._risk_bin is None:
            return np.zeros(count, np.uint8)
        return self._risk_bin[start : start + count]


# ----------------------------------------------------------------------------------------------- writing


def write_index(path: str, dtype: np.dtype, sequence_lengths, document_indices) -> None:
    """Write an ``.idx`` file (Megatron's layout) for contiguous sequences of ``dtype``."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[dtype], len(lengths), len(docs)))
        f.write(lengths.astype("<i4", copy=False).tobytes())
        total = 0
        for start in range(0, len(lengths), _CHUNK):  # pointers in chunks: never 8 bytes x S in one piece
            chunk = lengths[start : start + _CHUNK].astype(np.int64)
            ends = np.cumsum(chunk)
            pointers = (total + ends - chunk) * dtype.itemsize
            f.write(pointers.astype("<i8", copy=False).tobytes())
            total += int(ends[-1])
        f.write(docs.astype("<i8", copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _temp_name(path: str) -> str:
    return f"{path}.partial-{os.getpid()}"


class IndexedDatasetBuilder:
    """Streams documents into ``PREFIX.bin/.idx`` (+ ``PREFIX.risk.bin/.idx`` when ``with_risk``).

    ``dtype`` wins; otherwise uint16 when ``vocab_size <= 65536``, else int32. Nothing appears under the
    final names before ``finalize()``; ``abort()`` (or an exception inside ``with``) removes everything.
    Memory: 12 bytes per sequence for the index, nothing per token.
    """

    def __init__(self, prefix: str, dtype=None, vocab_size: int | None = None, with_risk: bool = True,
                 default_risk_level: int = 0):
        self.prefix = str(prefix)
        self.dtype = token_dtype(vocab_size, dtype)
        self.with_risk = bool(with_risk)
        if not 0 <= int(default_risk_level) <= 255:
            raise ValueError(f"default_risk_level {default_risk_level} is outside 0..255")
        self.default_risk_level = int(default_risk_level)
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._lengths = array("i")  # int32 per sequence
        self._doc_indices = array("q", [0])  # int64 per document (+1)
        self.num_tokens = 0
        self.risk_counts = np.zeros(256, np.int64)  # tokens per risk level written so far
        self._finals = [bin_path(self.prefix), idx_path(self.prefix)]
        if self.with_risk:
            rp = risk_prefix(self.prefix)
            self._finals += [bin_path(rp), idx_path(rp)]
        self._temps = {path: _temp_name(path) for path in self._finals}
        parent = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(parent, exist_ok=True)
        # What a killed earlier build of this prefix left (its PID is gone) is removed, with a note.
        every = [bin_path(self.prefix), idx_path(self.prefix), bin_path(risk_prefix(self.prefix)),
                 idx_path(risk_prefix(self.prefix))]
        remove_leftovers([f"{path}.partial-" for path in every])
        for temp in self._temps.values():
            claim(temp)
        self._state = "open"
        self._bin = open(self._temps[bin_path(self.prefix)], "wb", buffering=1 << 20)
        self._risk = None
        if self.with_risk:
            self._risk = open(self._temps[bin_path(risk_prefix(self.prefix))], "wb", buffering=1 << 20)

    @property
    def num_documents(self) -> int:
        return len(self._doc_indices) - 1

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()
        return False

    def __del__(self):  # a builder dropped without finalize() leaves no temporary files behind
        if getattr(self, "_state", None) == "open":
            try:
                self.abort()
            except Exception:  # interpreter shutdown
                pass

    def _check_open(self):
        if self._state != "open":
            raise RuntimeError(f"{self.prefix}: the builder is already {self._state}")

    def _tokens(self, tokens, where: str) -> np.ndarray:
        if hasattr(tokens, "detach"):  # a torch tensor
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.dtype == self.dtype:
            return arr
        if arr.size and self._info is not None:
            if arr.dtype.kind not in "iub":
                raise ValueError(f"{self.prefix}: {where} has non-integer tokens of dtype {arr.dtype}")
            lo, hi = arr.min(), arr.max()
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(
                    f"{self.prefix}: {where} has token ids in [{lo}, {hi}], outside the range of {self.dtype} "
                    f"(pass vocab_size or a wider dtype)"
                )
        return arr.astype(self.dtype)

    def _risk_levels(self, risk, n: int, where: str) -> np.ndarray:
        if risk is None:
            return np.full(n, self.default_risk_level, np.uint8)
        if hasattr(risk, "detach"):
            risk = risk.detach().cpu().numpy()
        arr = np.asarray(risk).reshape(-1)
        if len(arr) != n:
            raise ValueError(f"{self.prefix}: {where} has {n} tokens but {len(arr)} risk levels")
        if arr.dtype != np.uint8:
            if arr.size and (arr.dtype.kind not in "iub" or arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"{self.prefix}: {where} has risk levels outside 0..255")
            arr = arr.astype(np.uint8)
        return arr

    def add_document(self, tokens, risk=None, sequence_lengths=None) -> None:
        """Append one document: ``tokens`` (1-D ints), its ``risk`` levels (same length; None → the default
        level), and optionally its split into sequences (``sequence_lengths`` summing to ``len(tokens)``)."""
        self._check_open()
        where = f"document {self.num_documents}"
        arr = self._tokens(tokens, where)
        lengths = None
        if sequence_lengths is not None:
            lengths = np.asarray(sequence_lengths, dtype=np.int64).reshape(-1)
            if (lengths < 0).any() or int(lengths.sum()) != len(arr):
                raise ValueError(
                    f"{self.prefix}: {where} has {len(arr)} tokens but sequence_lengths {lengths.tolist()} "
                    f"sum to {int(lengths.sum())}"
                )
        levels = self._risk_levels(risk, len(arr), where) if self._risk is not None else None
        # Everything is checked: from here on the document is written whole.
        if lengths is None:
            self._lengths.append(len(arr))
        else:
            self._lengths.extend(lengths.tolist())
        if levels is not None:
            self._risk.write(levels.tobytes())
            if len(levels):
                self.risk_counts += np.bincount(levels, minlength=256)
        self._bin.write(arr.tobytes())
        self.num_tokens += len(arr)
        self._doc_indices.append(len(self._lengths))

    def add_documents(self, tokens, document_lengths, risk=None) -> None:
        """Append many one-sequence documents at once: ``tokens`` holds them back to back,
        ``document_lengths`` their lengths, ``risk`` (optional) their levels back to back."""
        self._check_open()
        where = f"documents {self.num_documents}.."
        arr = self._tokens(tokens, where)
        lengths = np.asarray(document_lengths, dtype=np.int64).reshape(-1)
        if (lengths < 0).any() or int(lengths.sum()) != len(arr):
            raise ValueError(f"{self.prefix}: {where}: document lengths sum to {int(lengths.sum())}, tokens are {len(arr)}")
        levels = self._risk_levels(risk, len(arr), where) if self._risk is not None else None
        if levels is not None:
            self._risk.write(levels.tobytes())
            if len(levels):
                self.risk_counts += np.bincount(levels, minlength=256)
        self._bin.write(arr.tobytes())
        base = len(self._lengths)
        self._lengths.extend(lengths.tolist())
        self._doc_indices.extend(range(base + 1, base + len(lengths) + 1))
        self.num_tokens += len(arr)

    def add_index(self, other_prefix: str, *, temporary_ok: bool = False) -> None:
        """Append a whole finished dataset (tokens and, if this builder has one, risk) by copying its files.
        A source without a risk channel contributes level-0 risk. ``temporary_ok``: the source may be a
        part dataset of a preprocessing run (see ``in_temporary_dir``)."""
        self._check_open()
        other = IndexedDataset(other_prefix, temporary_ok=temporary_ok)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{idx_path(other_prefix)}: token dtype {other.dtype} differs from this dataset's {self.dtype} "
                f"({self.prefix}); datasets of different dtypes cannot be merged"
            )
        base = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths, dtype=np.int32).tobytes())
        self._doc_indices.frombytes((other.document_indices[1:] + base).astype(np.int64).tobytes())
        with open(bin_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)
        if self._risk is not None:
            if other.has_risk:
                with open(bin_path(risk_prefix(other_prefix)), "rb") as src:
                    shutil.copyfileobj(src, self._risk, 16 << 20)
                for start in range(0, other.num_tokens, 64 << 20):
                    chunk = other.read_risk(start, min(64 << 20, other.num_tokens - start))
                    self.risk_counts += np.bincount(chunk, minlength=256)
            else:
                zeros = np.zeros(min(other.num_tokens, 16 << 20), np.uint8).tobytes()
                left = other.num_tokens
                while left > 0:
                    step = min(left, len(zeros))
                    self._risk.write(zeros[:step])
                    left -= step
                self.risk_counts[0] += other.num_tokens
        self.num_tokens += other.num_tokens
        del other

    def finalize(self) -> None:
        """Write the indices and move every file to its final name (the token ``.idx`` last)."""
        self._check_open()
        try:
            for f in (self._bin, self._risk):
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
            docs = np.frombuffer(self._doc_indices, dtype=np.int64)
            write_index(self._temps[idx_path(self.prefix)], self.dtype, lengths, docs)
            if self.with_risk:
                write_index(self._temps[idx_path(risk_prefix(self.prefix))], np.uint8, lengths, docs)
        except BaseException:
            self.abort()
            raise
        # An older dataset under this prefix stops being valid first; the new one becomes valid last.
        for stale in (idx_path(self.prefix), idx_path(risk_prefix(self.prefix))):
            if os.path.exists(stale):
                os.remove(stale)
        if not self.with_risk and os.path.exists(bin_path(risk_prefix(self.prefix))):
            os.remove(bin_path(risk_prefix(self.prefix)))
        for final in reversed(self._finals):  # risk .idx/.bin, then tokens .bin, then tokens .idx
            if final != idx_path(self.prefix):
                os.replace(self._temps[final], final)
        os.replace(self._temps[idx_path(self.prefix)], idx_path(self.prefix))
        self._state = "finalized"
        for temp in self._temps.values():
            release(temp)

    def abort(self) -> None:
        """Close and delete the temporary files; nothing is left under the final names."""
        if self._state != "open":
            return
        self._state = "aborted"
        for f in (self._bin, self._risk):
            if f is not None and not f.closed:
                f.close()
        for temp in self._temps.values():
            if os.path.exists(temp):
                os.remove(temp)
            release(temp)
