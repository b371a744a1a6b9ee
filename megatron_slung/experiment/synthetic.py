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
                   for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3))))


def person_names() -> list[str]:
    """Made-up full names the generator plants in contact sentences (for the PII tagger)."""
    return ["Ada Quillfeather", "Boris Tannenholt", "Chiara Vendelmoor", "Dmitri Ashgrove", "Emeka Oyelaran"]


def flagged_words(level: int) -> list[str]:
    """The placeholder words the generator plants for risk ``level`` (2 ambiguous, 3 toxic)."""
    return {2: ["grumbleflap", "snarkwhistle"], 3: ["zorblax", "vexmorg", "gnashtooth"]}[level]


class SyntheticCorpus:
    """``documents(n)`` yields ``{"id", "text"}`` dicts; identical for the same seed."""

    def __init__(self, seed: int = 1234, vocab_words: int = 100000, flagged_rate: float = 0.05,
                 rare_rate: float = 0.005):
        rng = random.Random(seed)
        words = set()
        while len(words) < vocab_words:
            words.add(_word(rng))
        # Frequent words are short (Zipf's law of abbreviation): rank by length, ties at random.
        self.words = sorted(words)
        rng.shuffle(self.words)
        self.words.sort(key=len)
        # Zipf-like cumulative weights: word i has weight 1 / (i + 2).
        self.cum = []
        total = 0.0
        for i in range(len(self.words)):
            total += 1.0 / (i + 2)
            self.cum.append(total)
        self.seed = seed
        self.flagged_rate = flagged_rate
        self.rare_rate = rare_rate  # share of one-off tokens (codes, typos, ids): the long tail of real text

    def _sentence(self, rng: random.Random) -> str:
        n = rng.randint(4, 24)
        words = rng.choices(self.words, cum_weights=self.cum, k=n)
        for i in range(n):
            r = rng.random()
            if r < 0.015:
                words[i] = rng.choice(_EXOTIC)
            elif r < 0.03:
                words[i] = str(rng.randint(0, 2025))
            elif r < 0.03 + self.rare_rate:
                words[i] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(4, 10)))
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

    def _contact(self, rng: random.Random) -> str:
        """A sentence with made-up private data (a name from :func:`person_names`, an e-mail, a phone)."""
        first, last = rng.choice(person_names()).split()
        return (f"Write to {first} {last} at {first.lower()}.{last.lower()}@example.org or call "
                f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}.")

    def document(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        paragraphs = []
        for _ in range(rng.choice((1, 1, 2, 3, 4))):
            paragraphs.append(" ".join(self._sentence(rng) for _ in range(rng.randint(1, 12))))
        if rng.random() < 0.02:
            paragraphs[-1] += " " + self._contact(rng)
        return {"id": index, "text": "\n\n".join(paragraphs)}

    def documents(self, n: int, start: int = 0):
        for i in range(start, start + n):
            yield self.document(i)


def write_jsonl(path: str, n_docs: int | None = None, target_bytes: int | None = None,
                seed: int = 1234, risk_spans: bool = False, **corpus_kw) -> int:
    """Write ``n_docs`` documents (or about ``target_bytes`` of them) to ``path``; returns the count.

    ``risk_spans=True`` adds sentence-level ``risk_spans`` from the flagged words (a lexicon tagger), as
    ``tools/tag_risk.py --unit sentence --tagger lexicon`` would write them.
    """
    if (n_docs is None) == (target_bytes is None):
        raise ValueError("give exactly one of n_docs and target_bytes")
    corpus = SyntheticCorpus(seed, **corpus_kw)
    tagger = None
    if risk_spans:
        from megatron_slung.data.tagging import LexiconTagger, RiskTagger

        tagger = RiskTagger("sentence", [LexiconTagger({2: flagged_words(2), 3: flagged_words(3)})])
    from megatron_slung.data.corpus import atomic_text_output

    written = size = 0
    with atomic_text_output(path) as f:  # compressed as the name says; appears only when complete
        while (n_docs is not None and written < n_docs) or (target_bytes is not None and size < target_bytes):
            doc = corpus.document(written)
            if tagger is not None:
                doc["risk_spans"] = tagger.tag([doc["text"]])[0]
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            written += 1
    return written


def main(argv=None) -> int:
    import argparse
    import os

    p = argparse.ArgumentParser(description="Write a seeded synthetic JSONL corpus (and the word lists it plants).")
    p.add_argument("--output", required=True, help="the JSONL file to write (.gz/.zst: compressed)")
    p.add_argument("--docs", type=int, default=None, help="number of documents")
    p.add_argument("--size-mb", type=float, default=None, help="or: about this many MB")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--risk-spans", action="store_true", help="add sentence-level risk_spans from the flagged words")
    p.add_argument("--word-lists", default=None, metavar="DIR",
                   help="also write DIR/toxic.txt, DIR/ambiguous.txt and DIR/names.txt (what the generator plants)")
    args = p.parse_args(argv)
    if (args.docs is None) == (args.size_mb is None):
        p.error("give --docs or --size-mb")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    n = write_jsonl(args.output, n_docs=args.docs, target_bytes=None if args.size_mb is None else int(args.size_mb * 1e6),
                    seed=args.seed, risk_spans=args.risk_spans)
    if args.word_lists:
        os.makedirs(args.word_lists, exist_ok=True)
        for name, words in (("toxic", flagged_words(3)), ("ambiguous", flagged_words(2)), ("names", person_names())):
            with open(os.path.join(args.word_lists, f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write("".join(w + "\n" for w in words))
    print(f"wrote {n} documents to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
