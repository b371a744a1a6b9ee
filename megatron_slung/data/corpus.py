"""Reading JSONL corpora and writing outputs safely: shared by the tagging and preprocessing tools.

- Inputs are JSON-lines files, plain or compressed (``.gz``, ``.zst``); ``.json`` is read as JSON lines
  too, like Megatron-LM does. A pattern with ``*``/``?``/``[`` is a glob, expanded in sorted order.
- Records are read in chunks of whole lines, with the file and line number of each, so that any bad
  record can be reported as ``path:line: what is wrong``.
- A compressed input that is cut short or damaged stops the reader with ``path: compressed stream ends
  early after line N`` (or ``is corrupt``); a zstd frame cut at a block boundary counts, although it
  decodes without error. A lone surrogate escape (``"\\ud800"``) is an error at its line.
- Outputs are written under a temporary name and renamed at the end; a failure removes them, and what a
  killed earlier run left is removed by the next (see leftovers.py). Text outputs are compressed as
  their final names say (``.gz``, ``.zst``).
- Pool workers end when the process that started them dies, even by ``kill -9``.
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
import re
import sys
import threading
import time
import zlib
from dataclasses import dataclass

from megatron_slung.data.leftovers import claim, release, remove_leftovers

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


class DamagedStream(Exception):
    """A compressed input that cannot be read to its end: ``kind`` is "ends early" or "is corrupt"."""

    def __init__(self, kind: str, reason: str = ""):
        self.kind, self.reason = kind, reason
        super().__init__(f"{kind} ({reason})" if reason else kind)


def _plain_pieces(path: str, start: int, end: int | None, size: int):
    with open(path, "rb") as f:
        f.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            piece = f.read(size if remaining is None else min(size, remaining))
            if not piece:
                return
            if remaining is not None:
                remaining -= len(piece)
            yield piece


def _gzip_pieces(path: str, size: int):
    # A gzip file may hold several members; each ends with a CRC of its data, so a cut or a flipped bit
    # is found (at the latest when its member ends). An empty file is no gzip stream at all (gzip -t agrees).
    if os.path.getsize(path) == 0:
        raise DamagedStream("ends early", "the file is empty")
    with gzip.open(path, "rb") as f:
        while True:
            try:
                piece = f.read1(size)
            except EOFError as e:
                raise DamagedStream("ends early", str(e)) from None
            except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise DamagedStream("is corrupt", str(e)) from None
            if not piece:
                return
            yield piece


def _zstd_pieces(path: str, size: int):
    # Every frame of the file (``zstd`` writes one per input; concatenated files hold several). A frame cut
    # at a block boundary decodes without any error, so completeness is checked: each decompressobj must
    # reach the end of its frame (``eof``) before the input ends.
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame = None  # the decompressobj of the frame being read; None between frames
    seen_any = False
    with open(path, "rb") as f:
        while True:
            data = f.read(size)
            if not data:
                break
            seen_any = True
            while data:
                if frame is None:
                    frame = dctx.decompressobj()
                try:
                    out = frame.decompress(data)
                except zstandard.ZstdError as e:
                    raise DamagedStream("is corrupt", str(e)) from None
                if out:
                    yield out
                if frame.eof:
                    data, frame = frame.unused_data, None
                else:
                    data = b""
    if frame is not None or not seen_any:
        raise DamagedStream("ends early", "the last zstd frame is incomplete" if seen_any else "the file is empty")


def read_pieces(path: str, start: int = 0, end: int | None = None, size: int = 1 << 20):
    """The (decompressed) bytes of ``path`` in pieces of at most about ``size``.

    A compressed file that is cut short or corrupt raises :class:`DamagedStream` after the last good
    piece. ``start``/``end`` (a byte range) are for uncompressed files only.
    """
    if is_compressed(path):
        if start or end is not None:
            raise ValueError(f"{path}: a compressed file cannot be read from the middle")
        return _gzip_pieces(path, size) if path.endswith(".gz") else _zstd_pieces(path, min(size, 1 << 17))
    return _plain_pieces(path, start, end, size)


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
    number at ``start``. A damaged compressed file raises ``InputError("path: compressed stream ends
    early after line N")`` (or ``is corrupt``), N being the last whole line it delivered; the lines read
    with the damaged part are not yielded.
    """
    line = first_line
    pending, size = [], 0  # pieces read since the last chunk
    pieces = read_pieces(path, start, end, size=chunk_bytes)
    while True:
        try:
            piece = next(pieces, b"")
        except DamagedStream as e:
            good = line - 1 + sum(p.count(b"\n") for p in pending)
            raise InputError(path, None, f"compressed stream {e.kind} after line {good}"
                                         + (f" ({e.reason})" if e.reason else "")) from None
        if piece:
            pending.append(piece)
            size += len(piece)
            if size < chunk_bytes:
                continue
        block = b"".join(pending)
        if not piece:  # the end of the input: whatever is left, a last line without newline included
            if block:
                yield Chunk(file_index, path, line, block)
            return
        cut = block.rfind(b"\n") + 1
        if cut == 0:  # one very long line: keep reading
            pending, size = [block], len(block)
            continue
        data = block[:cut]
        pending = [block[cut:]] if cut < len(block) else []
        size = len(block) - cut
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
    if _SURROGATE_ESCAPE.search(line):  # json.loads keeps a lone "\\ud800" as a string no UTF-8 can hold
        where = _find_surrogate(record)
        if where is not None:
            field, pos, char = where
            raise InputError(path, line_no, f"field {field!r} holds a lone surrogate escape \\u{ord(char):04x} at "
                                            f"character {pos} (not a Unicode character; fix or drop the record)")
    return record


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into valid UTF-8 JSON
_SURROGATE = re.compile("[\ud800-\udfff]")


def _find_surrogate(value, field: str = ""):
    """``(field, position, char)`` of the first lone surrogate in the strings (keys too) of ``value``."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return (field or "(value)", m.start(), m.group()) if m else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        name = f"{field}{key}" if key.startswith("[") else f"{field}.{key}" if field else key
        if _SURROGATE.search(key):
            return (name, _SURROGATE.search(key).start(), _SURROGATE.search(key).group())
        found = _find_surrogate(v, name)
        if found is not None:
            return found
    return None


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
    """Yield a temporary path; rename it to ``path`` on success, remove it on any error.

    What a killed earlier run left under ``path``'s temporary names is removed first.
    """
    remove_leftovers([f"{path}.tmp-"])
    tmp = claim(tmp_name(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    finally:
        release(tmp)


# Names that say "compressed" in a way we do not write: refused rather than written as plain text.
_UNSUPPORTED_COMPRESSION = (".bz2", ".xz", ".lzma", ".lz4", ".zip", ".br", ".7z", ".zstd", ".gzip", ".tgz", ".lz",
                            ".zz", ".Z")


def check_output_name(path: str) -> None:
    if path.endswith(_UNSUPPORTED_COMPRESSION):
        raise ValueError(f"{path}: {os.path.splitext(path)[1]} output is not supported; name it .gz, .zst or plain")


@contextlib.contextmanager
def open_text_output(path: str, like: str | None = None):
    """A UTF-8 text writer to ``path``, compressed as the name ``like`` (default ``path``) says.

    ``like`` is the final name when ``path`` is a temporary one: compression follows what the user asked
    for, not the temporary suffix. The gzip header holds no name or time (same input, same bytes); zstd
    frames carry a checksum of their content (as the ``zstd`` tool writes them), so a reader can tell any
    damage.
    """
    like = path if like is None else like
    check_output_name(like)
    with open(path, "wb") as raw:
        if like.endswith(".gz"):
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
        elif like.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(raw, closefd=False)
        else:
            stream = raw
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        try:
            yield text
        finally:
            text.close()  # ends the gzip member / zstd frame; raw is closed by its with


@contextlib.contextmanager
def atomic_text_output(path: str):
    """``open_text_output`` under a temporary name, renamed to ``path`` when the block succeeds."""
    check_output_name(path)
    with atomic_output(path) as tmp, open_text_output(tmp, like=path) as f:
        yield f


def mp_context():
    """fork where the platform has it (workers inherit the loaded tokenizer/tagger), else spawn."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def exit_with_parent(parent_pid: int, parent_thread: int | None = None) -> None:
    """Make this (child) process end when ``parent_pid`` dies, even by ``kill -9``.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG). That signal comes
    when the *thread* that forked us ends, so it is used only when we were forked by ``parent_thread``
    (None: any), a thread that outlives us; a pool's helper thread that replaces dead workers is not
    one. Otherwise, and off Linux, a daemon thread polls the parent id. Either way a parent that died
    before this call is caught at once.
    """
    armed = False
    forked_by_parent_thread = parent_thread is None or threading.get_ident() == parent_thread  # fork keeps the id
    if sys.platform.startswith("linux") and forked_by_parent_thread:
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent is already gone (we were re-parented)
        os._exit(1)
    if not armed:
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _pool_worker_init(parent_pid, parent_thread, initializer, initargs):
    exit_with_parent(parent_pid, parent_thread)
    if initializer is not None:
        initializer(*initargs)


def ordered_pool_map(func, items, workers: int, initializer=None, initargs=()):
    """Yield ``func(item)`` for each item, in input order, computed by a pool of ``workers`` processes.

    At most ``2 * workers + 2`` items are in flight, so memory stays bounded however long the input is.
    If the consumer stops early (an exception, or closing the generator), the pool is terminated; if this
    process is killed, the workers end with it.
    """
    pool = mp_context().Pool(max(1, workers), initializer=_pool_worker_init,
                             initargs=(os.getpid(), threading.get_ident(), initializer, initargs))
    started = {proc.pid for proc in pool._pool}

    def result(async_result):
        # A worker that dies (killed, out of memory) takes its task with it and the pool quietly starts
        # another: get() would wait forever. A changed set of worker PIDs means exactly that.
        while True:
            try:
                return async_result.get(timeout=1.0)
            except mp.TimeoutError:
                if {proc.pid for proc in pool._pool} != started:
                    raise RuntimeError("a worker process died before finishing its task (killed? out of memory?)") from None

    try:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(func, (item,)))
            if len(pending) >= 2 * max(1, workers) + 2:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())
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
