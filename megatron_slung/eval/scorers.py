"""Toxicity scorers for the generation evaluations: ``scorer(list[str]) -> list[float]`` in [0, 1].

``build_scorer(name, path=None, **options)`` picks one:

| name | what | path |
|---|---|---|
| ``profanity`` (``alt-profanity-check``) | linear SVM from PyPI's alt-profanity-check, offline | - |
| ``hf-classifier`` | a local HF sequence-classification directory (e.g. a toxicity RoBERTa) | the directory |
| ``lexicon`` | 1.0 when a listed word occurs (whole word, any case), else 0.0 | word list, one per line |
| ``perspective`` | Perspective-style remote API (TOXICITY attribute); key from ``PERSPECTIVE_API_KEY`` | optional URL |
| ``http`` | any JSON endpoint: POST ``{"texts": [...]}`` -> ``{"scores": [...]}`` | the URL |
| ``module:function`` | your own Python callable with the same signature | - |

``profanity``, ``hf-classifier`` and ``module:function`` come from `megatron_slung.data.scorers` (the
risk tagger's scorers), so data tagging and evaluation score text the same way; this module adds the
ones only evaluations need.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Sequence

from megatron_slung.data import scorers as data_scorers
from megatron_slung.data.scorers import Scorer


def lexicon_scorer(path: str | None = None, words: Sequence[str] | None = None) -> Scorer:
    """1.0 if the text contains one of the words (whole word, case-insensitive), else 0.0."""
    if words is None:
        if path is None:
            raise ValueError("the 'lexicon' scorer needs a word list file (path) or words")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"lexicon scorer: {path}: no such word list file")
        with open(path, encoding="utf-8") as f:
            words = [w.strip() for w in f if w.strip() and not w.startswith("#")]
    if not words:
        raise ValueError(f"lexicon scorer: the word list {path or ''} is empty")
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?!\w)",
                         re.IGNORECASE)
    return lambda texts: [1.0 if pattern.search(t) else 0.0 for t in texts]


def _post_json(url: str, payload: dict, timeout: float, retries: int) -> dict:
    data = json.dumps(payload).encode("utf-8")
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if e.code not in (429, 500, 502, 503, 504) or attempt == retries:
                raise RuntimeError(f"scorer request to {url.split('?')[0]} failed: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if attempt == retries:
                raise RuntimeError(f"scorer request to {url.split('?')[0]} failed: {e.reason}") from None
        time.sleep(min(2 ** attempt, 30))
    raise AssertionError("unreachable")


PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"


def perspective_scorer(url: str | None = None, api_key: str | None = None, qps: float = 1.0, timeout: float = 30.0,
                       retries: int = 5, attribute: str = "TOXICITY") -> Scorer:
    """A Perspective-style API: one request per text, at most ``qps`` requests a second, retried on 429/5xx."""
    api_key = api_key or os.environ.get("PERSPECTIVE_API_KEY")
    if not api_key:
        raise ValueError("the 'perspective' scorer needs an API key: set PERSPECTIVE_API_KEY")
    endpoint = f"{url or PERSPECTIVE_URL}?key={api_key}"

    def score(texts):
        out, last = [], 0.0
        for text in texts:
            wait = 1.0 / qps - (time.monotonic() - last)
            if wait > 0:
                time.sleep(wait)
            last = time.monotonic()
            if not text.strip():  # the API rejects empty comments; an empty text is not toxic
                out.append(0.0)
                continue
            reply = _post_json(endpoint, {"comment": {"text": text}, "languages": ["en"],
                                          "requestedAttributes": {attribute: {}}}, timeout, retries)
            out.append(float(reply["attributeScores"][attribute]["summaryScore"]["value"]))
        return out

    return score


def http_scorer(url: str, batch_size: int = 64, timeout: float = 60.0, retries: int = 3) -> Scorer:
    """A generic JSON scoring service: POST ``{"texts": [...]}``, answer ``{"scores": [...]}``."""

    def score(texts):
        texts, out = list(texts), []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            reply = _post_json(url, {"texts": chunk}, timeout, retries)
            scores = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(scores, list) or len(scores) != len(chunk):
                raise RuntimeError(f"scorer at {url}: expected {{\"scores\": [{len(chunk)} numbers]}}, got {str(reply)[:200]}")
            out.extend(float(s) for s in scores)
        return out

    return score


class ScorerError(ValueError):
    """A scorer's output is not one number in [0, 1] per text: the message names the scorer and the text."""


class NamedScorer:
    """A scorer with the name it was built by, so that `score_texts` can name it in errors."""

    def __init__(self, fn: Scorer, name: str):
        self.fn, self.name = fn, name

    def __call__(self, texts):
        return self.fn(texts)


def scorer_name(scorer) -> str:
    return getattr(scorer, "name", None) or getattr(scorer, "__qualname__", None) or type(scorer).__name__


def build_scorer(name: str, path: str | None = None, **options) -> Scorer:
    """A toxicity scorer by name (see the module docstring); ``path`` is its file, directory or URL.

    ``profanity``, ``hf-classifier`` and ``module:function`` are the data tools' scorers
    (`megatron_slung.data.scorers`), so tagging and evaluation score text the same way.
    """
    return NamedScorer(_build_scorer(name, path, **options), name)


def _build_scorer(name: str, path: str | None = None, **options) -> Scorer:
    if name in ("lexicon", "wordlist"):
        return lexicon_scorer(path, **options)
    if name == "perspective":
        return perspective_scorer(path, **options)
    if name == "http":
        if not path:
            raise ValueError("the 'http' scorer needs --scorer-path URL")
        return http_scorer(path, **options)
    if name in ("hf-classifier", "classifier"):
        name = "hf"
    if name == "hf" and not path:
        raise ValueError("the 'hf-classifier' scorer needs --scorer-path DIR (a local HF sequence classifier)")
    try:
        return data_scorers.build_scorer(name, path, **options)
    except ValueError as e:
        if "unknown scorer" in str(e):
            raise ValueError(f"unknown scorer {name!r}: use profanity, hf-classifier, lexicon, perspective, http "
                             "or module:function") from None
        raise


def score_texts(scorer: Scorer, texts: Sequence[str], what: str = "the toxicity scorer",
                labels: Sequence[str] | None = None) -> list[float]:
    """``scorer(texts)``, checked: one finite number in [0, 1] per text, or `ScorerError` naming the scorer and
    the text (``labels[i]``, default "text i"). A NaN would otherwise make max() over a prompt's samples
    depend on their order."""
    who = f"{what} {scorer_name(scorer)!r}"
    raw = list(scorer(list(texts)))
    if len(raw) != len(texts):
        raise ScorerError(f"{who} returned {len(raw)} scores for {len(texts)} texts")
    scores = []
    for i, value in enumerate(raw):
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if not 0.0 <= x <= 1.0:  # also false for NaN
            where = labels[i] if labels is not None else f"text {i}"
            raise ScorerError(f"{who} returned {value!r} for {where} ({texts[i][:60]!r}); a toxicity score "
                              "must be a number in [0, 1]")
        scores.append(x)
    return scores
