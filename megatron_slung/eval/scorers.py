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

Names this module does not know are passed on to ``megatron_slung.data.scorers.build_scorer`` (the
risk-tagging scorers of the data tools) when that module exists.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

Scorer = Callable[[Sequence[str]], list]


def profanity_scorer() -> Scorer:
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise ImportError("the 'profanity' scorer needs alt-profanity-check: pip install alt-profanity-check") from e

    def score(texts):
        texts = list(texts)
        return [float(p) for p in predict_prob(texts)] if texts else []

    return score


def toxic_label_index(id2label: dict) -> int:
    """Pick the class that means 'toxic' from a classifier's labels (a 'toxic' label that is not negated)."""
    labels = {int(k): str(v).lower() for k, v in id2label.items()}
    for i, name in sorted(labels.items()):
        if re.search(r"toxic|offensive|hate|abusive|unsafe|harmful", name) and not re.search(r"\b(non|not|no)\b|non-|non_", name):
            return i
    if len(labels) == 2:
        return 1
    raise ValueError(f"cannot tell which class is toxic among {sorted(labels.values())}; pass label=INDEX")


def hf_classifier_scorer(path: str, device: str = "cpu", batch_size: int = 32, label: int | None = None,
                         max_length: int = 512) -> Scorer:
    """A local Hugging Face sequence classifier; score = probability of its toxic class.

    Multi-label heads (``problem_type == "multi_label_classification"``) use a sigmoid, others a softmax.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"hf-classifier scorer: {path} is not a directory (a local HF classifier is expected)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
    index = label if label is not None else toxic_label_index(model.config.id2label)
    multi_label = model.config.problem_type == "multi_label_classification"

    @torch.no_grad()
    def score(texts):
        out = []
        texts = list(texts)
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            logits = model(**enc).logits.float()
            probs = logits.sigmoid() if multi_label else logits.softmax(-1)
            out.extend(probs[:, index].tolist())
        return out

    return score


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


def python_scorer(spec: str) -> Scorer:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scorer {spec!r}: cannot import {name} from {module}: {e}") from None
    return fn


def build_scorer(name: str, path: str | None = None, **options) -> Scorer:
    """A toxicity scorer by name (see the module docstring); ``path`` is its file, directory or URL."""
    if name in ("profanity", "alt-profanity-check", "profanity-check"):
        return profanity_scorer()
    if name in ("hf-classifier", "hf", "classifier"):
        if not path:
            raise ValueError("the 'hf-classifier' scorer needs --scorer-path DIR (a local HF classifier)")
        return hf_classifier_scorer(path, **options)
    if name in ("lexicon", "wordlist"):
        return lexicon_scorer(path, **options)
    if name == "perspective":
        return perspective_scorer(path, **options)
    if name == "http":
        if not path:
            raise ValueError("the 'http' scorer needs --scorer-path URL")
        return http_scorer(path, **options)
    if ":" in name:
        return python_scorer(name)
    try:
        from megatron_slung.data import scorers as data_scorers
    except ImportError:
        data_scorers = None
    if data_scorers is not None and hasattr(data_scorers, "build_scorer"):
        return data_scorers.build_scorer(name, path)
    raise ValueError(f"unknown scorer {name!r}: use profanity, hf-classifier, lexicon, perspective, http or module:function")


def score_texts(scorer: Scorer, texts: Sequence[str], what: str = "scorer") -> list[float]:
    scores = [float(s) for s in scorer(list(texts))]
    if len(scores) != len(texts):
        raise RuntimeError(f"{what} returned {len(scores)} scores for {len(texts)} texts")
    return scores
