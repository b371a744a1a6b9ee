"""JSONL inputs of the safety tools, read with the data tools' reader (``megatron_slung/data/corpus.py``):
plain or compressed files and globs, every record with its file and line, bad input as ``path:line: reason``."""

from __future__ import annotations

import hashlib

from megatron_slung.data.corpus import InputError, expand_inputs, get_text, iter_records, read_chunks
from megatron_slung.data.risk_spans import normalize_spans


def iter_input(inputs) -> "iter[tuple[int, str, int, dict]]":
    """``(file_index, path, line, record)`` for every record of ``inputs`` (paths or globs), in order."""
    for file_index, path in enumerate(expand_inputs(inputs)):
        for chunk in read_chunks(path, file_index):
            for line, record in iter_records(chunk):
                yield file_index, path, line, record


def text_of(record: dict, key: str, path: str, line: int) -> str:
    return get_text(record, key, path, line)


def spans_of(record: dict, risk_key: str, text: str, path: str, line: int) -> list[list[int]]:
    """The record's validated ``[[start, end, level], ...]`` (``[]`` when it has none)."""
    raw = record.get(risk_key)
    if raw is None:
        return []
    try:
        return [list(s) for s in normalize_spans(raw, len(text))]
    except ValueError as e:
        raise InputError(path, line, f"{risk_key!r}: {e}") from None


def risky_runs(spans, min_level: int) -> list[tuple[int, int, int]]:
    """Maximal character runs covered by spans of level >= ``min_level``: ``(start, end, highest level)``."""
    runs: list[list[int]] = []
    for s, e, level in sorted(spans):
        if level < min_level:
            continue
        if runs and s <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], e)
            runs[-1][2] = max(runs[-1][2], level)
        else:
            runs.append([s, e, level])
    return [tuple(r) for r in runs]


def unit_random(seed: int, *parts) -> float:
    """A number in [0, 1) that depends only on ``seed`` and ``parts`` (never on batch sizes, workers or resumes)."""
    h = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64
