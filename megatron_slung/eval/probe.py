"""Toxicity identification with a linear probe (SLUNG's probing evaluation).

Labelled JSONL (``text``, ``label``: 1 = toxic) -> hidden state of each text's last token at one layer
(or every layer) -> logistic regression trained on a split, evaluated on the held-out rest (or on a
separate test file) -> F1, AUROC, accuracy. A probe trained on shuffled labels is reported beside it as
a control: a representation is "linear in toxicity" when the real probe beats the control clearly.

Layer numbering is Hugging Face's ``hidden_states``: 0 = the embeddings, i = the output of block i,
num_layers = the last block's output after the final norm. Negative numbers count from the end.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_slung.eval import common
from megatron_slung.eval.common import EvalInputError


@torch.no_grad()
def last_token_hidden_states(model, tokenizer, texts: Sequence[str], layers: Sequence[int] | None = None,
                             batch_size: int = 16, max_length: int | None = None, desc: str = "hidden states"):
    """Hidden state of each text's last token -> ``{layer: float32 array [len(texts), hidden]}``.

    ``layers=None`` returns every layer (0..num_layers). Texts longer than ``max_length`` tokens keep their
    last ``max_length`` tokens (the last token is what the probe reads).
    """
    device = common.model_device(model)
    max_length = max_length or common.max_length(model)
    seqs = [ids[-max_length:] for ids in common.encode(tokenizer, texts)]
    for i, ids in enumerate(seqs):
        if not ids:
            raise EvalInputError(f"text {i} is empty after tokenization; nothing to probe")
    num_hidden = model.config.num_hidden_layers + 1
    wanted = list(range(num_hidden)) if layers is None else [layer % num_hidden for layer in layers]
    feats = {layer: [] for layer in wanted}
    for _, batch in common.progress(list(common.batches(seqs, batch_size)), desc=desc, unit="batch"):
        ids, mask, _ = common.pad_batch(batch, tokenizer.pad_token_id, side="right", device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = mask.sum(-1) - 1
        rows = torch.arange(len(batch), device=device)
        for layer in wanted:
            feats[layer].append(hidden[layer][rows, last].float().cpu().numpy())
    return {layer: np.concatenate(v) for layer, v in feats.items()}


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0, C: float = 1.0):
    """Standardise, then logistic regression (scikit-learn). Returns the fitted pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y.tolist())) < 2:
        raise EvalInputError("the probe's training split has only one class; add examples of both labels")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    probe.fit(train_x, train_y)
    return probe


def split_indices(labels: np.ndarray, test_fraction: float, seed: int):
    """A stratified train/test split of example indices (held-out share ``test_fraction``)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    idx = np.arange(len(labels))
    counts = np.bincount(labels, minlength=2)
    stratify = labels if counts.min() >= 2 else None
    try:
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    except ValueError as e:
        raise EvalInputError(f"cannot split {len(labels)} examples into train and test: {e}") from None
    return np.sort(train), np.sort(test)


def probe_scores(train_x, train_y, test_x, test_y, seed: int = 0, C: float = 1.0) -> dict:
    probe = fit_probe(train_x, train_y, seed=seed, C=C)
    scores = probe.predict_proba(test_x)[:, 1]
    out = common.classification_metrics(test_y, (scores >= 0.5).astype(int), scores)
    out["train_accuracy"] = float(probe.score(train_x, train_y))
    return out


def evaluate_probe(model, tokenizer, texts: Sequence[str], labels: Sequence[int], *, layers="last",
                   test_texts: Sequence[str] | None = None, test_labels: Sequence[int] | None = None,
                   test_fraction: float = 0.2, seed: int = 0, C: float = 1.0, batch_size: int = 16,
                   control: bool = True) -> dict:
    """Linear-probe toxicity identification.

    ``layers``: an int, a list of ints, ``"last"`` (default) or ``"all"``. Without ``test_texts`` a
    stratified ``test_fraction`` of the examples is held out. ``control`` adds a probe trained on
    shuffled training labels. Returns ``{"layers": {layer: {"f1", "auroc", "accuracy", ...,
    "control": {...}}}, "best_layer": ...}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_hidden = model.config.num_hidden_layers + 1
    if layers == "all":
        wanted = list(range(num_hidden))
    elif layers == "last":
        wanted = [num_hidden - 1]
    else:
        wanted = [int(layers)] if isinstance(layers, (int, str)) else [int(x) for x in layers]
        for layer in wanted:
            if not -num_hidden <= layer < num_hidden:
                raise ValueError(f"--layer {layer} is outside the model's 0..{num_hidden - 1}")
        wanted = [layer % num_hidden for layer in wanted]
    feats = last_token_hidden_states(model, tokenizer, texts, wanted, batch_size=batch_size)
    if test_texts is not None:
        test_labels = np.asarray(test_labels, dtype=np.int64)
        test_feats = last_token_hidden_states(model, tokenizer, test_texts, wanted, batch_size=batch_size,
                                              desc="hidden states (test)")
        train_idx, test_idx = np.arange(len(labels)), None
    else:
        train_idx, test_idx = split_indices(labels, test_fraction, seed)
    rng = np.random.default_rng(seed + 1)
    shuffled = rng.permutation(labels[train_idx])
    results = {}
    for layer in wanted:
        x = feats[layer]
        if test_idx is None:
            tr_x, tr_y, te_x, te_y = x, labels, test_feats[layer], test_labels
        else:
            tr_x, tr_y, te_x, te_y = x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]
        entry = probe_scores(tr_x, tr_y, te_x, te_y, seed=seed, C=C)
        if control:
            entry["control"] = probe_scores(tr_x, shuffled, te_x, te_y, seed=seed, C=C)
        results[layer] = entry
    best = max(results, key=lambda layer: (results[layer]["f1"], results[layer].get("auroc", 0)))
    return {"layers": results, "best_layer": best, "num_train": int(len(train_idx)),
            "num_test": int(len(test_idx) if test_idx is not None else len(test_labels))}


def result_rows(results: dict) -> list[dict]:
    rows = []
    for layer, r in results["layers"].items():
        row = {"layer": layer, "f1": r["f1"], "auroc": r["auroc"], "accuracy": r["accuracy"],
               "train accuracy": r["train_accuracy"]}
        if "control" in r:
            row["control f1"] = r["control"]["f1"]
            row["control auroc"] = r["control"]["auroc"]
        rows.append(row)
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="labelled JSONL: {\"text\": ..., \"label\": 0|1}")
    parser.add_argument("--test-data", default=None, help="separate labelled JSONL to evaluate on (default: hold out a split)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--label-key", default="label")
    parser.add_argument("--layer", default="last", help="layer index (0 = embeddings, negative from the end), 'last' or 'all'")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share when no --test-data (default 0.2)")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-label control probe")


def parse_layers(value: str):
    if value in ("last", "all"):
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"--layer must be an integer, a comma-separated list, 'last' or 'all'; got {value!r}") from None


def run(args, model, tokenizer) -> tuple[dict, list[dict]]:
    texts, labels = common.read_labelled(args.data, args.text_key, args.label_key)
    test_texts = test_labels = None
    if args.test_data:
        test_texts, test_labels = common.read_labelled(args.test_data, args.text_key, args.label_key)
    results = evaluate_probe(model, tokenizer, texts, labels, layers=parse_layers(args.layer), test_texts=test_texts,
                             test_labels=test_labels, test_fraction=args.test_fraction, seed=args.seed, C=args.C,
                             batch_size=args.batch_size, control=not args.no_control)
    results["data"] = args.data
    return results, result_rows(results)
