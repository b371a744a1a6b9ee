"""Zero-shot toxicity identification by noisy-channel scoring (SLUNG's zero-shot evaluation).

For each label c with prompt P_c, score log p(text | P_c): the summed log-probability of the text's
tokens after the prompt. The predicted label is the one whose prompt makes the text most likely. The
text is tokenized once, on its own, so every label scores the same token sequence.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megatron_slung.eval import common
from megatron_slung.eval.common import EvalInputError

DEFAULT_PROMPTS = {
    0: "The following comment is polite, kind and respectful:\n",
    1: "The following comment is toxic, rude and offensive:\n",
}


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prefixes: Sequence[str], texts: Sequence[str], batch_size: int = 16,
                          desc: str = "scoring") -> np.ndarray:
    """Summed log p(text | prefix) for each (prefix, text) pair, float64 array.

    The prefix gets the tokenizer's BOS; the text is tokenized without special tokens and appended.
    """
    device = common.model_device(model)
    prefix_ids = common.encode(tokenizer, prefixes, add_bos=True)
    text_ids = common.encode(tokenizer, texts, add_bos=False)
    pairs = []
    for i, (p, t) in enumerate(zip(prefix_ids, text_ids)):
        if not t:
            raise EvalInputError(f"text {i} is empty after tokenization; nothing to score")
        if not p:  # no BOS and an empty prompt: the first text token has no context to be predicted from
            p, t = t[:1], t[1:]
        pairs.append((p, t))
    out = np.zeros(len(pairs), dtype=np.float64)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start, idx in common.progress(list(common.batches(order, batch_size)), desc=desc, unit="batch"):
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        ids, mask, _ = common.pad_batch(seqs, tokenizer.pad_token_id, side="right", device=device)
        logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, i in enumerate(idx):
            p, t = pairs[i]
            if not t:
                continue
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=device)
            target = torch.as_tensor(t, device=device)
            out[i] = logprobs[row, pos, target].double().sum().item()
    return out


def classify(model, tokenizer, texts: Sequence[str], prompts: Mapping[int, str] | None = None,
             batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noisy-channel scores ``[len(texts), num_labels]`` (labels sorted) and predicted labels."""
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    label_ids = sorted(prompts)
    scores = np.zeros((len(texts), len(label_ids)))
    for j, label in enumerate(label_ids):
        scores[:, j] = continuation_logprobs(model, tokenizer, [prompts[label]] * len(texts), texts,
                                             batch_size=batch_size, desc=f"label {label}")
    return scores, np.asarray(label_ids)[scores.argmax(axis=1)]


def evaluate_zero_shot(model, tokenizer, texts: Sequence[str], labels: Sequence[int],
                       prompts: Mapping[int, str] | None = None, batch_size: int = 16) -> dict:
    """Zero-shot F1 / accuracy (and AUROC of score(toxic) - score(non-toxic)) on labelled texts."""
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    if sorted(prompts) != [0, 1]:
        raise ValueError(f"zero-shot needs one prompt for label 0 and one for label 1, got labels {sorted(prompts)}")
    scores, predictions = classify(model, tokenizer, texts, prompts, batch_size=batch_size)
    metrics = common.classification_metrics(labels, predictions, scores[:, 1] - scores[:, 0])
    metrics["predicted_positive"] = int(predictions.sum())
    return {**metrics, "prompts": {str(k): v for k, v in prompts.items()}, "predictions": predictions.tolist(),
            "scores": scores.tolist()}


def parse_prompts(items: Sequence[str] | None, prompts_file: str | None) -> dict[int, str]:
    """``--prompt 1="Toxic: "`` items and/or a JSON file ``{"0": "...", "1": "..."}`` -> {label: prompt}."""
    prompts = dict(DEFAULT_PROMPTS)
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise EvalInputError(f"{prompts_file}: cannot read the prompts JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise EvalInputError(f"{prompts_file}: expected an object {{\"0\": prompt, \"1\": prompt}}")
        prompts = {}
        for k, v in loaded.items():
            if not str(k).isdigit() or not isinstance(v, str):
                raise EvalInputError(f"{prompts_file}: entry {k!r}: keys must be labels (0, 1) and values strings")
            prompts[int(k)] = v
    for item in items or []:
        label, sep, text = item.partition("=")
        if not sep or not label.strip().isdigit():
            raise ValueError(f"--prompt {item!r}: expected LABEL=TEXT, e.g. 1='This comment is toxic:\\n'")
        prompts[int(label)] = text.encode("utf-8").decode("unicode_escape") if "\\" in text else text
    return prompts


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="labelled JSONL: {\"text\": ..., \"label\": 0|1}")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--label-key", default="label")
    parser.add_argument("--prompt", action="append", metavar="LABEL=TEXT",
                        help="prompt for a label (repeatable; \\n escapes allowed); defaults: "
                             + "; ".join(f"{k}={v!r}" for k, v in DEFAULT_PROMPTS.items()))
    parser.add_argument("--prompts-file", default=None, help="JSON object {\"0\": prompt, \"1\": prompt}")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")


def run(args, model, tokenizer) -> tuple[dict, list[dict]]:
    texts, labels = common.read_labelled(args.data, args.text_key, args.label_key)
    if args.limit:
        texts, labels = texts[:args.limit], labels[:args.limit]
    results = evaluate_zero_shot(model, tokenizer, texts, labels, parse_prompts(args.prompt, args.prompts_file),
                                 batch_size=args.batch_size)
    results["data"] = args.data
    row = {k: results[k] for k in ("f1", "accuracy", "auroc", "num_examples", "num_positive", "predicted_positive")}
    return results, [row]
