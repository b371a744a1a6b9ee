"""Text scorers: a batch of texts in, one score in [0, 1] per text out (higher = more toxic/unsafe).

The one place where text is scored: the risk tagger (``tools/tag_risk.py --tagger classifier``) and the
evaluation suite (generation toxicity, steering, safe beam search) both build their scorer here, so data
tagging and evaluation score text the same way. ``build_scorer(name, path=None, **options)``:

| name | what | path |
|---|---|---|
| ``profanity`` (``alt-profanity-check``) | linear SVM from PyPI's alt-profanity-check, offline | - |
| ``hf`` (``hf-classifier``) | a local HF sequence-classification directory (e.g. a toxicity RoBERTa) | the directory |
| ``risk-classifier`` | a model directory written by ``tools/train_risk_classifier.py``: P(unsafe) | the directory |
| ``lexicon`` | 1.0 when a listed word occurs (whole word, any case), else 0.0 | word list, one per line |
| ``perspective`` | Perspective-style remote API (TOXICITY attribute); key from ``PERSPECTIVE_API_KEY`` | optional URL |
| ``http`` | any JSON endpoint: POST ``{"texts": [...]}`` -> ``{"scores": [...]}`` | the URL |
| ``module:function`` | your own Python callable with the same signature | - |

    score = build_scorer("profanity")
    score(["some text", "more text"])  -> [0.01, 0.97]

Nothing is downloaded: model paths must be local. :func:`score_texts` checks a scorer's output (one
number in [0, 1] per text) and names the scorer and the text when it is not.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

Scorer = Callable[[list], list]

# Label names that mean "the bad class" in common toxicity / safety classifiers.
_BAD_LABEL = re.compile(r"toxic|offens|hate|unsafe|harm|insult|profan|nsfw|abus|obscen|threat|label_1", re.I)


class ProfanityScorer:
    """alt-profanity-check's calibrated linear model (``pip install alt-profanity-check``; ships its weights)."""

    name = "profanity"

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError as e:
            raise ImportError("the 'profanity' scorer needs alt-profanity-check: pip install alt-profanity-check "
                              "(it is in megatron-slung's 'eval' extra)") from e
        self._predict = predict_prob

    def __call__(self, texts) -> list[float]:
        texts = list(texts)
        if not texts:
            return []
        return [float(p) for p in self._predict(texts)]


class HFClassifierScorer:
    """A local Hugging Face sequence-classification model; the score is the probability of its bad class.

    ``label`` picks the class (name or index). By default: the one whose name looks like toxic/offensive/
    hate/unsafe/...; else class 1 of a two-class model; a one-logit model is read through a sigmoid.
    Multi-label models (``problem_type == "multi_label_classification"``) use a sigmoid per class.
    Texts are scored in batches of ``batch_size``, shortest first, truncated to ``max_length`` tokens.
    """

    name = "hf"

    def __init__(self, path: str, label: str | int | None = None, batch_size: int = 32, max_length: int = 512,
                 device: str = "cpu"):
        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(f"HF classifier {path!r} is not a local directory (nothing is downloaded)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        config = self.model.config
        # The shortest of: the caller's limit, the tokenizer's, the model's position table.
        limits = [max_length, getattr(self.tokenizer, "model_max_length", None),
                  getattr(config, "max_position_embeddings", None)]
        self.max_length = min(int(x) for x in limits if x)
        self.num_labels = config.num_labels
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.label_index = self._pick_label(label, config)
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers: pad with EOS for batching
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            if getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = self.tokenizer.pad_token_id

    def _pick_label(self, label, config) -> int:
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        if self.num_labels == 1:
            return 0
        if label is not None:
            if isinstance(label, int) or str(label).isdigit():
                index = int(label)
            else:
                matches = [i for i, name in id2label.items() if name.lower() == str(label).lower()]
                if not matches:
                    raise ValueError(f"label {label!r} is not one of the model's labels {sorted(id2label.values())}")
                index = matches[0]
            if not 0 <= index < self.num_labels:
                raise ValueError(f"label index {index} is outside 0..{self.num_labels - 1}")
            return index
        bad = [i for i, name in sorted(id2label.items()) if _BAD_LABEL.search(name) and not re.search("non|not", name, re.I)]
        if bad:
            return bad[0]
        if self.num_labels == 2:
            return 1
        raise ValueError(f"cannot tell which of the labels {sorted(id2label.values())} is the toxic one; pass label=")

    def __call__(self, texts) -> list[float]:
        texts = list(texts)
        torch = self.torch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits.float()
                if self.num_labels == 1 or self.multi_label:
                    probs = torch.sigmoid(logits)
                else:
                    probs = torch.softmax(logits, dim=-1)
                for i, p in zip(idx, probs[:, self.label_index].tolist()):
                    scores[i] = float(p)
        return scores


def _import_callable(spec: str):
    module, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if isinstance(obj, type) else obj


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
    """A scorer by name (see the module docstring); ``path`` is its file, directory or URL.

    The result has a ``name`` (``score_texts`` names it in errors): scorer objects keep their own, plain
    callables are wrapped in a :class:`NamedScorer`.
    """
    scorer = _build_scorer(name, path, **options)
    return scorer if getattr(scorer, "name", None) else NamedScorer(scorer, name)


def _build_scorer(name: str, path: str | None = None, **options) -> Scorer:
    if name in ("profanity", "alt-profanity-check", "profanity_check"):
        return ProfanityScorer()
    if name in ("hf", "huggingface", "hf-classifier", "classifier"):
        if not path:
            raise ValueError(f"the {name!r} scorer needs a path: a local HF sequence-classification directory")
        return HFClassifierScorer(path, **options)
    if name == "risk-classifier":
        from megatron_slung.safety.classifier import load_classifier

        return load_classifier(path).unsafe_probability_scorer()
    if name in ("lexicon", "wordlist"):
        return lexicon_scorer(path, **options)
    if name == "perspective":
        return perspective_scorer(path, **options)
    if name == "http":
        if not path:
            raise ValueError("the 'http' scorer needs a path: the URL")
        return http_scorer(path, **options)
    if ":" in name:
        return _import_callable(name)
    raise ValueError(f"unknown scorer {name!r}: use profanity, hf (hf-classifier), risk-classifier, lexicon, "
                     "perspective, http or module:function")


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
