"""JSONL (with optional risk spans) to Megatron indexed datasets with a risk channel.

The engine behind ``tools/preprocess_data.py``. For each ``--json-keys`` key it writes
``{output_prefix}_{key}_document.bin/.idx`` (tokens, Megatron's format) and ``.risk.bin/.idx`` (one
uint8 level per token).

How the work is split, and why the output never depends on it:

- The main process reads the input in chunks of whole lines (~1 MB) and hands them to a pool of
  ``workers`` processes. Each worker parses, validates, tokenizes a whole chunk at once (the
  tokenizer's batch path), maps spans to token levels with numpy, inserts harmfulness tags, and sends
  back three flat numpy arrays (tokens, levels, document lengths): cheap to pickle. The main process
  writes results strictly in input order, and keeps at most ``2 * workers + 2`` chunks in flight.
- ``partitions`` > 1 cuts the input into that many contiguous byte ranges (at line boundaries; a
  compressed file is never cut), each processed by its own reader with ``workers // partitions``
  workers into a temporary dataset in ``.PREFIX.partitions-PID`` (which no reader opens); they are
  concatenated in order at the end. Partitions and workers end with the main process, even after
  ``kill -9``, and the next run removes what a killed one left.
- Harmfulness tags use random numbers keyed by (seed, input file number, line number), not by any
  process-local state.

Bad input (malformed JSON, invalid UTF-8, a missing key, bad spans) raises :class:`InputError` naming
the file and line; nothing is left under the output names (the builders write temporary files and
rename them only when everything succeeded). Empty documents (no tokens) are skipped and counted, or
are an error with ``empty_documents="error"``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_slung.data.corpus import (
    Chunk,
    InputError,
    Progress,
    exit_with_parent,
    expand_inputs,
    get_text,
    is_compressed,
    iter_records,
    mp_context,
    ordered_pool_map,
    read_chunks,
)
from megatron_slung.data.indexed_dataset import IndexedDatasetBuilder, partitions_dir, token_dtype
from megatron_slung.data.leftovers import claim, release, remove_leftovers
from megatron_slung.data.risk import check_level, level_name
from megatron_slung.data.risk_spans import insert_harm_tags_flat, normalize_spans, token_levels_flat
from megatron_slung.data.tokenizers import build_tokenizer

MAX_EMPTY_REPORTED = 5


@dataclass
class PreprocessOptions:
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str | None = None
    # GPT2BPETokenizer's files, NullTokenizer's / TikTokenizer's vocab size, TikTokenizer's settings
    # (tokenizers.tokenizer_kwargs: the same flags as training)
    tokenizer_kwargs: dict = field(default_factory=dict)
    json_keys: tuple = ("text",)
    append_eod: bool = False
    risk_key: str = "risk_spans"
    default_risk_level: int = 0
    harm_tag: str | None = None
    harm_tag_prob: float = 0.05
    harm_tag_min_level: int = 3
    seed: int = 1234
    empty_documents: str = "skip"  # or "error"
    chunk_bytes: int = 1 << 20
    log_interval: int = 1000
    word_cache: bool = True  # SentencePiece word cache (see tokenizers.py); False = plain encoder

    def check(self) -> None:
        check_level(self.default_risk_level, "--default-risk-level: ")
        check_level(self.harm_tag_min_level, "--harm-tag-min-level: ")
        if not 0.0 <= self.harm_tag_prob <= 1.0:
            raise ValueError(f"--harm-tag-prob {self.harm_tag_prob} is outside [0, 1]")
        if self.empty_documents not in ("skip", "error"):
            raise ValueError(f"empty_documents must be 'skip' or 'error', not {self.empty_documents!r}")
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


@dataclass
class KeyStats:
    documents: int = 0
    tokens: int = 0
    empty_skipped: int = 0
    tags_inserted: int = 0
    risk_counts: list = field(default_factory=lambda: [0] * 256)


@dataclass
class Summary:
    records: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    keys: dict = field(default_factory=dict)
    empty_where: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def add(self, other: "Summary") -> None:
        self.records += other.records
        self.input_bytes += other.input_bytes
        for key, ks in other.keys.items():
            mine = self.keys.setdefault(key, KeyStats())
            mine.documents += ks.documents
            mine.tokens += ks.tokens
            mine.empty_skipped += ks.empty_skipped
            mine.tags_inserted += ks.tags_inserted
            mine.risk_counts = [a + b for a, b in zip(mine.risk_counts, ks.risk_counts)]
        self.empty_where = (self.empty_where + other.empty_where)[:MAX_EMPTY_REPORTED]

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, ks in d["keys"].items():
            ks["risk_counts"] = {str(i): c for i, c in enumerate(ks["risk_counts"]) if c}
        elapsed = max(self.seconds, 1e-9)
        d["documents_per_s"] = self.records / elapsed
        d["mb_per_s"] = self.input_bytes / elapsed / 1e6
        d["tokens_per_s"] = sum(ks.tokens for ks in self.keys.values()) / elapsed
        return d

    def format(self) -> str:
        elapsed = max(self.seconds, 1e-9)
        total_tokens = sum(ks.tokens for ks in self.keys.values())
        lines = [f"input: {self.records} documents, {self.input_bytes / 1e6:.1f} MB in {self.seconds:.1f}s "
                 f"({self.records / elapsed:.0f} docs/s, {self.input_bytes / elapsed / 1e6:.2f} MB/s, "
                 f"{total_tokens / elapsed:.0f} tokens/s)"]
        for key, ks in self.keys.items():
            lines.append(f"[{key}] documents written: {ks.documents}, empty documents skipped: {ks.empty_skipped}, "
                         f"tokens: {ks.tokens}, harmfulness tags inserted: {ks.tags_inserted}")
            per_level = ", ".join(f"{i} {level_name(i)}: {c} ({100 * c / max(ks.tokens, 1):.1f}%)"
                                  for i, c in enumerate(ks.risk_counts) if c)
            lines.append(f"[{key}] tokens per risk level: {per_level or '-'}")
        if self.empty_where:
            lines.append("empty documents at: " + ", ".join(self.empty_where)
                         + (" ..." if sum(k.empty_skipped for k in self.keys.values()) > len(self.empty_where) else ""))
        for path in self.outputs:
            lines.append(f"wrote {path}.bin/.idx and {path}.risk.bin/.idx")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The per-chunk work (runs in the worker processes)


class Encoder:
    """Turns chunks of JSONL into flat token/level arrays. One per worker process."""

    def __init__(self, opts: PreprocessOptions):
        self.opts = opts
        sentencepiece = opts.tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
        kw = {"word_cache": opts.word_cache} if sentencepiece else {}
        self.tokenizer = build_tokenizer(opts.tokenizer_type, opts.tokenizer_model, **opts.tokenizer_kwargs, **kw)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.tag_id = None
        if opts.harm_tag:
            self.tag_id = self.tokenizer.token_to_id(opts.harm_tag)
            if self.tag_id is None:
                raise ValueError(f"--harm-tag {opts.harm_tag!r} is not a token of {opts.tokenizer_model}; "
                                 "train the tokenizer with it (tools/train_tokenizer.py --harm-tag)")

    def _spans(self, record: dict, key: str, text: str, path: str, line: int):
        raw = record.get(self.opts.risk_key)
        if raw is None:
            return None
        if isinstance(raw, dict):
            raw = raw.get(key)
            if raw is None:
                return None
        elif len(self.opts.json_keys) > 1:
            raise InputError(path, line, f"{self.opts.risk_key!r} is a list but there are several --json-keys; "
                                         "give an object {key: spans}")
        try:
            return normalize_spans(raw, len(text))
        except ValueError as e:
            raise InputError(path, line, f"{self.opts.risk_key!r}: {e}") from None

    def _uniform_level(self, spans, n: int):
        """The level of every character when it is the same for all, else None."""
        default = self.opts.default_risk_level
        if not spans:
            return default
        levels = {level for _, _, level in spans}
        if len(levels) > 1:
            return None
        (level,) = levels
        if level == default:
            return default
        covered = 0  # spans are sorted: do they tile [0, n)?
        for s, e, _ in spans:
            if s > covered:
                return None
            covered = max(covered, e)
        return level if covered >= n else None

    def encode_chunk(self, chunk: Chunk):
        """Parse, validate and tokenize a chunk; returns flat arrays per key (see module docstring)."""
        return self.encode_records(chunk.path, chunk.file_index, iter_records(chunk), len(chunk.data))

    def encode_records(self, path: str, file_index: int, records, nbytes: int):
        """Validate and tokenize ``records`` (``(line_no, record)`` pairs of file ``file_index``, in line
        order, a lazy iterator or a list); returns flat arrays per key (see module docstring)."""
        opts, tok = self.opts, self.tokenizer
        line_nos = []
        per_key = {key: ([], [], []) for key in opts.json_keys}  # texts, spans, uniform level
        for line_no, record in records:  # one pass in line order: the first bad line is reported
            line_nos.append(line_no)
            for key, (texts, spans, uniform) in per_key.items():
                text = get_text(record, key, path, line_no)
                doc_spans = self._spans(record, key, text, path, line_no)
                texts.append(text)
                spans.append(doc_spans)
                uniform.append(self._uniform_level(doc_spans, len(text)))
        out = {"records": len(line_nos), "nbytes": nbytes, "keys": {}, "empty_where": []}
        for key, (texts, spans, uniform) in per_key.items():
            enc = tok.encode_flat(texts, offsets=any(u is None for u in uniform))
            levels = token_levels_flat(enc, texts, spans, uniform, opts.default_risk_level)
            ids, bounds = enc.ids, enc.bounds
            counts = np.diff(bounds)
            stats = KeyStats()
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                if opts.empty_documents == "error":
                    raise InputError(path, line_nos[empty[0]], f"empty document (key {key!r} gives no tokens)")
                stats.empty_skipped = len(empty)
                room = MAX_EMPTY_REPORTED - len(out["empty_where"])
                out["empty_where"] += [f"{path}:{line_nos[i]}" for i in empty[:max(room, 0)]]
            if self.tag_id is not None:
                ids, levels, bounds, tags = insert_harm_tags_flat(
                    ids, levels, bounds, self.tag_id, opts.harm_tag_min_level, opts.harm_tag_prob, opts.seed,
                    file_index, np.asarray(line_nos, dtype=np.int64))
                stats.tags_inserted = int(tags.sum())
            if opts.append_eod:  # after each non-empty document, level 0
                doc_ends = bounds[1:][counts > 0]
                ids = np.insert(ids, doc_ends, tok.eod)
                levels = np.insert(levels, doc_ends, 0)
                bounds = bounds + np.concatenate([[0], np.cumsum(counts > 0)])
            lengths = np.diff(bounds)[counts > 0]
            stats.documents = len(lengths)
            stats.tokens = len(ids)
            out["keys"][key] = (ids.astype(self.dtype), lengths.astype(np.int64), levels.astype(np.uint8, copy=False), stats)
        return out


_ENCODER: Encoder | None = None


def _init_worker(opts: PreprocessOptions) -> None:
    global _ENCODER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = Encoder(opts)


def _encode_in_worker(chunk: Chunk):
    return _ENCODER.encode_chunk(chunk)


# ---------------------------------------------------------------------------------------------------
# Splitting the input into partitions


@dataclass
class Segment:
    """Lines of one input file: bytes [start, end) (end None = to the end), starting at line ``first_line``."""

    file_index: int
    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1


def plan_partitions(files: list[str], partitions: int) -> list[list[Segment]]:
    """Cut the inputs into ``partitions`` contiguous shares of about equal size, at line boundaries.

    Compressed files are not cut (they cannot be read from the middle); plain files are, and the line
    number at each cut is counted, so every document keeps its (file, line) identity.
    """
    sizes = [os.path.getsize(p) for p in files]
    if partitions <= 1:
        return [[Segment(i, p) for i, p in enumerate(files)]]
    total = sum(sizes)
    target = max(1, -(-total // partitions))
    shares: list[list[Segment]] = [[] for _ in range(partitions)]
    done = 0  # bytes assigned so far (whole input)
    for i, (path, size) in enumerate(zip(files, sizes)):
        if is_compressed(path) or size == 0:
            shares[min(done // target, partitions - 1)].append(Segment(i, path))
            done += size
            continue
        # Cut points: wherever the running total crosses a multiple of target, moved to the next line start.
        start, line = 0, 1
        with open(path, "rb") as f:
            while start < size:
                share = min(done // target, partitions - 1)
                cut = size if share == partitions - 1 else min(size, (share + 1) * target - (done - start))
                if cut < size:
                    f.seek(cut)
                    rest = f.readline()
                    cut = cut + len(rest)
                seg = Segment(i, path, start, cut, line)
                shares[share].append(seg)
                f.seek(start)
                left = cut - start
                while left > 0:  # count the lines in this segment
                    block = f.read(min(left, 16 << 20))
                    line += block.count(b"\n")
                    left -= len(block)
                done += cut - start
                start = cut
    return shares


def _chunks(segments: list[Segment], chunk_bytes: int):
    for seg in segments:
        yield from read_chunks(seg.path, seg.file_index, chunk_bytes, seg.start, seg.end, seg.first_line)


# ---------------------------------------------------------------------------------------------------
# Running


def add_encoded_chunk(summary, builders, result) -> int:
    """One encoded chunk's documents into the builders and its counts into ``summary``; its token count.
    (Shared with the datatrove pipeline's tokenising step, data/engine.py.)"""
    summary.records += result["records"]
    summary.input_bytes += result["nbytes"]
    summary.empty_where = (summary.empty_where + result["empty_where"])[:MAX_EMPTY_REPORTED]
    ntok = 0
    for key, (tokens, lengths, risk, ks) in result["keys"].items():
        builders[key].add_documents(tokens, lengths, risk)
        mine = summary.keys[key]
        mine.documents += ks.documents
        mine.tokens += ks.tokens
        mine.empty_skipped += ks.empty_skipped
        mine.tags_inserted += ks.tags_inserted
        ntok += ks.tokens
    return ntok


def _encode_segments(segments, opts: PreprocessOptions, workers: int, prefixes: dict, vocab_size: int,
                     label: str = "", stream=None) -> Summary:
    """Encode ``segments`` with a pool of ``workers`` into new datasets at ``prefixes[key]``."""
    summary = Summary(keys={k: KeyStats() for k in opts.json_keys})
    total = sum((os.path.getsize(s.path) if s.end is None else s.end - s.start) for s in segments)
    compressed = any(is_compressed(s.path) for s in segments)
    progress = Progress(opts.log_interval, None if compressed else total, stream=stream)
    if label:
        progress.what = f"documents{label}"
    start = time.perf_counter()
    builders = {}
    with contextlib.ExitStack() as stack:
        for key in opts.json_keys:
            builders[key] = stack.enter_context(IndexedDatasetBuilder(prefixes[key], vocab_size=vocab_size, with_risk=True))
        # closing(): an error in this loop terminates the workers at once, not when the generator is collected
        results = stack.enter_context(contextlib.closing(ordered_pool_map(
            _encode_in_worker, _chunks(segments, opts.chunk_bytes), workers,
            initializer=_init_worker, initargs=(opts,))))
        for result in results:
            ntok = add_encoded_chunk(summary, builders, result)
            progress.update(result["records"], result["nbytes"], ntok)
        for key, builder in builders.items():
            summary.keys[key].risk_counts = builder.risk_counts.tolist()
    summary.seconds = time.perf_counter() - start
    return summary


def _partition_main(index, segments, opts, workers, prefixes, vocab_size, queue, parent_pid) -> None:
    exit_with_parent(parent_pid)  # a killed main process takes its partitions (and their workers) with it
    try:
        summary = _encode_segments(segments, opts, workers, prefixes, vocab_size, f" [partition {index}]")
        queue.put((index, "ok", summary))
    except InputError as e:
        queue.put((index, "input_error", (e.path, e.line, e.message)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put((index, "error", f"{type(e).__name__}: {e}"))


def preprocess(inputs, output_prefix: str, opts: PreprocessOptions, workers: int = 1, partitions: int = 1,
               stream=None) -> Summary:
    """Preprocess ``inputs`` (a path, glob or list) into ``{output_prefix}_{key}_document`` datasets."""
    opts.check()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if partitions < 1 or partitions > workers:
        raise ValueError(f"--partitions must be between 1 and --workers ({workers}), got {partitions}")
    files = expand_inputs(inputs)
    probe = Encoder(opts)  # fails early on a bad tokenizer or harm tag
    vocab_size = probe.tokenizer.vocab_size
    del probe
    finals = {key: output_prefix_for(output_prefix, key) for key in opts.json_keys}
    size = sum(os.path.getsize(p) for p in files)
    print(f"[preprocess] {len(files)} input file(s), {size / 1e6:.1f} MB on disk, {workers} worker(s), "
          f"{partitions} partition(s), vocab {vocab_size}", file=stream if stream is not None else sys.stderr, flush=True)
    start = time.perf_counter()
    if partitions == 1:
        summary = _encode_segments(plan_partitions(files, 1)[0], opts, workers, finals, vocab_size, stream=stream)
    else:
        summary = _preprocess_partitioned(files, opts, workers, partitions, finals, vocab_size, output_prefix)
    summary.seconds = time.perf_counter() - start
    summary.outputs = list(finals.values())
    return summary


def _preprocess_partitioned(files, opts, workers, partitions, finals, vocab_size, output_prefix) -> Summary:
    shares = [s for s in plan_partitions(files, partitions) if s]
    # The part datasets go to .PREFIX.partitions-PID: readers refuse to load from there, and a later run
    # removes the directory if this process is killed (kill -9 leaves no chance to clean up).
    tmpdir = partitions_dir(output_prefix)
    remove_leftovers([partitions_dir(output_prefix, pid="")])
    os.makedirs(claim(tmpdir))
    procs = []
    try:
        ctx = mp_context()
        queue = ctx.Queue()
        part_prefixes = []
        per = max(1, workers // partitions)
        for p, segments in enumerate(shares):
            prefixes = {key: os.path.join(tmpdir, f"part{p}_{key}") for key in opts.json_keys}
            part_prefixes.append(prefixes)
            proc = ctx.Process(target=_partition_main,
                               args=(p, segments, opts, per, prefixes, vocab_size, queue, os.getpid()))
            proc.start()
            procs.append(proc)
        results = _partition_results(queue, procs)
        for proc in procs:
            proc.join()
        for _, status, payload in results:
            if status == "input_error":
                raise InputError(*payload)
            if status == "error":
                raise RuntimeError(f"a partition failed: {payload}")
        summary = Summary(keys={k: KeyStats() for k in opts.json_keys})
        for _, _, part in results:
            summary.add(part)
        for key in opts.json_keys:
            with IndexedDatasetBuilder(finals[key], vocab_size=vocab_size, with_risk=True) as builder:
                for prefixes in part_prefixes:
                    builder.add_index(prefixes[key], temporary_ok=True)
            summary.keys[key].risk_counts = builder.risk_counts.tolist()
        return summary
    finally:
        for proc in procs:  # after an error: stop the partitions still running
            if proc.is_alive():
                proc.terminate()
            proc.join()
        shutil.rmtree(tmpdir, ignore_errors=True)
        release(tmpdir)


def _partition_results(queue, procs) -> list:
    """Every partition's (index, status, payload), in partition order (the first bad line wins).

    A partition process that dies without reporting (killed, out of memory) is an error, not a hang.
    """
    import queue as queue_module

    results = {}
    while len(results) < len(procs):
        try:
            index, status, payload = queue.get(timeout=1.0)
            results[index] = (index, status, payload)
        except queue_module.Empty:
            for p, proc in enumerate(procs):
                if p not in results and proc.exitcode is not None:
                    try:  # it may have reported just before exiting
                        index, status, payload = queue.get(timeout=1.0)
                        results[index] = (index, status, payload)
                        break
                    except queue_module.Empty:
                        raise RuntimeError(f"partition {p} (PID {proc.pid}) died with exit code {proc.exitcode} "
                                           "before finishing (killed? out of memory?)") from None
    return [results[p] for p in sorted(results)]


def print_summary(summary: Summary, stream=None) -> None:
    print(summary.format(), file=stream if stream is not None else sys.stdout, flush=True)
