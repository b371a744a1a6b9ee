"""Reading JSONL corpora and writing outputs safely: shared by the tagging and preprocessing tools.

- Inputs are JSON-lines files, plain or compressed (``.gz``, ``.zst``); ``.json`` is read as JSON lines
  too, like Megatron-LM does. A pattern with ``*``/``?``/``[`` is a glob, expanded in sorted order.
- Records are read in chunks of whole lines, with the file and line number of each, so that any bad
  record can be reported as ``path:line: what is wrong``.
- Outputs are written under a temporary name and renamed at the end; a failure removes them.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import io
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

COMPRESSED_SUFFIXES = (".gz", ".zst")


class InputError(ValueError):
    """A bad input record. ``str(err)`` reads ``path:line: message``."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return (InputError, (self.path, self.line, self.message))


def expand_inputs(spec: str | list[str]) -> list[str]:
    """Files named by ``spec``: a path, a glob, or a list of either (globs sorted, order kept)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for s in specs:
        if glob.has_magic(s):
            matches = sorted(p for p in glob.glob(s) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"--input {s!r} matches no file")
            files.extend(matches)
        elif os.path.isfile(s):
            files.append(s)
        else:
            raise FileNotFoundError(f"input file {s!r} does not exist")
    return files


def is_compressed(path: str) -> bool:
    return path.endswith(COMPRESSED_SUFFIXES)


def open_binary(path: str):
    """A binary reader over ``path``, decompressing ``.gz`` and ``.zst`` on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


@dataclass
class Chunk:
    """Whole lines of one file: ``data`` starts at 1-based line ``first_line`` of ``files[file_index]``."""

    file_index: int
    path: str
    first_line: int
    data: bytes


def read_chunks(path: str, file_index: int = 0, chunk_bytes: int = 1 << 20, start: int = 0,
                end: int | None = None, first_line: int = 1):
    """Yield :class:`Chunk` s of about ``chunk_bytes`` of whole lines of ``path``.

    ``start``/``end`` restrict the read to a byte range of an uncompressed file (``start`` must be at a
    line start, ``end`` right after a newline or at the end of the file); ``first_line`` is the line
    number at ``start``.
    """
    line = first_line
    with open_binary(path) as f:
        if start:
            f.seek(start)
        remaining = None if end is None else end - start
        carry = b""
        while True:
            n = chunk_bytes if remaining is None else min(chunk_bytes, remaining)
            block = f.read(n) if n > 0 else b""
            if remaining is not None:
                remaining -= len(block)
            if not block:
                if carry:
                    yield Chunk(file_index, path, line, carry)
                return
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one very long line: keep reading
                carry = block
                continue
            data, carry = block[:cut], block[cut:]
            yield Chunk(file_index, path, line, data)
            line += data.count(b"\n")


def decode_lines(chunk: Chunk) -> list[str]:
    """The chunk's lines as ``str`` (one per line, newline dropped); invalid UTF-8 raises InputError."""
    try:
        text = chunk.data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = chunk.first_line + chunk.data.count(b"\n", 0, e.start)
        col = e.start - (chunk.data.rfind(b"\n", 0, e.start) + 1)
        raise InputError(chunk.path, line, f"invalid UTF-8 at byte {col} of the line ({e.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def parse_record(line: str, path: str, line_no: int):
    """``json.loads`` a line into a dict, or raise InputError; returns None for a blank line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(path, line_no, f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise InputError(path, line_no, f"expected a JSON object, got {type(record).__name__}")
    return record


def iter_records(chunk: Chunk):
    """``(line_no, record)`` for every non-blank line of the chunk, in order (the first bad line raises)."""
    for i, line in enumerate(decode_lines(chunk)):
        record = parse_record(line, chunk.path, chunk.first_line + i)
        if record is not None:
            yield chunk.first_line + i, record


def get_text(record: dict, key: str, path: str, line_no: int) -> str:
    try:
        text = record[key]
    except KeyError:
        raise InputError(path, line_no, f"missing key {key!r} (keys: {sorted(record)[:8]})") from None
    if not isinstance(text, str):
        raise InputError(path, line_no, f"key {key!r} is a {type(text).__name__}, expected a string")
    return text


def tmp_name(path: str) -> str:
    """The temporary name ``path`` is written under before the final rename."""
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path; rename it to ``path`` on success, remove it on any error."""
    tmp = tmp_name(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def mp_context():
    """fork where the platform has it (workers inherit the loaded tokenizer/tagger), else spawn."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def ordered_pool_map(func, items, workers: int, initializer=None, initargs=()):
    """Yield ``func(item)`` for each item, in input order, computed by a pool of ``workers`` processes.

    At most ``2 * workers + 2`` items are in flight, so memory stays bounded however long the input is.
    If the consumer stops early (an exception, or closing the generator), the pool is terminated.
    """
    pool = mp_context().Pool(max(1, workers), initializer=initializer, initargs=initargs)
    try:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(func, (item,)))
            if len(pending) >= 2 * max(1, workers) + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


class Progress:
    """Log lines with documents/s, MB/s and (when the input size is known) an ETA.

    ``update`` prints whenever the document count crosses a multiple of ``log_interval``.
    """

    def __init__(self, log_interval: int = 1000, total_bytes: int | None = None, stream=None,
                 what: str = "documents"):
        self.log_interval = max(1, int(log_interval))
        self.total_bytes = total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.what = what
        self.start = time.perf_counter()
        self.docs = self.bytes = self.tokens = 0
        self._next = self.log_interval

    def update(self, docs: int, nbytes: int, tokens: int = 0) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.tokens += tokens
        if self.docs >= self._next:
            self._next = (self.docs // self.log_interval + 1) * self.log_interval
            self.log()

    def rates(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"elapsed_s": elapsed, "docs_per_s": self.docs / elapsed,
                "mb_per_s": self.bytes / elapsed / 1e6, "tokens_per_s": self.tokens / elapsed}

    def log(self) -> None:
        r = self.rates()
        msg = (f"processed {self.docs} {self.what} ({r['docs_per_s']:.0f} docs/s, {r['mb_per_s']:.2f} MB/s"
               + (f", {r['tokens_per_s']:.0f} tokens/s" if self.tokens else "") + ")")
        if self.total_bytes and r["mb_per_s"] > 0:
            left = max(self.total_bytes - self.bytes, 0) / (r["mb_per_s"] * 1e6)
            msg += f", {100 * self.bytes / self.total_bytes:.0f}% of input, ETA {left:.0f}s"
        print(msg, file=self.stream, flush=True)
