"""A seeded generator of synthetic JSONL documents, for benchmarks, tests and the built-in sample.

The text is made of pseudo-words built from syllables, drawn with a Zipf-like law so that a tokenizer
sees realistic repetition; sentences end with punctuation, paragraphs with newlines, and a small share
of words are accented, CJK or emoji, so that multi-byte UTF-8 is always exercised. A few "flagged"
words (listed by :func:`flagged_words`) appear in some sentences, so that a lexicon tagger has
something to find. Nothing here is real language: it is for throughput and plumbing, not for models.
"""

from __future__ import annotations

import json
import random

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fr", "gr", "pl", "pr", "sh", "st", "str", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "oo"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "rk", "ck"]
_EXOTIC = ["café", "naïve", "façade", "Zürich", "señor", "crème", "smörgåsbord", "Ærø", "东京", "日本語",
           "데이터", "Москва", "αβγ", "😀", "🤖", "🚀", "—", "…"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.choice((1, 1, 1, 2, 2, 3))))


def flagged_words(level: int) -> list[str]:
    """The placeholder words the generator plants for risk ``level`` (2 ambiguous, 3 toxic)."""
    return {2: ["grumbleflap", "snarkwhistle"], 3: ["zorblax", "vexmorg", "gnashtooth"]}[level]


class SyntheticCorpus:
    """``documents(n)`` yields ``{"id", "text"}`` dicts; identical for the same seed."""

    def __init__(self, seed: int = 1234, vocab_words: int = 20000, flagged_rate: float = 0.05):
        rng = random.Random(seed)
        words = set()
        while len(words) < vocab_words:
            words.add(_word(rng))
        self.words = sorted(words)
        rng.shuffle(self.words)
        # Zipf-like cumulative weights: word i has weight 1 / (i + 2).
        self.cum = []
        total = 0.0
        for i in range(len(self.words)):
            total += 1.0 / (i + 2)
            self.cum.append(total)
        self.seed = seed
        self.flagged_rate = flagged_rate

    def _sentence(self, rng: random.Random) -> str:
        n = rng.randint(4, 24)
        words = rng.choices(self.words, cum_weights=self.cum, k=n)
        for i in range(n):
            r = rng.random()
            if r < 0.015:
                words[i] = rng.choice(_EXOTIC)
            elif r < 0.03:
                words[i] = str(rng.randint(0, 2025))
        if rng.random() < self.flagged_rate:
            level = 3 if rng.random() < 0.6 else 2
            words[rng.randrange(n)] = rng.choice(flagged_words(level))
        words[0] = words[0].capitalize()
        s = " ".join(words)
        if n > 8 and rng.random() < 0.3:
            cut = s.find(" ", len(s) // 2)
            if cut > 0:
                s = s[:cut] + "," + s[cut:]
        return s + rng.choice([".", ".", ".", ".", "!", "?"])

    def document(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        paragraphs = []
        for _ in range(rng.choice((1, 1, 2, 3, 4))):
            paragraphs.append(" ".join(self._sentence(rng) for _ in range(rng.randint(1, 12))))
        return {"id": index, "text": "\n\n".join(paragraphs)}

    def documents(self, n: int, start: int = 0):
        for i in range(start, start + n):
            yield self.document(i)


def write_jsonl(path: str, n_docs: int | None = None, target_bytes: int | None = None,
                seed: int = 1234) -> int:
    """Write ``n_docs`` documents (or about ``target_bytes`` of them) to ``path``; returns the count."""
    if (n_docs is None) == (target_bytes is None):
        raise ValueError("give exactly one of n_docs and target_bytes")
    corpus = SyntheticCorpus(seed)
    written = size = 0
    with open(path, "w", encoding="utf-8") as f:
        while (n_docs is not None and written < n_docs) or (target_bytes is not None and size < target_bytes):
            line = json.dumps(corpus.document(written), ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            written += 1
    return written
