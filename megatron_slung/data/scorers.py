"""Text scorers: a batch of texts in, one score in [0, 1] per text out (higher = more toxic/unsafe).

    score = build_scorer("profanity")                 # alt-profanity-check (PyPI, offline)
    score = build_scorer("hf", "path/to/classifier")  # a local HF sequence-classification directory
    score = build_scorer("my_module:my_function")     # any importable callable(list[str]) -> list[float]
    score(["some text", "more text"])  -> [0.01, 0.97]

Used by the risk tagger (``tools/tag_risk.py --tagger classifier``) and by the evaluation suite for
generation toxicity, so both score text the same way. Nothing is downloaded: paths must be local.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Callable

Scorer = Callable[[list], list]

SCORER_NAMES = ("profanity", "hf")
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


def build_scorer(name: str, path: str | None = None, **kw) -> Scorer:
    """A scorer: ``callable(list[str]) -> list[float]`` in [0, 1].

    ``name``: ``profanity`` (alt-profanity-check), ``hf`` (``path`` = a local sequence-classification
    directory; ``label``, ``batch_size``, ``max_length``, ``device`` keywords), or ``module:callable``.
    """
    if name in ("profanity", "alt-profanity-check", "profanity_check"):
        return ProfanityScorer()
    if name in ("hf", "huggingface"):
        return HFClassifierScorer(path, **kw)
    if ":" in name:
        return _import_callable(name)
    raise ValueError(f"unknown scorer {name!r}: use profanity, hf (with a path) or module:callable")
