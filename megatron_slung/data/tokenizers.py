"""Tokenizers: a local SentencePiece model or a local Hugging Face tokenizer, with character offsets.

    tok = build_tokenizer("SentencePieceTokenizer", "runs/tok/spm.model")
    ids = tok.tokenize("Zürich 😀")
    ids, offsets = tok.tokenize_with_offsets("Zürich 😀")   # offsets: [(start, end), ...] in characters

Both kinds answer the same small API: ``vocab_size``, ``eod``, ``pad`` (or None), ``tokenize``,
``tokenize_with_offsets``, ``detokenize``, ``token_to_id``, and the batch forms the preprocessing tool
uses (``tokenize_batch``, ``tokenize_batch_with_offsets``: numpy arrays, no per-token Python objects).

Offsets are in characters of the Python string (not UTF-8 bytes). A token that covers only part of a
character (a byte-fallback piece of an emoji, say) gets that character's span, or an empty span at the
character's position; a token that covers no text at all (SentencePiece's dummy-prefix ``▁``) gets an
empty span where it stands. Nothing is ever downloaded: paths must be local.

The SentencePiece fast path. SentencePiece's output for a text is the concatenation of its outputs for
the text's space-separated segments whenever no piece of the vocabulary crosses the boundary
"non-space, then space" (true for models trained by ``tools/train_tokenizer.py``; checked on the
vocabulary at load time, with lossless models only). So each distinct segment is encoded once and kept
in a table that numpy searches by hash and confirms byte for byte (:class:`_WordTable`), and offsets
are computed from the pieces' byte lengths. ``word_cache=False`` gives the plain path; tests check that
both agree.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass

import numpy as np

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
HARM_TAG_TOKEN = "<|potentially_unsafe|>"

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "TikTokenizer", "NullTokenizer")


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's padded vocabulary size: the next multiple of ``divisible_by * tp_size``.

    Same rule as Megatron-LM's ``--make-vocab-size-divisible-by`` (default 128) times the tensor
    parallel size, so each TP rank holds an equal, GPU-friendly slice of the embedding.
    """
    if vocab_size <= 0 or divisible_by <= 0 or tp_size <= 0:
        raise ValueError(f"pad_vocab_size needs positive sizes, got {vocab_size}, {divisible_by}, {tp_size}")
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


# ----------------------------------------------------------------------------------------------------
# Offsets: UTF-8 byte offsets to character offsets


def byte_to_char_offsets(text: str, starts: np.ndarray, ends: np.ndarray):
    """Convert UTF-8 byte offsets into ``text`` to character offsets.

    A start inside a multi-byte character moves back to the character's start, an end inside one moves
    forward to its end, so a token holding part of a character covers the whole character.
    """
    if text.isascii():
        return starts, ends
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    is_start = (data & 0xC0) != 0x80
    # prefix[i] = number of characters starting in data[:i]; one more entry so floor(n) = nchars.
    prefix = np.zeros(len(data) + 2, dtype=np.int64)
    np.cumsum(is_start, out=prefix[1:-1])
    prefix[-1] = prefix[-2] + 1
    return prefix[np.asarray(starts) + 1] - 1, prefix[np.asarray(ends)]


def char_to_byte_offsets(text: str, positions) -> np.ndarray:
    """UTF-8 byte offset of each character position (0..len(text)) in ``text``."""
    positions = np.asarray(positions, dtype=np.int64)
    if text.isascii():
        return positions
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    char_starts = np.flatnonzero((data & 0xC0) != 0x80)
    return np.append(char_starts, len(data))[positions]


def _pairs(starts, ends) -> list[tuple[int, int]]:
    return list(zip(np.asarray(starts).tolist(), np.asarray(ends).tolist()))


@dataclass
class FlatEncoding:
    """Several texts tokenized at once, as flat arrays (no per-token Python objects).

    Text ``i`` has tokens ``ids[bounds[i]:bounds[i + 1]]``. With offsets: token ``k`` covers
    ``[starts[k], ends[k])`` of the texts laid end to end, in ``unit`` ("byte": UTF-8 bytes, or "char"),
    text ``i`` occupying ``[bases[i], bases[i + 1])``.
    """

    ids: np.ndarray
    bounds: np.ndarray
    starts: np.ndarray | None = None
    ends: np.ndarray | None = None
    unit: str | None = None
    bases: np.ndarray | None = None


def _per_text_char_offsets(texts, enc: FlatEncoding):
    out = []
    for i, text in enumerate(texts):
        a, b = enc.bounds[i], enc.bounds[i + 1]
        s, e = enc.starts[a:b] - enc.bases[i], enc.ends[a:b] - enc.bases[i]
        if enc.unit == "byte":
            s, e = byte_to_char_offsets(text, s, e)
        out.append((enc.ids[a:b].copy(), np.stack([s, e], axis=1).reshape(-1, 2)))
    return out


class _WordTable:
    """Segments seen so far and their token ids, looked up without a Python loop per segment.

    A segment's key is a 64-bit polynomial hash of its bytes; a hit counts only if the stored bytes are
    equal too (so a hash collision can never give wrong ids: the colliding segment is treated as new and
    kept in an exact side table). Keys live in a large sorted array and a small recent one, merged now
    and then, so adding words does not re-sort everything each time.
    """

    _P = 0x100000001B3  # odd: invertible modulo 2**64
    _P_INV = pow(_P, -1, 1 << 64)

    def __init__(self):
        self.rows = 0
        self.flat = np.zeros(0, dtype=np.int32)  # all segments' ids
        self.starts = np.zeros(0, dtype=np.int64)  # row -> first id in flat
        self.lengths = np.zeros(0, dtype=np.int64)  # row -> number of ids
        self.byte_store = np.zeros(0, dtype=np.uint8)  # row -> its bytes, for the equality check
        self.byte_starts = np.zeros(0, dtype=np.int64)
        self.byte_lengths = np.zeros(0, dtype=np.int64)
        self.keys = [np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)]  # sorted: main, recent
        self.key_rows = [np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)]
        self.exact: dict[bytes, int] = {}  # segments whose hash collided with another's
        self._pow = np.ones(1, dtype=np.uint64)
        self._ipow = np.ones(1, dtype=np.uint64)

    def _powers(self, n: int):
        """P**k and P**-k modulo 2**64 for k < n (grown as needed)."""
        if len(self._pow) < n + 1:
            size = max(n + 1, 2 * len(self._pow))
            pw = np.ones(size, dtype=np.uint64)
            ipw = np.ones(size, dtype=np.uint64)
            with np.errstate(over="ignore"):
                pw[1:] = np.cumprod(np.full(size - 1, self._P, dtype=np.uint64))
                ipw[1:] = np.cumprod(np.full(size - 1, self._P_INV, dtype=np.uint64))
            self._pow, self._ipow = pw, ipw
        return self._pow, self._ipow

    def hashes(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        pw, ipw = self._powers(len(data))
        with np.errstate(over="ignore"):
            prefix = np.zeros(len(data) + 1, dtype=np.uint64)
            np.cumsum((data.astype(np.uint64) + np.uint64(1)) * pw[: len(data)], out=prefix[1:])
            h = (prefix[ends] - prefix[starts]) * ipw[starts]
            h ^= (ends - starts).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
        return h

    def _same_bytes(self, data, starts, ends, rows) -> np.ndarray:
        """Per segment: are its bytes those stored for ``rows``?"""
        lengths = ends - starts
        ok = lengths == self.byte_lengths[rows]
        idx = np.flatnonzero(ok)
        if len(idx) == 0:
            return ok
        n = lengths[idx]
        total = int(n.sum())
        offsets = np.cumsum(n) - n
        within = np.arange(total, dtype=np.int64) - np.repeat(offsets, n)
        a = data[np.repeat(starts[idx], n) + within]
        b = self.byte_store[np.repeat(self.byte_starts[rows[idx]], n) + within]
        differs = np.add.reduceat((a != b).astype(np.int64), offsets) > 0
        ok[idx[differs]] = False
        return ok

    def lookup(self, data, starts, ends) -> np.ndarray:
        """Row of each segment, or -1 when it is not in the table."""
        h = self.hashes(data, starts, ends)
        self._last_hashes = h
        # Look up each distinct hash once, in sorted order (far kinder to the cache than one by one).
        unique, inverse = np.unique(h, return_inverse=True)
        unique_rows = np.full(len(unique), -1, dtype=np.int64)
        for keys, key_rows in zip(self.keys, self.key_rows):
            if len(keys) == 0:
                continue
            pos = np.minimum(np.searchsorted(keys, unique), len(keys) - 1)
            hit = (keys[pos] == unique) & (unique_rows < 0)
            unique_rows[hit] = key_rows[pos[hit]]
        rows = unique_rows[inverse.reshape(-1)]
        found = np.flatnonzero(rows >= 0)
        if len(found):
            good = self._same_bytes(data, starts[found], ends[found], rows[found])
            rows[found[~good]] = -1  # a hash collision: not this segment
        if self.exact:
            for k in np.flatnonzero(rows < 0).tolist():
                row = self.exact.get(data[starts[k]:ends[k]].tobytes())
                if row is not None:
                    rows[k] = row
        return rows

    def add(self, words: list[str], ids: list[list[int]], data, first_index, starts, ends) -> list[int]:
        """Append new segments (``words[i]`` is segment ``first_index[i]`` of ``data``); returns their rows."""
        first_index = np.asarray(first_index, dtype=np.int64)
        new_rows = self.rows + np.arange(len(words), dtype=np.int64)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        self.starts = np.concatenate([self.starts, len(self.flat) + np.cumsum(lens) - lens])
        self.lengths = np.concatenate([self.lengths, lens])
        self.flat = np.concatenate([self.flat, np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                                                           count=int(lens.sum()))])
        s, e = starts[first_index], ends[first_index]
        n = e - s
        within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        self.byte_starts = np.concatenate([self.byte_starts, len(self.byte_store) + np.cumsum(n) - n])
        self.byte_lengths = np.concatenate([self.byte_lengths, n])
        self.byte_store = np.concatenate([self.byte_store, data[np.repeat(s, n) + within]])
        self.rows += len(words)
        # Index by hash; a hash already taken (by another segment) goes to the exact side table.
        h = self._last_hashes[first_index]
        order = np.argsort(h, kind="stable")
        h_sorted, rows_sorted = h[order], new_rows[order]
        dup = np.zeros(len(h), dtype=bool)
        dup[1:] = h_sorted[1:] == h_sorted[:-1]
        for keys in self.keys:
            if len(keys):
                pos = np.minimum(np.searchsorted(keys, h_sorted), len(keys) - 1)
                dup |= keys[pos] == h_sorted
        for k in np.flatnonzero(dup).tolist():
            row = int(rows_sorted[k])
            self.exact[self.byte_store[self.byte_starts[row]:self.byte_starts[row] + self.byte_lengths[row]].tobytes()] = row
        keep = ~dup
        keys = np.concatenate([self.keys[1], h_sorted[keep]])
        key_rows = np.concatenate([self.key_rows[1], rows_sorted[keep]])
        order = np.argsort(keys, kind="stable")
        self.keys[1], self.key_rows[1] = keys[order], key_rows[order]
        if len(self.keys[1]) > max(1 << 16, len(self.keys[0]) // 4):  # fold the recent keys into the main ones
            keys = np.concatenate(self.keys)
            key_rows = np.concatenate(self.key_rows)
            order = np.argsort(keys, kind="stable")
            self.keys = [keys[order], np.zeros(0, dtype=np.uint64)]
            self.key_rows = [key_rows[order], np.zeros(0, dtype=np.int64)]
        return new_rows.tolist()


class _TokenizerBase:
    """The single-text and offset methods, derived from a subclass's ``tokenize_batch`` and ``encode_flat``."""

    def tokenize_batch_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(ids, offsets)`` per text: int32 ids and an int64 ``[n, 2]`` array of character spans."""
        return _per_text_char_offsets(texts, self.encode_flat(texts, offsets=True))

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0].tolist()

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = self.tokenize_batch_with_offsets([text])[0]
        return ids.tolist(), _pairs(offsets[:, 0], offsets[:, 1])


# ----------------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(_TokenizerBase):
    """A local SentencePiece ``.model`` file.

    ``eod`` is the id of ``<|endoftext|>`` when the model has that piece, else its ``</s>``;
    ``pad`` is ``<|pad|>``, else the model's pad id, else None. Pass ``eod_token``/``pad_token`` to pick
    other pieces. ``tokenize`` adds no BOS/EOS.
    """

    kind = "SentencePieceTokenizer"

    def __init__(self, model_path: str, eod_token: str | None = None, pad_token: str | None = None,
                 word_cache: bool = True, max_cache_words: int = 1 << 20):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist (it must be a local .model file)")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(model_path)
        self.vocab_size = self.sp.get_piece_size()
        self._unk = self.sp.unk_id()

        self.eod = self._special(eod_token, EOD_TOKEN, self.sp.eos_id(), "eod_token")
        if self.eod is None:
            raise ValueError(f"{model_path}: no end-of-document token: the model has neither {EOD_TOKEN!r} nor </s>; "
                             "pass eod_token=PIECE")
        self.pad = self._special(pad_token, PAD_TOKEN, self.sp.pad_id(), "pad_token")

        # Byte length each piece stands for in the original text: '▁' is one space, a byte-fallback
        # piece one byte, control/unknown pieces nothing (lengths are checked against the text anyway).
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        self._ws_crossing = False
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                lengths[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)):
                lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
                # A piece with a non-space before a '▁' would cross our word boundaries.
                if re.search("[^\u2581]\u2581", piece):
                    self._ws_crossing = True
        self._piece_bytes = lengths
        self._dummy_prefix = self._has_dummy_prefix()
        self._lossless = self._probe_lossless()
        # The word cache is used only where it is provably exact: lossless models whose pieces never
        # cross a "non-space, space" boundary (plus a probe below).
        self.word_cache = bool(word_cache) and self._lossless and not self._ws_crossing
        self.max_cache_words = max_cache_words
        self._reset_cache()
        self.cache_lookups = self.cache_misses = 0
        if self.word_cache:
            self._sentinel = self.sp.encode(".", out_type=int)
            if not self._check_word_cache():
                self.word_cache = False

    # -- special pieces
    def _special(self, requested, default_piece, fallback_id, what):
        if requested is not None:
            tid = self.token_to_id(requested)
            if tid is None:
                raise ValueError(f"{self.model_path}: {what} {requested!r} is not a piece of the model")
            return tid
        tid = self.token_to_id(default_piece)
        if tid is not None:
            return tid
        return fallback_id if fallback_id is not None and fallback_id >= 0 else None

    def token_to_id(self, piece: str) -> int | None:
        tid = self.sp.piece_to_id(piece)
        if tid == self._unk and piece != self.sp.id_to_piece(self._unk):
            return None
        return int(tid)

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    # -- load-time checks for the fast paths
    def _has_dummy_prefix(self) -> bool:
        pieces = self.sp.encode("a", out_type=str)
        return bool(pieces) and pieces[0].startswith("\u2581")

    def _probe_lossless(self) -> bool:
        """True when decode(encode(x)) == x and piece byte lengths add up, for awkward probes."""
        probes = ["  two  spaces ", "ﬁ Ａ ½ ™ e\u0301 Ⅻ", "tab\tnew\nline\r\n", "Zürich 東京 😀🤖", " x", "x ", "a\u3000b"]
        for p in probes:
            ids = self.sp.encode(p, out_type=int)
            if self.sp.decode(ids) != p:
                return False
            if int(self._piece_bytes[ids].sum()) - (1 if self._dummy_prefix and ids else 0) != len(p.encode("utf-8")):
                return False
        return True

    def _check_word_cache(self) -> bool:
        probe = "Hello  world, this is  a test: Zürich 東京 😀 x1234 ▁odd ▁ end  "
        return self._encode_flat([probe])[0].tolist() == self.sp.encode(probe, out_type=int)

    # -- encoding
    def _encode_plain(self, texts: list[str]) -> list[np.ndarray]:
        out = self.sp.encode(texts, out_type=int, num_threads=1)
        return [np.asarray(x, dtype=np.int32) for x in out]

    def _reset_cache(self) -> None:
        self._table = _WordTable()

    def _encode_words(self, words: list[str]) -> list[list[int]]:
        """Ids of each segment ``" ..."`` as it stands inside a text: encoded after a sentinel word whose
        ids are then dropped (no piece crosses the boundary between them)."""
        n = len(self._sentinel)
        return [ids[n:] for ids in self.sp.encode(["." + w for w in words], out_type=int, num_threads=1)]

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated, and ``bounds`` (len(texts) + 1): text i is ids[bounds[i]:bounds[i+1]].

        With the word cache: each text is read as ``" " + text`` (SentencePiece's dummy prefix is that
        space) and cut before every space that follows a non-space; each such segment's ids are looked up
        in a table of segments seen before, found by hash and confirmed byte for byte (numpy, no Python
        per word); only new segments go to SentencePiece.
        """
        if not self.word_cache:
            parts = self._encode_plain(texts)
            lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
            return ids, np.concatenate([[0], np.cumsum(lens)])
        table = self._table
        if table.rows > self.max_cache_words:
            self._reset_cache()
            table = self._table
        padded = [" " + t if t else "" for t in texts]
        data = np.frombuffer("".join(padded).encode("utf-8"), dtype=np.uint8)
        char_bounds = np.concatenate([[0], np.cumsum(np.fromiter(map(len, padded), dtype=np.int64, count=len(padded)))])
        if len(data) == char_bounds[-1]:  # all ASCII
            doc_starts = char_bounds
        else:  # byte position of each text's first character
            doc_starts = np.append(np.flatnonzero((data & 0xC0) != 0x80), len(data))[char_bounds]
        doc_bytes = np.diff(doc_starts)
        self._last_text_bytes = np.maximum(doc_bytes - 1, 0)  # without the leading space
        space = data == 32
        cut = space.copy()
        cut[1:] &= ~space[:-1]
        cut[doc_starts[:-1][doc_bytes > 0]] = True  # a segment never spans two texts
        seg_starts = np.flatnonzero(cut)
        seg_ends = np.append(seg_starts[1:], len(data))
        rows = table.lookup(data, seg_starts, seg_ends)
        new = np.flatnonzero(rows < 0)
        self.cache_lookups += len(seg_starts)
        if len(new):
            # the distinct new segments (by content), each encoded once
            words = [data[seg_starts[k]:seg_ends[k]].tobytes().decode("utf-8") for k in new]
            first = {}
            for k, w in zip(new.tolist(), words):
                first.setdefault(w, k)
            unique = list(first)
            self.cache_misses += len(unique)
            added = table.add(unique, self._encode_words(unique), data, [first[w] for w in unique], seg_starts, seg_ends)
            index = dict(zip(unique, added))
            rows[new] = [index[w] for w in words]
        lens = table.lengths[rows]
        seg_tok_end = np.cumsum(lens)
        total = int(seg_tok_end[-1]) if len(seg_tok_end) else 0
        # Output position p inside segment k reads flat[start_k + (p - first output position of segment k)].
        shift = np.repeat(table.starts[rows] - (seg_tok_end - lens), lens)
        ids = table.flat[np.arange(total, dtype=np.int64) + shift]
        seg_bounds = np.searchsorted(seg_starts, doc_starts)
        bounds = np.concatenate([[0], seg_tok_end])[seg_bounds]
        return ids, bounds.astype(np.int64)

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (int32 numpy arrays) of each text."""
        if not self.word_cache:
            return self._encode_plain(texts)
        ids, bounds = self._encode_flat(texts)
        return np.split(ids, bounds[1:-1])

    def _sp_offsets(self, texts: list[str], in_bytes: bool):
        """SentencePiece's own offsets (any normalisation): ``[(ids, [n, 2] offsets)]`` in bytes or characters."""
        try:
            out = self.sp.encode(texts, out_type="offset_mapping", num_threads=1, return_bytes=in_bytes)
            return [(np.asarray(o["ids"], dtype=np.int32), np.asarray(o["offsets"], dtype=np.int64).reshape(-1, 2))
                    for o in out]
        except (ValueError, TypeError, AttributeError):  # older sentencepiece: protos with byte offsets
            result = []
            for text in texts:
                proto = self.sp.encode(text, out_type="immutable_proto")
                ids = np.asarray([p.id for p in proto.pieces], dtype=np.int32)
                b = np.asarray([p.begin for p in proto.pieces], dtype=np.int64)
                e = np.asarray([p.end for p in proto.pieces], dtype=np.int64)
                if not in_bytes:
                    b, e = byte_to_char_offsets(text, b, e)
                result.append((ids, np.stack([b, e], axis=1).reshape(-1, 2)))
            return result

    def encode_flat(self, texts: list[str], offsets: bool = False) -> "FlatEncoding":
        """All texts at once (see :class:`FlatEncoding`); offsets are UTF-8 byte offsets."""
        ids, bounds = self._encode_flat(texts)
        if not offsets:
            return FlatEncoding(ids, bounds)
        if self.word_cache:
            nbytes = self._last_text_bytes
        else:
            nbytes = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts), dtype=np.int64,
                                 count=len(texts))
        bases = np.concatenate([[0], np.cumsum(nbytes)])
        counts = np.diff(bounds)
        doc_of = np.repeat(np.arange(len(texts)), counts)
        if self._lossless:
            # Each piece stands for a known number of bytes: offsets are a running sum (per text).
            lengths = self._piece_bytes[ids]
            if self._dummy_prefix:
                lengths[bounds[:-1][counts > 0]] -= 1
            run = np.concatenate([[0], np.cumsum(lengths)])
            starts = run[:-1] - run[bounds[:-1]][doc_of] + bases[:-1][doc_of]
            ends = starts + lengths
            sums = run[bounds[1:]] - run[bounds[:-1]]
            bad = sums != nbytes
            nonempty = counts > 0
            bad[nonempty] |= lengths[bounds[:-1][nonempty]] < 0  # a dummy prefix that was not there
            redo = np.flatnonzero(bad).tolist()
        else:
            starts = np.zeros(len(ids), dtype=np.int64)
            ends = np.zeros(len(ids), dtype=np.int64)
            redo = list(range(len(texts)))
        if redo:  # e.g. a literal '▁' in the text, or a normalising model: SentencePiece says where pieces are
            for i, (sp_ids, off) in zip(redo, self._sp_offsets([texts[i] for i in redo], in_bytes=True)):
                a, b = bounds[i], bounds[i + 1]
                if not np.array_equal(sp_ids, ids[a:b]):
                    raise RuntimeError(f"tokenizer cache disagrees with SentencePiece on {texts[i][:80]!r}")
                starts[a:b] = off[:, 0] + bases[i]
                ends[a:b] = off[:, 1] + bases[i]
        return FlatEncoding(ids, bounds, starts, ends, "byte", bases)

    def detokenize(self, ids) -> str:
        """Text of ``ids``; control pieces (``<|endoftext|>``, tags, padding) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------------------------------
# Hugging Face


class HuggingFaceTokenizer(_TokenizerBase):
    """A local Hugging Face tokenizer: a directory (``tokenizer.json``, config, ...) or a ``tokenizer.json``.

    Loaded with ``local_files_only``: never downloads. ``eod`` is the tokenizer's EOS token, else
    ``<|endoftext|>``; ``pad`` its pad token, else ``<|pad|>``, else None. ``tokenize`` adds no special
    tokens (no BOS), as pretraining data wants; pass ``add_special_tokens=True`` to change that. Text is
    text: a document containing the string ``<|endoftext|>`` does not produce the special token (as with
    SentencePiece control pieces); ``special_tokens_in_text=True`` restores Hugging Face's matching.
    """

    kind = "HuggingFaceTokenizer"

    def __init__(self, path: str, eod_token: str | None = None, pad_token: str | None = None,
                 add_special_tokens: bool = False, special_tokens_in_text: bool = False):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not os.path.exists(path):
            raise FileNotFoundError(f"Hugging Face tokenizer {path!r} does not exist (it must be a local directory "
                                    "or tokenizer.json; nothing is downloaded)")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if os.path.isdir(path):
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            hf = PreTrainedTokenizerFast(tokenizer_file=path)
        self._setup(hf, path, eod_token, pad_token, add_special_tokens, special_tokens_in_text)

    def _setup(self, hf, path, eod_token, pad_token, add_special_tokens, special_tokens_in_text):
        self.hf = hf
        if not getattr(self.hf, "is_fast", False):
            raise ValueError(f"{path}: a fast (Rust) tokenizer is needed for character offsets; "
                             "save it with tokenizer.json")
        self.path = path
        self.backend = self.hf.backend_tokenizer
        if not special_tokens_in_text and hasattr(self.backend, "encode_special_tokens"):
            self.backend.encode_special_tokens = True
        self.add_special_tokens = add_special_tokens
        self.vocab_size = len(self.hf)

        def pick(requested, attr, default_piece, what):
            if requested is not None:
                tid = self.token_to_id(requested)
                if tid is None:
                    raise ValueError(f"{path}: {what} {requested!r} is not in the vocabulary")
                return tid
            tid = getattr(self.hf, attr, None)
            return tid if tid is not None else self.token_to_id(default_piece)

        self.eod = pick(eod_token, "eos_token_id", EOD_TOKEN, "eod_token")
        if self.eod is None:
            raise ValueError(f"{path}: no end-of-document token (no EOS token and no {EOD_TOKEN!r}); pass eod_token=TOKEN")
        self.pad = pick(pad_token, "pad_token_id", PAD_TOKEN, "pad_token")

    def token_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(int(token_id))

    def _encode(self, texts):
        return self.backend.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._encode(texts)]

    def encode_flat(self, texts: list[str], offsets: bool = False) -> FlatEncoding:
        """All texts at once (see :class:`FlatEncoding`); offsets are in characters."""
        encs = self._encode(texts)
        counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=int(bounds[-1]))
        if not offsets:
            return FlatEncoding(ids, bounds)
        bases = np.concatenate([[0], np.cumsum([len(t) for t in texts], dtype=np.int64)])
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets) for e in encs),
                           dtype=np.int64, count=2 * int(bounds[-1])).reshape(-1, 2)
        shift = np.repeat(bases[:-1], counts)
        return FlatEncoding(ids, bounds, flat[:, 0] + shift, flat[:, 1] + shift, "char", bases)

    def detokenize(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """Megatron's ``GPT2BPETokenizer``: GPT-2's byte-level BPE from a local ``vocab.json`` (``--vocab-file``) and
    ``merges.txt`` (``--merge-file``). ``eod`` is ``<|endoftext|>`` (50256 in GPT-2's files), as in Megatron;
    no pad token; text is text (a literal ``<|endoftext|>`` in a document is not the special token, as with
    GPT-2's own encoder)."""

    kind = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(f"GPT2BPETokenizer: {flag} {path!r} does not exist (a local GPT-2 "
                                        f"{'vocab.json' if flag == '--vocab-file' else 'merges.txt'})")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        # GPT-2's encoder: byte-level pre-tokenisation (its regex, no prefix space), BPE merges, byte-level decode
        backend = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if backend.token_to_id(EOD_TOKEN) is None:
            raise ValueError(f"GPT2BPETokenizer: --vocab-file {vocab_file} has no {EOD_TOKEN!r} (GPT-2's end of "
                             "document)")
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOD_TOKEN)
        self._setup(hf, f"{vocab_file} + {merge_file}", EOD_TOKEN, None, False, False)


class NullTokenizer(_TokenizerBase):
    """Megatron's ``NullTokenizer``: a document is its token ids written as whitespace-separated integers;
    ``vocab_size`` = ``--vocab-size``, ``eod`` = vocab_size - 1 (Megatron's default), no pad. An id outside
    [0, vocab_size) is an error naming it (Megatron's would reach the embedding)."""

    kind = "NullTokenizer"

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1
        self.pad = None

    def token_to_id(self, piece: str) -> int | None:
        return int(piece) if piece.strip().isdigit() and int(piece) < self.vocab_size else None

    def id_to_token(self, token_id: int) -> str:
        return str(int(token_id))

    def encode_flat(self, texts: list[str], offsets: bool = False) -> FlatEncoding:
        """All texts at once; offsets are in characters (each number's span)."""
        ids, starts, ends, counts = [], [], [], []
        for text in texts:
            n = 0
            for m in re.finditer(r"\S+", text):
                word = m.group()
                if not word.isdigit() or int(word) >= self.vocab_size:
                    raise ValueError(f"NullTokenizer: {word[:40]!r} is not a token id in [0, {self.vocab_size}) "
                                     "(a NullTokenizer document is whitespace-separated integer ids)")
                ids.append(int(word))
                starts.append(m.start())
                ends.append(m.end())
                n += 1
            counts.append(n)
        bounds = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
        flat = np.asarray(ids, dtype=np.int64).astype(np.int32 if self.vocab_size < 2**31 else np.int64)
        if not offsets:
            return FlatEncoding(flat, bounds)
        bases = np.concatenate([[0], np.cumsum([len(t) for t in texts], dtype=np.int64)])
        shift = np.repeat(bases[:-1], np.diff(bounds))
        return FlatEncoding(flat, bounds, np.asarray(starts, dtype=np.int64) + shift,
                            np.asarray(ends, dtype=np.int64) + shift, "char", bases)

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.encode_flat(texts)
        return np.split(enc.ids, enc.bounds[1:-1])

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


# Megatron's TikTokenizer: the two pre-tokenisation patterns, the seven named special tokens (their ids are
# their positions), fillers up to --tiktoken-num-special-tokens, the BPE ranks shifted after them.
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
TIKTOKEN_DEFAULT_VOCAB_SIZE = 2**17


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """BPE ranks from Megatron's JSON (a list of ``{"rank", "token_bytes" (base64), "token_str"}``) or from
    tiktoken's own file (one ``BASE64 RANK`` per line). Ranks must be 0..n-1 with the 256 single bytes first."""
    import base64
    import json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"TikTokenizer: --tokenizer-model {path!r} does not exist (a local tiktoken file)")
    ranks: dict[bytes, int] = {}
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: Megatron's TikTokenizer JSON is a list of {{rank, token_bytes, token_str}}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("rank") != i or "token_bytes" not in entry:
                raise ValueError(f"{path}: entry {i} must be {{'rank': {i}, 'token_bytes': BASE64, ...}}")
            ranks[base64.b64decode(entry["token_bytes"])] = i
    else:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError(f"{path}:{line_no}: expected 'BASE64 RANK' (tiktoken's format)")
                ranks[base64.b64decode(parts[0])] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks must be 0..{len(ranks) - 1}, each once")
    if any(ranks.get(bytes([b])) != b for b in range(256)):
        raise ValueError(f"{path}: ranks 0..255 must be the 256 single bytes in order (as Megatron requires)")
    return ranks


class TikTokenizer(_TokenizerBase):
    """Megatron's ``TikTokenizer`` (needs the ``tiktoken`` package). Ids 0..num_special_tokens-1 are special
    tokens: ``special_tokens`` (default ``<unk> <s> </s> <mask> <pad> <cls> <sep>``) then ``<SPECIAL_i>``
    fillers; BPE rank r is id num_special_tokens + r. ``vocab_size`` (Megatron's default 2**17) keeps the first
    vocab_size - num_special_tokens ranks; it defaults here to the file's size when that is smaller (where
    Megatron stops). ``eod`` is ``</s>``, ``pad`` ``<pad>``. As in Megatron, special-token strings in a text
    encode as the special tokens."""

    kind = "TikTokenizer"

    def __init__(self, path: str, pattern: str | None = None, num_special_tokens: int = 1000,
                 special_tokens=None, vocab_size: int | None = None):
        try:
            import tiktoken
        except ImportError:
            raise ImportError("--tokenizer-type TikTokenizer needs the tiktoken package: pip install tiktoken "
                              "(or the project's [tiktoken] extra)") from None
        pattern = "v2" if pattern is None else pattern
        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}")
        specials = list(TIKTOKEN_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if len(set(specials)) != len(specials):
            raise ValueError(f"--tokenizer-special-tokens: each special token once, got {specials}")
        missing = [t for t in TIKTOKEN_SPECIAL_TOKENS if t not in specials]
        if missing:
            raise ValueError(f"--tokenizer-special-tokens must include {' '.join(TIKTOKEN_SPECIAL_TOKENS)} "
                             f"(Megatron's); missing {' '.join(missing)}")
        if num_special_tokens < len(specials):
            raise ValueError(f"--tiktoken-num-special-tokens {num_special_tokens} is fewer than the {len(specials)} "
                             "special tokens")
        ranks = read_tiktoken_ranks(path)
        largest = num_special_tokens + len(ranks)
        if vocab_size is None:
            vocab_size = min(TIKTOKEN_DEFAULT_VOCAB_SIZE, largest)
        if not num_special_tokens + 256 <= vocab_size <= largest:
            raise ValueError(f"TikTokenizer: --vocab-size {vocab_size} must be between {num_special_tokens + 256} "
                             f"and {largest} ({num_special_tokens} special tokens + the {len(ranks)} ranks of {path})")
        inner = vocab_size - num_special_tokens
        self.path = path
        self.num_special_tokens = num_special_tokens
        self.special_tokens = specials + [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        shifted = {token: rank + num_special_tokens for token, rank in ranks.items() if rank < inner}
        self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=TIKTOKEN_PATTERNS[pattern],
                                     mergeable_ranks=shifted,
                                     special_tokens={t: i for i, t in enumerate(self.special_tokens)})
        self.vocab_size = vocab_size
        self.eod = self.special_tokens.index("</s>")
        self.pad = self.special_tokens.index("<pad>")
        # bytes each id stands for, for offsets: a special token stands for its own text
        self._id_bytes = [t.encode("utf-8") for t in self.special_tokens] + [b""] * inner
        for token, i in shifted.items():
            self._id_bytes[i] = token
        self._id_nbytes = np.fromiter(map(len, self._id_bytes), dtype=np.int64, count=vocab_size)

    def token_to_id(self, piece: str) -> int | None:
        if piece in self.special_tokens:
            return self.special_tokens.index(piece)
        try:
            return self.enc.encode_single_token(piece.encode("utf-8"))
        except KeyError:
            return None

    def id_to_token(self, token_id: int) -> str:
        return self._id_bytes[int(token_id)].decode("utf-8", errors="replace")

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.enc.encode_batch(list(texts), allowed_special="all",
                                                                                 num_threads=1)]

    def encode_flat(self, texts: list[str], offsets: bool = False) -> FlatEncoding:
        """All texts at once; offsets are UTF-8 byte offsets (tiktoken's tokens are byte strings)."""
        parts = self.tokenize_batch(texts)
        counts = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        if not offsets:
            return FlatEncoding(ids, bounds)
        nbytes = self._id_nbytes[ids]
        ends = np.cumsum(nbytes)
        text_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
        bases = np.concatenate([[0], np.cumsum(text_bytes)]).astype(np.int64)
        run = np.concatenate([[0], ends])
        if not np.array_equal(run[bounds], bases):  # byte-level BPE is lossless: the tokens spell the text
            raise RuntimeError("TikTokenizer: the tokens' bytes do not add up to the texts' bytes")
        return FlatEncoding(ids, bounds, ends - nbytes, ends, "byte", bases)

    def detokenize(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids], errors="replace")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, *, vocab_file: str | None = None,
                    merge_file: str | None = None, vocab_size: int | None = None, tiktoken_pattern: str | None = None,
                    tiktoken_num_special_tokens: int = 1000, special_tokens=None, **kw):
    """A tokenizer by Megatron's ``--tokenizer-type``: ``SentencePieceTokenizer`` (a local .model),
    ``HuggingFaceTokenizer`` (a local dir/tokenizer.json), ``GPT2BPETokenizer`` (``vocab_file``, ``merge_file``),
    ``TikTokenizer`` (a tiktoken file; ``tiktoken_*``, ``special_tokens``, ``vocab_size``), ``NullTokenizer``
    (``vocab_size``).

    Extra keywords go to the class: ``eod_token``, ``pad_token``; ``word_cache`` (SentencePiece);
    ``add_special_tokens`` (Hugging Face).
    """
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type not in TOKENIZER_TYPES + ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_model is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(tokenizer_model, tiktoken_pattern, tiktoken_num_special_tokens, special_tokens, vocab_size)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        return SentencePieceTokenizer(tokenizer_model, **kw)
    return HuggingFaceTokenizer(tokenizer_model, **kw)


def tokenizer_kwargs(args) -> dict:
    """The ``build_tokenizer`` keywords from Megatron's flags (``args`` of training or of preprocessing)."""
    return dict(vocab_file=getattr(args, "vocab_file", None), merge_file=getattr(args, "merge_file", None),
                vocab_size=getattr(args, "vocab_size", None), tiktoken_pattern=getattr(args, "tiktoken_pattern", None),
                tiktoken_num_special_tokens=getattr(args, "tiktoken_num_special_tokens", 1000),
                special_tokens=getattr(args, "special_tokens", None))
