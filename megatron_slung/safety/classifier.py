"""A safety classifier trained from labelled JSONL, scoring text on Safety Pretraining's 0-5 scale.

Labels (``--label-key``) are one of three kinds, detected from the data or given with ``--label-type``:

- ``binary``: 0/1 (or true/false); classes {0, 1};
- ``score``: integers 0..5 (0 safe .. 5 most unsafe); classes {0, ..., 5};
- ``probability``: a number in [0, 1] (a soft label); classes {0, 1}, each record weighted p and 1 - p.

A value of none of these kinds, or a file that mixes them (a 3 and a 0.4), is refused naming file:line.

Every model gives class probabilities, read two ways: the **score** on the 0-5 scale (expected class for
``score`` labels, 5 x P(class 1) otherwise), which ``tools/tag_risk.py --score-thresholds`` maps to risk
levels, and **P(unsafe)** in [0, 1] (P(class 1), or P(score >= ``positive_from``)), the ``risk-classifier``
scorer of ``megatron_slung/data/scorers.py``.

Backends, all streamed over the input so memory stays bounded whatever the number of documents:

- ``linear`` (default): scikit-learn's ``HashingVectorizer`` (word 1-2 grams, 2^20 buckets, no vocabulary
  to hold) and an ``SGDClassifier`` with the logistic loss, trained by ``partial_fit`` on shuffled
  batches. Saved as ``linear.npz`` (weights) and applied with numpy, no pickle;
- ``fasttext`` (``pip install fasttext-numpy2``): fastText's supervised model on word n-grams;
- ``hf``: a local Hugging Face encoder directory fine-tuned as a sequence classifier (soft cross-entropy).

The model directory holds ``slung_classifier.json`` (the manifest: kind, label type, classes, features)
beside the model files, and ``report.json``: AUROC, F1, accuracy, the confusion over the 0-5 scale and the
calibration (ECE and reliability bins) on a held-out split chosen by a hash of (seed, file, line).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time

import numpy as np
from scipy.special import expit

from megatron_slung.data.corpus import InputError
from megatron_slung.safety.records import iter_input, text_of, unit_random

MANIFEST = "slung_classifier.json"
FORMAT = "megatron-slung risk classifier"
LABEL_TYPES = ("binary", "score", "probability")
BACKENDS = ("linear", "fasttext", "hf")


def is_classifier_dir(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


# ----------------------------------------------------------------------------------------------------
# Labels


def _label_value(raw, path: str, line: int, key: str) -> float:
    if isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise InputError(path, line, f"label {key!r} is {raw!r}; expected a number (0/1, a 0-5 score or a probability)")
    return float(raw)


def check_label(value: float, label_type: str, path: str, line: int, key: str) -> None:
    ok = {"binary": value in (0.0, 1.0), "score": value.is_integer() and 0 <= value <= 5,
          "probability": 0.0 <= value <= 1.0}[label_type]
    if not ok:
        want = {"binary": "0 or 1", "score": "an integer 0..5", "probability": "a number in [0, 1]"}[label_type]
        raise InputError(path, line, f"label {key!r} is {value:g}; --label-type {label_type} needs {want}")


def scan_labels(inputs, label_key: str, label_type: str = "auto") -> dict:
    """One pass over the labels: checks every value and decides the label type (``auto``)."""
    first_score = first_prob = None  # where the first value only a score / only a probability can be is
    counts: dict = {}
    n = 0
    for _, path, line, record in iter_input(inputs):
        if label_key not in record:
            raise InputError(path, line, f"missing label key {label_key!r} (keys: {sorted(record)[:8]})")
        value = _label_value(record[label_key], path, line, label_key)
        if label_type != "auto":
            check_label(value, label_type, path, line, label_key)
        elif value < 0 or value > 5 or (value > 1 and not value.is_integer()):
            raise InputError(path, line, f"label {label_key!r} is {value:g}: neither 0/1, an integer score 0..5 "
                                         "nor a probability in [0, 1]")
        elif value > 1 and first_score is None:
            first_score = (path, line, value)
        elif 0 < value < 1 and first_prob is None:
            first_prob = (path, line, value)
        counts[value] = counts.get(value, 0) + 1
        n += 1
    if n == 0:
        raise ValueError(f"no labelled records in {inputs}")
    if label_type == "auto":
        if first_score and first_prob:
            raise InputError(first_prob[0], first_prob[1],
                             f"label {label_key!r} is {first_prob[2]:g} (a probability) but {first_score[0]}:"
                             f"{first_score[1]} has {first_score[2]:g} (a 0-5 score); the labels mix kinds "
                             "(give --label-type to say which, or fix the data)")
        label_type = "score" if first_score else "probability" if first_prob else "binary"
    return {"label_type": label_type, "records": n,
            "label_counts": {f"{k:g}": v for k, v in sorted(counts.items())} if len(counts) <= 20 else None}


def classes_of(label_type: str) -> list[int]:
    return list(range(6)) if label_type == "score" else [0, 1]


def targets(labels: np.ndarray, label_type: str) -> np.ndarray:
    """Soft targets over the classes: one-hot, or (1 - p, p) for probabilities."""
    if label_type == "probability":
        return np.stack([1.0 - labels, labels], axis=1)
    k = len(classes_of(label_type))
    out = np.zeros((len(labels), k))
    out[np.arange(len(labels)), labels.astype(np.int64)] = 1.0
    return out


# ----------------------------------------------------------------------------------------------------
# Streaming the labelled records


def stream(inputs, text_key: str, label_key: str, *, holdout: float, seed: int, part: str):
    """``(text, label)`` of the training (``part="train"``) or held-out records, in file order. A record is
    held out when a hash of (seed, file, line) falls under ``holdout``: the split never depends on batching."""
    for file_index, path, line, record in iter_input(inputs):
        held = unit_random(seed, "holdout", file_index, line) < holdout
        if held == (part == "heldout"):
            yield text_of(record, text_key, path, line), _label_value(record[label_key], path, line, label_key)


def shuffled_batches(items, batch_size: int, buffer: int, rng: random.Random):
    """Batches of ``batch_size`` drawn from a shuffle buffer of ``buffer`` items (bounded memory)."""
    pool: list = []

    def drain(keep: int):
        rng.shuffle(pool)
        while len(pool) - keep >= batch_size or (keep == 0 and pool):
            batch, pool[:] = pool[:batch_size], pool[batch_size:]
            yield batch

    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            yield from drain(buffer // 2)
    yield from drain(0)


# ----------------------------------------------------------------------------------------------------
# Models: each has probabilities(texts) -> (n, classes) array


class LinearModel:
    """Hashed word n-grams and a one-vs-rest logistic model, applied with numpy (sklearn's predict_proba)."""

    def __init__(self, features: dict, coef: np.ndarray, intercept: np.ndarray):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.features = features
        self.vectorizer = HashingVectorizer(**vectorizer_kwargs(features))
        self.coef, self.intercept = coef, intercept

    @classmethod
    def load(cls, path: str, manifest: dict) -> "LinearModel":
        with np.load(os.path.join(path, "linear.npz")) as z:
            return cls(manifest["features"], z["coef"], z["intercept"])

    def probabilities(self, texts) -> np.ndarray:
        z = np.asarray(self.vectorizer.transform(list(texts)) @ self.coef.T) + self.intercept
        p = expit(z)
        if p.shape[1] == 1:  # binary: one decision function for class 1
            return np.hstack([1.0 - p, p])
        s = p.sum(axis=1, keepdims=True)
        return np.where(s > 0, p / np.where(s > 0, s, 1), 1.0 / p.shape[1])  # one-vs-rest, normalised


def vectorizer_kwargs(features: dict) -> dict:
    return {"n_features": 2 ** int(features["hash_bits"]), "ngram_range": tuple(features["ngram_range"]),
            "analyzer": features["analyzer"], "lowercase": True, "alternate_sign": False, "norm": "l2",
            "dtype": np.float32}


class FastTextModel:
    def __init__(self, path: str, classes: list[int]):
        try:
            import fasttext
        except ImportError as e:
            raise ImportError("this classifier is a fastText model: pip install fasttext-numpy2") from e
        self.model = fasttext.load_model(os.path.join(path, "fasttext.bin"))
        self.classes = classes

    def probabilities(self, texts) -> np.ndarray:
        texts = [" ".join(t.split()) for t in texts]  # fastText reads one line per text
        labels, probs = self.model.predict(texts, k=len(self.classes))
        out = np.zeros((len(texts), len(self.classes)))
        for i, (ls, ps) in enumerate(zip(labels, probs)):
            for label, p in zip(ls, ps):
                out[i, int(label.removeprefix("__label__"))] = p
        return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


class HFModel:
    """A fine-tuned HF sequence classifier; softmax over its classes, texts batched shortest first."""

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 512, device: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.batch_size = batch_size
        limits = [max_length, getattr(self.tokenizer, "model_max_length", None),
                  getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(int(x) for x in limits if x)

    def probabilities(self, texts) -> np.ndarray:
        texts = list(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.model.config.num_labels))
        with self.torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                out[idx] = self.torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu().numpy()
        return out


class RiskClassifier:
    """A loaded model directory: ``scores`` (0-5) and ``unsafe_probability`` (P(unsafe) in [0, 1])."""

    def __init__(self, path: str, manifest: dict, model):
        self.path, self.manifest, self.model = path, manifest, model
        self.label_type = manifest["label_type"]
        self.classes = manifest["classes"]
        self.positive_from = manifest["positive_from"]

    def probabilities(self, texts) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(self.classes)))
        return self.model.probabilities(texts)

    def scores_from(self, probs: np.ndarray) -> np.ndarray:
        if self.label_type == "score":
            score = probs @ np.arange(len(self.classes), dtype=np.float64)
        else:
            score = 5.0 * probs[:, 1]
        return np.clip(score, 0.0, 5.0)  # rounding may step past 5

    def unsafe_from(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, self.positive_from:].sum(axis=1) if self.label_type == "score" else probs[:, 1]

    def scores(self, texts) -> list[float]:
        return [float(x) for x in self.scores_from(self.probabilities(texts))]

    def unsafe_probability(self, texts) -> list[float]:
        return [float(min(1.0, max(0.0, x))) for x in self.unsafe_from(self.probabilities(texts))]

    def unsafe_probability_scorer(self):
        """The ``risk-classifier`` scorer: ``callable(list[str]) -> list[float]`` in [0, 1]."""
        from megatron_slung.data.scorers import NamedScorer

        return NamedScorer(self.unsafe_probability, "risk-classifier")


def load_classifier(path: str, **hf_options) -> RiskClassifier:
    if not is_classifier_dir(path):
        raise FileNotFoundError(f"{path!r} is not a classifier directory from tools/train_risk_classifier.py "
                                f"(no {MANIFEST})")
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise ValueError(f"{path}/{MANIFEST}: not a version-1 {FORMAT} manifest")
    kind = manifest["kind"]
    if kind == "linear":
        model = LinearModel.load(path, manifest)
    elif kind == "fasttext":
        model = FastTextModel(path, manifest["classes"])
    elif kind == "hf":
        model = HFModel(path, **hf_options)
    else:
        raise ValueError(f"{path}/{MANIFEST}: unknown kind {kind!r}")
    return RiskClassifier(path, manifest, model)


class ScoreThresholdTagger:
    """Unit tagger for ``tools/tag_risk.py``: a classifier's 0-5 score mapped to risk levels by ascending
    thresholds ``t1 < t2 < ...``: a score below t1 is level 1 (benign), a score >= t_i is level i + 1
    (``2,3`` -> [2, 3) ambiguous, >= 3 toxic; ``2,3,4`` adds level 4 for scores >= 4)."""

    def __init__(self, classifier: RiskClassifier, thresholds):
        self.classifier = classifier
        self.thresholds = check_thresholds(thresholds)

    def levels(self, texts: list[str]) -> list[int]:
        scores = self.classifier.scores_from(self.classifier.probabilities(texts))
        return [1 + int(np.searchsorted(self.thresholds, s, side="right")) for s in scores]


def check_thresholds(thresholds) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values or any(not 0 <= t <= 5 for t in values) or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"--score-thresholds {','.join(map(str, thresholds))}: give ascending numbers in [0, 5], "
                         "e.g. 2,3 (score >= 2: level 2, >= 3: level 3)")
    if len(values) > 254:
        raise ValueError("--score-thresholds: at most 254 thresholds (levels 1..255)")
    return values


def parse_thresholds(text: str) -> list[float]:
    try:
        return check_thresholds([t for t in text.split(",") if t.strip()])
    except ValueError as e:
        if "ascending" in str(e):
            raise
        raise ValueError(f"--score-thresholds {text!r}: expected comma-separated numbers, e.g. 2,3,4") from None


# ----------------------------------------------------------------------------------------------------
# Training


def _train_linear(cfg, label_type: str, classes: list[int], log) -> tuple[dict, dict]:
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import SGDClassifier

    features = {"hash_bits": cfg.hash_bits, "ngram_range": [1, cfg.ngrams], "analyzer": cfg.analyzer}
    vectorizer = HashingVectorizer(**vectorizer_kwargs(features))
    clf = SGDClassifier(loss="log_loss", alpha=cfg.alpha, random_state=cfg.seed, learning_rate="optimal")
    seen = 0
    for epoch in range(cfg.epochs):
        rng = random.Random(f"{cfg.seed}-{epoch}")
        items = stream(cfg.inputs, cfg.text_key, cfg.label_key, holdout=cfg.holdout, seed=cfg.seed, part="train")
        for batch in shuffled_batches(items, cfg.batch_size, cfg.shuffle_buffer, rng):
            texts = [t for t, _ in batch]
            labels = np.array([y for _, y in batch])
            X = vectorizer.transform(texts)
            if label_type == "probability":  # a soft label: the record once as each class, weighted
                X = _vstack(X, X)
                y = np.concatenate([np.ones(len(labels)), np.zeros(len(labels))]).astype(np.int64)
                w = np.concatenate([labels, 1.0 - labels])
            else:
                y, w = labels.astype(np.int64), None
            clf.partial_fit(X, y, classes=np.array(classes), sample_weight=w)
            seen += len(batch)
        log(f"epoch {epoch + 1}/{cfg.epochs}: {seen:,} training records seen")
    arrays = {"coef": clf.coef_.astype(np.float32), "intercept": clf.intercept_.astype(np.float32)}
    return {"features": features, "alpha": cfg.alpha}, arrays


def _vstack(a, b):
    import scipy.sparse

    return scipy.sparse.vstack([a, b]).tocsr()


def _train_fasttext(cfg, label_type: str, out: str, log) -> dict:
    try:
        import fasttext
    except ImportError as e:
        raise ImportError("--backend fasttext needs fastText: pip install fasttext-numpy2") from e
    if label_type == "probability":
        raise ValueError("--backend fasttext takes hard labels (0/1 or 0-5); for probabilities use --backend linear "
                         "or --hf-model")
    train_file = os.path.join(out, "fasttext-train.txt")
    with open(train_file, "w", encoding="utf-8") as f:  # fastText reads its input from a file, streamed
        rng = random.Random(cfg.seed)
        items = stream(cfg.inputs, cfg.text_key, cfg.label_key, holdout=cfg.holdout, seed=cfg.seed, part="train")
        for batch in shuffled_batches(items, cfg.batch_size, cfg.shuffle_buffer, rng):
            for text, label in batch:
                f.write(f"__label__{int(label)} {' '.join(text.split())}\n")
    model = fasttext.train_supervised(input=train_file, epoch=cfg.epochs, wordNgrams=cfg.ngrams, dim=cfg.fasttext_dim,
                                      lr=cfg.fasttext_lr, thread=1, seed=cfg.seed, verbose=0, minCount=1)
    model.save_model(os.path.join(out, "fasttext.bin"))
    os.remove(train_file)
    log(f"fastText: {cfg.epochs} epochs, word {cfg.ngrams}-grams, dim {cfg.fasttext_dim}")
    return {"features": {"ngrams": cfg.ngrams, "dim": cfg.fasttext_dim}}


def _train_hf(cfg, label_type: str, classes: list[int], out: str, log) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(cfg.hf_model):
        raise FileNotFoundError(f"--hf-model {cfg.hf_model!r} is not a local directory (nothing is downloaded)")
    torch.manual_seed(cfg.seed)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(cfg.hf_model, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.hf_model, local_files_only=True, num_labels=len(classes), ignore_mismatched_sizes=True,
        id2label={i: f"score_{c}" if label_type == "score" else ("safe", "unsafe")[i] for i, c in enumerate(classes)},
        label2id={(f"score_{c}" if label_type == "score" else ("safe", "unsafe")[i]): i for i, c in enumerate(classes)},
    ).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.hf_lr, weight_decay=0.01)
    steps = 0
    for epoch in range(cfg.epochs):
        rng = random.Random(f"{cfg.seed}-{epoch}")
        items = stream(cfg.inputs, cfg.text_key, cfg.label_key, holdout=cfg.holdout, seed=cfg.seed, part="train")
        for batch in shuffled_batches(items, cfg.hf_batch_size, cfg.shuffle_buffer, rng):
            enc = tok([t for t, _ in batch], padding=True, truncation=True, max_length=cfg.max_length,
                      return_tensors="pt").to(device)
            target = torch.tensor(targets(np.array([y for _, y in batch]), label_type), dtype=torch.float32,
                                  device=device)
            logits = model(**enc).logits.float()
            loss = -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()  # soft cross-entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
        log(f"epoch {epoch + 1}/{cfg.epochs}: {steps} steps, last loss {loss.item():.4f}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"base_model": os.path.abspath(cfg.hf_model), "lr": cfg.hf_lr, "steps": steps}


def train(cfg, log=print) -> dict:
    """Train, evaluate on the held-out split, and write the model directory ``cfg.output`` (replaced
    whole at the end: a failed run leaves no directory that looks like a model)."""
    start = time.perf_counter()
    if cfg.hf_model and cfg.backend != "linear":
        raise ValueError("--hf-model fine-tunes an HF encoder; it does not go with --backend "
                         f"{cfg.backend}")
    backend = "hf" if cfg.hf_model else cfg.backend
    if not 0 < cfg.holdout < 1:
        raise ValueError(f"--holdout {cfg.holdout}: must be in (0, 1)")
    if os.path.exists(cfg.output) and not is_classifier_dir(cfg.output) and os.listdir(cfg.output):
        raise FileExistsError(f"--output {cfg.output} exists and is not a classifier directory; not overwriting it")
    scan = scan_labels(cfg.inputs, cfg.label_key, cfg.label_type)
    label_type = scan["label_type"]
    classes = classes_of(label_type)
    positive_from = cfg.positive_from if label_type == "score" else 1
    if label_type == "score" and not 1 <= positive_from <= 5:
        raise ValueError(f"--positive-from {positive_from}: must be 1..5")
    log(f"{scan['records']:,} labelled records, labels: {label_type}"
        + (f" {scan['label_counts']}" if scan["label_counts"] else ""))

    parent = os.path.dirname(os.path.abspath(cfg.output))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(cfg.output))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = {"format": FORMAT, "version": 1, "kind": backend, "label_type": label_type, "classes": classes,
                    "positive_from": positive_from, "score_range": [0, 5], "text_key": cfg.text_key,
                    "label_key": cfg.label_key, "seed": cfg.seed, "holdout": cfg.holdout, "epochs": cfg.epochs}
        if backend == "linear":
            extra, arrays = _train_linear(cfg, label_type, classes, log)
            np.savez(os.path.join(tmp, "linear.npz"), **arrays)
        elif backend == "fasttext":
            extra = _train_fasttext(cfg, label_type, tmp, log)
        else:
            extra = _train_hf(cfg, label_type, classes, tmp, log)
        manifest.update(extra)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        clf = load_classifier(tmp, device=cfg.device) if backend == "hf" else load_classifier(tmp)
        report = evaluate(clf, cfg.inputs, cfg.text_key, cfg.label_key, holdout=cfg.holdout, seed=cfg.seed,
                          batch_size=max(cfg.batch_size, 256))
        report.update(training_records=scan["records"] - report["heldout_records"], label_type=label_type,
                      kind=backend, seconds=round(time.perf_counter() - start, 1))
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        if os.path.exists(cfg.output):
            shutil.rmtree(cfg.output)
        os.replace(tmp, cfg.output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# ----------------------------------------------------------------------------------------------------
# The held-out report


def evaluate(clf: RiskClassifier, inputs, text_key: str, label_key: str, *, holdout: float, seed: int,
             batch_size: int = 1024, bins: int = 10) -> dict:
    labels, probs = [], []
    batch: list = []
    for item in stream(inputs, text_key, label_key, holdout=holdout, seed=seed, part="heldout"):
        batch.append(item)
        if len(batch) >= batch_size:
            probs.append(clf.probabilities([t for t, _ in batch]))
            labels += [y for _, y in batch]
            batch = []
    if batch:
        probs.append(clf.probabilities([t for t, _ in batch]))
        labels += [y for _, y in batch]
    if not labels:
        raise ValueError(f"the held-out split is empty (--holdout {holdout}); give more data or a larger --holdout")
    return report_metrics(np.array(labels, dtype=np.float64), np.concatenate(probs), clf, bins)


def report_metrics(labels: np.ndarray, probs: np.ndarray, clf: RiskClassifier, bins: int = 10) -> dict:
    from sklearn.metrics import f1_score, roc_auc_score

    lt = clf.label_type
    score = clf.scores_from(probs)
    p_unsafe = np.clip(clf.unsafe_from(probs), 0.0, 1.0)
    # the truth on the 0-5 scale and as unsafe / not
    true_scale = labels if lt == "score" else 5.0 * labels
    if lt == "score":
        true_unsafe, observed = labels >= clf.positive_from, (labels >= clf.positive_from).astype(float)
    elif lt == "binary":
        true_unsafe, observed = labels >= 0.5, labels
    else:
        true_unsafe, observed = labels >= 0.5, labels  # calibration against the soft label itself

    def auroc(y, s):
        return float(roc_auc_score(y, s)) if 0 < int(np.sum(y)) < len(y) else None

    pred_unsafe = p_unsafe >= 0.5
    confusion = np.zeros((6, 6), dtype=np.int64)
    np.add.at(confusion, (np.clip(np.rint(true_scale), 0, 5).astype(int), np.clip(np.rint(score), 0, 5).astype(int)), 1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p_unsafe, side="right") - 1, 0, bins - 1)
    reliability, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        if n:
            conf, obs = float(p_unsafe[m].mean()), float(observed[m].mean())
            ece += n / len(labels) * abs(conf - obs)
            reliability.append({"bin": [round(edges[b], 3), round(edges[b + 1], 3)], "count": n,
                                "mean_predicted": round(conf, 4), "observed_unsafe": round(obs, 4)})
    out = {"heldout_records": int(len(labels)), "unsafe_share": round(float(np.mean(true_unsafe)), 4),
           "auroc": auroc(true_unsafe, p_unsafe),
           "f1": float(f1_score(true_unsafe, pred_unsafe, zero_division=0)),
           "accuracy": float(np.mean(true_unsafe == pred_unsafe)),
           "score_mae": float(np.mean(np.abs(score - true_scale))),
           "ece": round(ece, 4), "reliability": reliability,
           "confusion_0_5": {"rows": "true score (binary/probability labels x 5, rounded)",
                             "columns": "predicted score (rounded)", "matrix": confusion.tolist()},
           "unsafe_means": f"score >= {clf.positive_from}" if lt == "score" else "label 1" if lt == "binary" else "p >= 0.5"}
    if lt == "score":
        out["auroc_by_cut"] = {f">={k}": auroc(labels >= k, score) for k in range(1, 6)}
    return out
