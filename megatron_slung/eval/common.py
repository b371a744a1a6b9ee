"""Shared pieces of the evaluations: loading a model, reading JSONL, batching, writing results.

Every evaluation runs on a Hugging Face causal LM (Llama architecture) loaded offline from a local
directory. A megatron-slung checkpoint directory is converted to that form in memory first (see
`megatron_slung.model.hf_adapter`), so the evaluations never depend on our own model code.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Errors and input files
# ---------------------------------------------------------------------------------------------


class EvalInputError(ValueError):
    """Bad input to an evaluation: the message names the file and the record (line)."""


def read_jsonl(path: str, required: Sequence[str] = (), what: str = "records") -> list[dict]:
    """Read a JSONL file into a list of dicts, with errors that name the file and line.

    ``required`` lists keys every record must have. Blank lines are skipped. An empty file is an error
    (an evaluation over nothing would report meaningless numbers).
    """
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such file ({what} JSONL expected)")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EvalInputError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise EvalInputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for key in required:
                if key not in record:
                    raise EvalInputError(f"{path}:{lineno}: missing field {key!r} (has {sorted(record)})")
            record["_line"] = lineno
            records.append(record)
    if not records:
        raise EvalInputError(f"{path}: empty file, no {what} to evaluate")
    return records


def text_field(record: dict, key: str, path: str) -> str:
    """The string at ``record[key]``; ``key`` may be dotted (``prompt.text``). Errors name file:line."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise EvalInputError(f"{path}:{record.get('_line', '?')}: missing field {key!r}")
        value = value[part]
    if not isinstance(value, str):
        raise EvalInputError(
            f"{path}:{record.get('_line', '?')}: field {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def read_labelled(path: str, text_key: str = "text", label_key: str = "label") -> tuple[list[str], np.ndarray]:
    """Labelled JSONL (``text``, ``label``) -> texts and integer labels (0 = non-toxic, 1 = toxic).

    Labels may be 0/1, booleans, or numbers in [0, 1] (e.g. CivilComments' toxicity fraction, which is
    thresholded at 0.5).
    """
    records = read_jsonl(path, required=(text_key, label_key), what="labelled")
    texts, labels = [], []
    for r in records:
        texts.append(text_field(r, text_key, path))
        y = r[label_key]
        if isinstance(y, bool):
            y = int(y)
        if not isinstance(y, (int, float)) or isinstance(y, float) and not 0.0 <= y <= 1.0:
            raise EvalInputError(f"{path}:{r['_line']}: label {y!r} must be 0/1, a boolean or a number in [0, 1]")
        labels.append(int(y >= 0.5) if isinstance(y, float) else y)
        if labels[-1] not in (0, 1):
            raise EvalInputError(f"{path}:{r['_line']}: label {y!r} must be 0 or 1")
    return texts, np.asarray(labels, dtype=np.int64)


def prompt_text(record: dict, path: str) -> str:
    """The prompt of a generation record, in RealToxicityPrompts layout or a plain one.

    Accepted: ``{"prompt": {"text": ...}}`` (RealToxicityPrompts), ``{"prompt": "..."}``, ``{"text": "..."}``.
    """
    line = record.get("_line", "?")
    if "prompt" in record:
        p = record["prompt"]
        if isinstance(p, dict):
            if not isinstance(p.get("text"), str):
                raise EvalInputError(f"{path}:{line}: field 'prompt' has no string 'text' field")
            return p["text"]
        if isinstance(p, str):
            return p
        raise EvalInputError(f"{path}:{line}: field 'prompt' must be a string or an object with 'text'")
    if "text" in record:
        return text_field(record, "text", path)
    raise EvalInputError(f"{path}:{line}: missing field 'prompt' (or 'text'); has {sorted(k for k in record if k != '_line')}")


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    records = read_jsonl(path, what="prompt")
    prompts = [prompt_text(r, path) for r in records]
    return prompts[:limit] if limit else prompts


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """``--device``: auto, cpu, cuda, cuda:N; a device that is not there is an `EvalInputError`, not a raw
    assertion deep in torch."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EvalInputError(f"--device {device}: not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalInputError(f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False, "
                                 f"torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EvalInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise EvalInputError(f"--device {device}: not usable here ({str(e).splitlines()[0]})") from None
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def is_hf_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(path: str, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)`` from a local HF directory or a megatron-slung checkpoint directory.

    Nothing is downloaded: HF directories load with ``local_files_only=True``. The model is put in eval
    mode on ``device``. The tokenizer gets a pad token (its EOS, or UNK) when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(path):
        raise EvalInputError(f"--model {path}: no such file or directory")
    if not os.path.isdir(path):
        raise EvalInputError(f"--model {path}: expected a directory (an HF model or a megatron-slung checkpoint)")
    device = resolve_device(device if isinstance(device, str) or device is None else str(device))
    torch_dtype = resolve_dtype(dtype)
    if is_hf_model_dir(path):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        except TypeError:  # older transformers call it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise EvalInputError(f"--model {path}: not a loadable Hugging Face model directory: {e}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EvalInputError(f"--model {path}: the directory has no usable tokenizer files: {e}") from None
    else:
        model, tokenizer = _load_checkpoint_as_hf(path, torch_dtype)
    prepare_tokenizer(tokenizer)
    model.to(device)
    model.eval()
    return model, tokenizer


def _load_checkpoint_as_hf(path: str, torch_dtype: torch.dtype):
    """A megatron-slung checkpoint directory -> an in-memory HF model (via the shared name mapping)."""
    from megatron_slung.model.hf_checkpoint import CheckpointError, load_checkpoint_as_hf

    try:
        return load_checkpoint_as_hf(path, dtype=torch_dtype)
    except CheckpointError as e:
        raise EvalInputError(f"--model {path}: no config.json (so not a Hugging Face model directory) and not a "
                             f"readable megatron-slung checkpoint: {e}") from None


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token (needed for batching) without changing its vocabulary."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token_id is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise EvalInputError("the tokenizer has no pad, eos or unk token to pad batches with")


def encode(tokenizer, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
    """Token ids for each text: the tokenizer's own special tokens (BOS for Llama) when ``add_bos``."""
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None:
        out = [[bos] + ids for ids in out]
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", device=None):
    """List of id lists -> (input_ids, attention_mask, position_ids) LongTensors.

    With left padding the positions still count from 0 at each sequence's first real token, so a padded
    batch computes exactly what each sequence would alone (up to float rounding).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    return ids, mask, positions


def batches(items: Sequence, batch_size: int) -> Iterable[tuple[int, Sequence]]:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield start, items[start:start + batch_size]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def max_length(model, default: int = 2048) -> int:
    return int(getattr(model.config, "max_position_embeddings", default) or default)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable=None, **kwargs):
    """A tqdm progress bar (on stderr) that stays quiet when SLUNG_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", os.environ.get("SLUNG_NO_PROGRESS", "0") == "1")
    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], statistic=np.mean, num_samples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` over ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(num_samples, len(values)))
    stats = np.array([statistic(values[row]) for row in idx])
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(lo), float(hi)


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], scores: Sequence[float] | None = None):
    """Accuracy, F1 (toxic = 1 is the positive class), and AUROC when scores are given and both classes occur."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    out = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, pos_label=1, zero_division=0)),
        "num_examples": int(len(labels)),
        "num_positive": int(labels.sum()),
    }
    if scores is not None:
        out["auroc"] = float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else math.nan
    return out


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed at the end."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> a GitHub markdown table (columns in first-seen order unless given)."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def write_results(output_dir: str, task: str, results: dict, rows: Sequence[dict], title: str | None = None,
                  notes: str = "") -> dict:
    """Write ``results.json`` (everything) and ``results.md`` (a markdown table of ``rows``) atomically.

    Returns the paths written. NaN/inf become ``null`` in the JSON.
    """
    json_path = os.path.join(output_dir, "results.json")
    md_path = os.path.join(output_dir, "results.md")
    atomic_write_text(json_path, json.dumps(_jsonable({"task": task, **results}), indent=2) + "\n")
    md = f"# {title or task}\n\n" + markdown_table(rows)
    if notes:
        md += "\n" + notes.rstrip() + "\n"
    atomic_write_text(md_path, md)
    return {"json": json_path, "markdown": md_path}


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in records))
