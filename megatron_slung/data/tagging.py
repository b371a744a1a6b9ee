"""Risk tagging: give a document's characters risk levels, written as ``[[char_start, char_end, level], ...]``.

Two kinds of taggers:

- **unit taggers** give one level to each unit of text (a sentence, the whole document, or a given span):
  :class:`LexiconTagger` (word lists per level) and :class:`ClassifierTagger` (a score in [0, 1] mapped to
  levels by thresholds; SLUNG's defaults: > 0.99 → 3 toxic, > 1e-4 → 2 ambiguous, else 1 benign);
- **span taggers** mark exact matches: :class:`PIITagger` (e-mail addresses, phone numbers, a list of
  names) at a user level (default 4).

Every character takes the highest level any tagger gives it; the result is written as sorted,
non-overlapping spans, adjacent characters of one level merged. Units:

- ``document``: the whole text is one unit;
- ``sentence``: :func:`split_sentences` (below);
- ``given``: the record already has spans; they are validated and kept, and span taggers may add to
  them (unit taggers have nothing to score there and are refused).
"""

from __future__ import annotations

import re

import numpy as np

from megatron_slung.data.risk import AMBIGUOUS, BENIGN, TOXIC, check_level
from megatron_slung.data.risk_spans import normalize_spans

UNITS = ("sentence", "document", "given")

# ----------------------------------------------------------------------------------------------------
# Sentences

_SENTENCE_END = re.compile(
    r"[.!?\u2026]+[\"'\u201d\u2019)\]}\u00bb]*(?=\s|$)"  # . ! ? … (then closing quotes/brackets) before a space
    r"|[\u3002\uff01\uff1f]+[\"'\u201d\u2019\u300d\u300f)\]]*"  # 。！？ need no space after them
    r"|(?P<newline>\n)"  # a line break always ends a sentence (and starts the next one)
)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Split ``text`` into sentence spans that tile it: ``[(0, e1), (e1, e2), ..., (ek, len(text))]``.

    A simple splitter, by design: a sentence ends after ``.``, ``!``, ``?`` or ``…`` (with any closing
    quotes or brackets) followed by whitespace or the end of the text, after ``。``, ``！`` or ``？``, and at
    every line break. The whitespace after a sentence end belongs to the *next* sentence (tokenizers glue
    a space to the word after it), so a token never straddles two sentences. Spans that would hold only
    whitespace are merged into their neighbour. Abbreviations ("Dr. No") do split; that errs towards
    smaller units, which is the safe side for risk tagging.
    """
    n = len(text)
    if n == 0:
        return []
    cuts = [m.start() if m.group("newline") else m.end() for m in _SENTENCE_END.finditer(text)]
    spans, start = [], 0
    for cut in cuts:
        if cut <= start or cut >= n:
            continue
        if text[start:cut].strip():
            spans.append((start, cut))
            start = cut
    if spans and not text[start:].strip():
        spans[-1] = (spans[-1][0], n)  # trailing whitespace joins the last sentence
    else:
        spans.append((start, n))
    return spans


# ----------------------------------------------------------------------------------------------------
# Unit taggers


def read_word_list(path: str) -> list[str]:
    """One word or phrase per line; blank lines and lines starting with ``#`` are ignored."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                words.append(line)
    return words


class LexiconTagger:
    """Whole-word, case-insensitive word lists per level. A unit's level is the highest level of the
    words found in it, or ``default_level`` (benign) when none is found."""

    def __init__(self, lists: dict[int, list[str]], default_level: int = BENIGN):
        self.default_level = check_level(default_level, "lexicon default ")
        self.patterns = []  # (level, compiled regex), highest level first
        for level in sorted(lists, reverse=True):
            words = sorted({w.strip() for w in lists[level] if w.strip()}, key=lambda w: (-len(w), w))
            if not words:
                continue
            alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
            self.patterns.append((check_level(level, "lexicon "), re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.I)))

    @classmethod
    def from_files(cls, specs: list[str], default_level: int = BENIGN) -> "LexiconTagger":
        """``specs``: ``LEVEL:PATH`` strings, e.g. ``3:toxic.txt``."""
        lists: dict[int, list[str]] = {}
        for spec in specs:
            level, sep, path = spec.partition(":")
            if not sep or not level.strip().isdigit():
                raise ValueError(f"--lexicon {spec!r}: expected LEVEL:PATH, e.g. 3:toxic_words.txt")
            lists.setdefault(int(level), []).extend(read_word_list(path))
        return cls(lists, default_level)

    def find(self, text: str) -> list[tuple[int, int, int]]:
        """Every match as ``(start, end, level)``."""
        return [(m.start(), m.end(), level) for level, pattern in self.patterns for m in pattern.finditer(text)]

    def levels(self, texts: list[str]) -> list[int]:
        out = []
        for text in texts:
            level = self.default_level
            for lv, pattern in self.patterns:  # highest level first: the first hit decides
                if pattern.search(text):
                    level = max(level, lv)
                    break
            out.append(level)
        return out


class ClassifierTagger:
    """A scorer's [0, 1] output mapped to levels: > ``toxic_threshold`` → 3, > ``ambiguous_threshold`` → 2,
    else 1 (SLUNG's mapping and thresholds by default)."""

    def __init__(self, scorer, toxic_threshold: float = 0.99, ambiguous_threshold: float = 1e-4):
        if not 0.0 <= ambiguous_threshold <= toxic_threshold <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= ambiguous ({ambiguous_threshold}) <= toxic ({toxic_threshold}) <= 1")
        self.scorer = scorer
        self.toxic_threshold = toxic_threshold
        self.ambiguous_threshold = ambiguous_threshold

    def level_of(self, score: float) -> int:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"the scorer returned {score}, outside [0, 1]")
        if score > self.toxic_threshold:
            return TOXIC
        if score > self.ambiguous_threshold:
            return AMBIGUOUS
        return BENIGN

    def levels(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        scores = list(self.scorer(texts))
        if len(scores) != len(texts):
            raise ValueError(f"the scorer returned {len(scores)} scores for {len(texts)} texts")
        return [self.level_of(float(s)) for s in scores]


# ----------------------------------------------------------------------------------------------------
# Span taggers

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# International or North-American style numbers: +CC, optional (area), groups split by space, dot or dash;
# 9 to 15 digits in all, so that years, prices and short numbers do not match.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){2,4}(?!\w)")


class PIITagger:
    """Private data: e-mail addresses, phone numbers and listed names (whole word, case-sensitive
    for names, as names are capitalised), each marked with ``level`` (a user class, default 4)."""

    def __init__(self, level: int = 4, names: list[str] = (), emails: bool = True, phones: bool = True):
        self.level = check_level(level, "PII ")
        self.emails, self.phones = emails, phones
        names = sorted({n.strip() for n in names if n.strip()}, key=lambda w: (-len(w), w))
        self.names = (re.compile(r"(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, n.split())) for n in names) + r")(?!\w)")
                      if names else None)

    def spans(self, text: str) -> list[tuple[int, int, int]]:
        out = []
        if self.emails:
            out += [(m.start(), m.end(), self.level) for m in EMAIL.finditer(text)]
        if self.phones:
            for m in PHONE.finditer(text):
                digits = sum(c.isdigit() for c in m.group())
                if 9 <= digits <= 15:
                    out.append((m.start(), m.end(), self.level))
        if self.names is not None:
            out += [(m.start(), m.end(), self.level) for m in self.names.finditer(text)]
        return out


# ----------------------------------------------------------------------------------------------------
# Putting taggers together


def merge_spans(text_len: int, layers) -> list[list[int]]:
    """Combine spans from several sources: every character takes the highest level given to it; the
    result is sorted, non-overlapping ``[start, end, level]`` runs (uncovered characters stay uncovered)."""
    layers = [s for s in layers if s]
    if not layers:
        return []
    if len(layers) == 1 and all(e > s for s, e, _ in layers[0]):
        spans = sorted(layers[0])
        if all(a[1] <= b[0] for a, b in zip(spans, spans[1:])):
            return _join_adjacent([list(s) for s in spans])
    levels = np.full(text_len, -1, dtype=np.int16)
    for spans in layers:
        for s, e, level in spans:
            np.maximum(levels[s:e], level, out=levels[s:e])
    change = np.flatnonzero(np.diff(levels)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [text_len]])
    return [[int(s), int(e), int(levels[s])] for s, e in zip(starts, ends) if levels[s] >= 0]


def _join_adjacent(spans):
    out = []
    for s in spans:
        if out and out[-1][1] == s[0] and out[-1][2] == s[2]:
            out[-1][1] = s[1]
        else:
            out.append(s)
    return out


class RiskTagger:
    """Tags texts with ``unit`` in ``sentence``/``document``/``given``, unit taggers and span taggers."""

    def __init__(self, unit: str = "sentence", unit_taggers=(), span_taggers=()):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
        if unit == "given" and unit_taggers:
            raise ValueError("unit 'given' keeps the spans of the input; lexicon/classifier taggers need "
                             "sentence or document units")
        self.unit = unit
        self.unit_taggers = list(unit_taggers)
        self.span_taggers = list(span_taggers)

    def units(self, text: str) -> list[tuple[int, int]]:
        if self.unit == "document":
            return [(0, len(text))] if text else []
        return split_sentences(text)

    def tag(self, texts: list[str], given=None) -> list[list[list[int]]]:
        """Spans for each text. ``given`` (unit ``given``): each text's validated input spans."""
        layers: list[list] = [[] for _ in texts]
        if self.unit == "given":
            for i, spans in enumerate(given or [None] * len(texts)):
                if spans:
                    layers[i].append(list(spans))
        elif self.unit_taggers:
            units = [self.units(t) for t in texts]
            pieces = [texts[i][s:e].strip() for i, us in enumerate(units) for s, e in us]
            levels = np.zeros(len(pieces), dtype=np.int64)
            for tagger in self.unit_taggers:
                levels = np.maximum(levels, np.asarray(tagger.levels(pieces), dtype=np.int64).reshape(len(pieces)))
            k = 0
            for i, us in enumerate(units):
                layers[i].append([(s, e, int(levels[k + j])) for j, (s, e) in enumerate(us)])
                k += len(us)
        for tagger in self.span_taggers:
            for i, text in enumerate(texts):
                layers[i].append(tagger.spans(text))
        return [merge_spans(len(t), layer) for t, layer in zip(texts, layers)]


def validate_given(raw, text_len: int):
    """Input spans for unit ``given`` (None when absent), validated (raises ValueError)."""
    if raw is None:
        return None
    return normalize_spans(raw, text_len)
