"""Perplexity, overall and per risk level.

Sources: a prefix of an indexed dataset (``{prefix}.bin/.idx`` with its ``.risk`` channel, read with
`megatron_slung.data.indexed_dataset.IndexedDataset`), or JSONL text (``--json-key``, default ``text``;
an optional ``risk_spans`` field ``[[char_start, char_end, level], ...]`` gives the risk levels, a
token taking the highest level of the characters it covers).

Each predicted token is counted once, under the risk level of the token itself (the level the loss of
that prediction uses in training). Long documents are cut into windows of ``seq_length`` predictions;
the context restarts at each window.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megatron_slung.data.risk import level_name
from megatron_slung.eval import common
from megatron_slung.eval.common import EvalInputError


def documents_from_indexed(prefix: str, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``limit`` documents of an indexed dataset: (token ids, risk levels) pairs."""
    try:
        from megatron_slung.data.indexed_dataset import IndexedDataset
    except ImportError as e:
        raise EvalInputError(f"--data-path {prefix}: the indexed dataset reader is not available ({e})") from None
    try:
        dataset = IndexedDataset(prefix)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"--data-path {prefix}: cannot open the indexed dataset: {e}") from None
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise EvalInputError(f"--data-path {prefix}: the dataset has no sequences")
    docs = []
    for i in range(n):
        tokens = np.asarray(dataset.get(i), dtype=np.int64)
        risk = np.asarray(dataset.get_risk(i), dtype=np.uint8)
        if len(risk) != len(tokens):
            raise EvalInputError(f"--data-path {prefix}: sequence {i} has {len(tokens)} tokens but {len(risk)} risk levels")
        docs.append((tokens, risk))
    return docs


def span_levels(offsets: Sequence[tuple[int, int]], spans, where: str) -> np.ndarray:
    """Risk level per token from character spans: the highest level of the characters it covers."""
    levels = np.zeros(len(offsets), dtype=np.uint8)
    for span in spans:
        if not (isinstance(span, (list, tuple)) and len(span) == 3):
            raise EvalInputError(f"{where}: risk span {span!r} must be [char_start, char_end, level]")
        start, end, level = span
        if not (isinstance(level, int) and 0 <= level <= 255):
            raise EvalInputError(f"{where}: risk span {span!r} has a level outside 0..255")
        for t, (a, b) in enumerate(offsets):
            if a < end and b > start:
                levels[t] = max(levels[t], level)
    return levels


def documents_from_jsonl(path: str, tokenizer, json_key: str = "text", risk_key: str = "risk_spans",
                         limit: int | None = None, add_bos: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    records = common.read_jsonl(path, required=(json_key,), what="text")[:limit]
    docs = []
    for r in records:
        text = common.text_field(r, json_key, path)
        where = f"{path}:{r['_line']}"
        spans = r.get(risk_key)
        if spans:
            if not getattr(tokenizer, "is_fast", False):
                raise EvalInputError(f"{where}: risk spans need a fast (Rust) tokenizer for character offsets")
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, levels = enc["input_ids"], span_levels(enc["offset_mapping"], spans, where)
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            levels = np.zeros(len(ids), dtype=np.uint8)
        if add_bos and tokenizer.bos_token_id is not None:
            ids, levels = [tokenizer.bos_token_id] + list(ids), np.concatenate([[0], levels]).astype(np.uint8)
        docs.append((np.asarray(ids, dtype=np.int64), np.asarray(levels, dtype=np.uint8)))
    return docs


def windows(docs, seq_length: int):
    """Cut documents into (inputs, targets, target levels) windows of at most ``seq_length`` predictions."""
    for tokens, risk in docs:
        for start in range(0, len(tokens) - 1, seq_length):
            chunk = tokens[start:start + seq_length + 1]
            yield chunk[:-1], chunk[1:], risk[start + 1:start + seq_length + 1]


@torch.no_grad()
def token_nll(model, docs, seq_length: int | None = None, batch_size: int = 8, desc: str = "perplexity"):
    """Negative log-likelihood of every predicted token -> (nll float64 array, level uint8 array)."""
    device = common.model_device(model)
    seq_length = seq_length or common.max_length(model)
    items = list(windows(docs, seq_length))
    if not items:
        raise EvalInputError("no token to predict: every document is shorter than two tokens")
    # Longest first: fewer padded positions per batch.
    items.sort(key=lambda w: -len(w[0]))
    nll_all, levels_all = [], []
    for _, batch in common.progress(list(common.batches(items, batch_size)), desc=desc, unit="batch"):
        ids, mask, _ = common.pad_batch([w[0] for w in batch], pad_id=0, side="right", device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = F.log_softmax(logits, dim=-1)
        for i, (_, targets, levels) in enumerate(batch):
            t = torch.as_tensor(targets, device=device)
            nll = -logprobs[i, : len(t)].gather(-1, t[:, None]).squeeze(-1)
            nll_all.append(nll.double().cpu().numpy())
            levels_all.append(np.asarray(levels, dtype=np.uint8))
    return np.concatenate(nll_all), np.concatenate(levels_all)


def summarize(nll: np.ndarray, levels: np.ndarray) -> dict:
    def entry(sel):
        n = int(sel.sum())
        mean = float(nll[sel].mean()) if n else math.nan
        return {"tokens": n, "nll": mean, "perplexity": math.exp(mean) if n else math.nan}

    per_level = {}
    for level in sorted(set(levels.tolist())):
        per_level[str(level)] = {"name": level_name(level), **entry(levels == level)}
    return {"overall": entry(np.ones_like(levels, dtype=bool)), "per_level": per_level}


def evaluate_perplexity(model, tokenizer, *, data_path: str | None = None, jsonl: str | None = None,
                        json_key: str = "text", risk_key: str = "risk_spans", limit: int | None = None,
                        seq_length: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity of ``model`` on an indexed dataset prefix or a JSONL file, overall and per risk level.

    Returns ``{"overall": {"tokens", "nll", "perplexity"}, "per_level": {"3": {...}, ...}, ...}``.
    """
    if (data_path is None) == (jsonl is None):
        raise ValueError("give exactly one of data_path (indexed dataset prefix) or jsonl")
    if data_path is not None:
        docs = documents_from_indexed(data_path, limit)
        source = {"data_path": data_path}
    else:
        docs = documents_from_jsonl(jsonl, tokenizer, json_key=json_key, risk_key=risk_key, limit=limit)
        source = {"jsonl": jsonl, "json_key": json_key}
    vocab = model.get_input_embeddings().num_embeddings
    for i, (tokens, _) in enumerate(docs):
        if len(tokens) and (tokens.max() >= vocab or tokens.min() < 0):
            raise EvalInputError(f"{data_path or jsonl}: document {i} has token id {int(tokens.max())} outside the "
                                 f"model's vocabulary of {vocab} (a different tokenizer?)")
    nll, levels = token_nll(model, docs, seq_length=seq_length, batch_size=batch_size)
    return {**source, "documents": len(docs), **summarize(nll, levels)}


def result_rows(results: dict) -> list[dict]:
    rows = [{"risk level": "all", "tokens": results["overall"]["tokens"], "nll": results["overall"]["nll"],
             "perplexity": results["overall"]["perplexity"]}]
    for level, r in results["per_level"].items():
        rows.append({"risk level": f"{level} ({r['name']})", "tokens": r["tokens"], "nll": r["nll"],
                     "perplexity": r["perplexity"]})
    return rows


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", help="indexed dataset prefix (PREFIX.bin/.idx, with PREFIX.risk.bin/.idx)")
    src.add_argument("--jsonl", help="JSONL file of documents")
    parser.add_argument("--json-key", default="text", help="text field of the JSONL records (default: text)")
    parser.add_argument("--risk-key", default="risk_spans",
                        help="JSONL field with [[char_start, char_end, level], ...] (default: risk_spans)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="predictions per window (default: the model's max_position_embeddings)")


def run(args, model, tokenizer) -> tuple[dict, list[dict]]:
    results = evaluate_perplexity(model, tokenizer, data_path=args.data_path, jsonl=args.jsonl,
                                  json_key=args.json_key, risk_key=args.risk_key, limit=args.limit,
                                  seq_length=args.seq_length, batch_size=args.batch_size)
    return results, result_rows(results)
