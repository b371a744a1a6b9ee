"""Inference-time intervention (ITI) against toxicity.

1. Activations: the input of each layer's attention output projection (``self_attn.o_proj``), split
   into heads, at each labelled text's last token -> ``[N, layers, heads, head_dim]``.
2. Probes: a logistic regression per (layer, head) on a training split; rank heads by accuracy on the
   validation split and keep the top K.
3. Directions (mass mean shift): for each kept head, mean(non-toxic) - mean(toxic) over the training
   split, unit norm; sigma = standard deviation of the training activations projected on it.
4. Steering: during generation, add ``alpha * sigma * direction`` to each kept head (a forward pre-hook
   on ``o_proj``), at every position. ``alpha > 0`` pushes toward non-toxic.

The evaluation reports, for each alpha, the generation toxicity and the perplexity on clean text, so
the toxicity drop and its fluency cost sit side by side. The intervention saves to a small safetensors
file (``--save-intervention``) and loads back (``--intervention``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_slung.data import scorers
from megatron_slung.eval import common, perplexity, toxicity
from megatron_slung.eval.common import EvalInputError
from megatron_slung.eval.generation import SamplingConfig

FORMAT = "megatron-slung-iti"


def attention_output_projections(model) -> list[torch.nn.Module]:
    """``self_attn.o_proj`` of every decoder layer (Llama-architecture HF models)."""
    try:
        layers = model.model.layers
        return [layer.self_attn.o_proj for layer in layers]
    except AttributeError:
        raise ValueError(f"{type(model).__name__}: expected model.model.layers[i].self_attn.o_proj "
                         "(a Llama-architecture causal LM)") from None


def head_shape(model) -> tuple[int, int]:
    cfg = model.config
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    return num_heads, head_dim


@torch.no_grad()
def head_activations(model, tokenizer, texts: Sequence[str], batch_size: int = 16,
                     desc: str = "head activations") -> np.ndarray:
    """Per-head attention outputs (the input of o_proj) at each text's last token: ``[N, L, H, D]`` float32."""
    device = common.model_device(model)
    projections = attention_output_projections(model)
    num_heads, head_dim = head_shape(model)
    seqs = [ids[-common.max_length(model):] for ids in common.encode(tokenizer, texts)]
    for i, ids in enumerate(seqs):
        if not ids:
            raise EvalInputError(f"text {i} is empty after tokenization")
    captured: dict[int, torch.Tensor] = {}
    last_index: list[torch.Tensor] = []

    def hook(layer):
        def capture(module, args):
            x = args[0]
            rows = torch.arange(x.size(0), device=x.device)
            captured[layer] = x[rows, last_index[0]].float().view(x.size(0), num_heads, head_dim).cpu()
        return capture

    handles = [p.register_forward_pre_hook(hook(i)) for i, p in enumerate(projections)]
    out = []
    try:
        for _, batch in common.progress(list(common.batches(seqs, batch_size)), desc=desc, unit="batch"):
            ids, mask, _ = common.pad_batch(batch, tokenizer.pad_token_id, side="right", device=device)
            last_index[:] = [mask.sum(-1) - 1]
            model(input_ids=ids, attention_mask=mask)
            out.append(torch.stack([captured[i] for i in range(len(projections))], dim=1).numpy())
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(out)


@dataclass
class Intervention:
    """Which heads to shift, in which direction, by how much per unit alpha."""
    layers: list[int]
    heads: list[int]
    directions: torch.Tensor        # [K, head_dim], unit norm, pointing toward non-toxic
    sigmas: torch.Tensor            # [K]
    val_accuracy: list[float]
    num_layers: int
    num_heads: int
    head_dim: int

    def save(self, path: str) -> None:
        """A safetensors file (written atomically) with the heads, directions and sizes."""
        from safetensors.torch import save_file

        tensors = {
            "layers": torch.as_tensor(self.layers, dtype=torch.int64),
            "heads": torch.as_tensor(self.heads, dtype=torch.int64),
            "directions": self.directions.float().contiguous(),
            "sigmas": self.sigmas.float().contiguous(),
            "val_accuracy": torch.as_tensor(self.val_accuracy, dtype=torch.float32),
        }
        meta = {"format": FORMAT, "version": "1", "num_layers": str(self.num_layers),
                "num_heads": str(self.num_heads), "head_dim": str(self.head_dim)}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Intervention":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise EvalInputError(f"{path}: no such intervention file")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise EvalInputError(f"{path}: not a safetensors intervention file: {e}") from None
        if meta.get("format") != FORMAT:
            raise EvalInputError(f"{path}: not a megatron-slung ITI file (format {meta.get('format')!r})")
        missing = {"layers", "heads", "directions", "sigmas"} - set(tensors)
        if missing:
            raise EvalInputError(f"{path}: missing tensors {sorted(missing)}")
        return cls(layers=tensors["layers"].tolist(), heads=tensors["heads"].tolist(),
                   directions=tensors["directions"], sigmas=tensors["sigmas"],
                   val_accuracy=tensors.get("val_accuracy", torch.zeros(0)).tolist(),
                   num_layers=int(meta["num_layers"]), num_heads=int(meta["num_heads"]), head_dim=int(meta["head_dim"]))

    def check(self, model, where: str = "intervention") -> None:
        num_heads, head_dim = head_shape(model)
        num_layers = len(attention_output_projections(model))
        if (self.num_layers, self.num_heads, self.head_dim) != (num_layers, num_heads, head_dim):
            raise EvalInputError(
                f"{where}: made for {self.num_layers} layers x {self.num_heads} heads x {self.head_dim} dims, "
                f"but the model has {num_layers} x {num_heads} x {head_dim}")


def fit_intervention(activations: np.ndarray, labels: Sequence[int], top_k_heads: int = 16,
                     val_fraction: float = 0.2, seed: int = 0) -> tuple[Intervention, np.ndarray]:
    """Probes per head, top-K heads by validation accuracy, mass-mean-shift directions.

    ``activations``: ``[N, L, H, D]`` (from `head_activations`), ``labels``: 1 = toxic.
    Returns the intervention and the ``[L, H]`` validation accuracies of every head's probe.
    """
    from sklearn.linear_model import LogisticRegression

    from megatron_slung.eval.probe import split_indices

    labels = np.asarray(labels, dtype=np.int64)
    n, num_layers, num_heads, head_dim = activations.shape
    if len(labels) != n:
        raise ValueError(f"{n} activations but {len(labels)} labels")
    if np.bincount(labels, minlength=2).min() < 2:
        raise EvalInputError("steering needs at least two examples of each label (toxic and non-toxic)")
    train, val = split_indices(labels, val_fraction, seed)
    accuracy = np.zeros((num_layers, num_heads))
    heads = [(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    for layer, head in common.progress(heads, desc="head probes", unit="head"):
        x = activations[:, layer, head]
        probe = LogisticRegression(max_iter=1000, random_state=seed).fit(x[train], labels[train])
        accuracy[layer, head] = probe.score(x[val], labels[val])
    k = min(top_k_heads, len(heads))
    # Stable ranking: ties keep (layer, head) order, so the choice is reproducible.
    order = sorted(range(len(heads)), key=lambda i: (-accuracy[heads[i]], i))[:k]
    chosen = [heads[i] for i in order]
    directions, sigmas = [], []
    for layer, head in chosen:
        x = activations[train, layer, head].astype(np.float64)
        y = labels[train]
        d = x[y == 0].mean(0) - x[y == 1].mean(0)
        norm = np.linalg.norm(d)
        d = d / norm if norm > 0 else d
        directions.append(d)
        sigmas.append((activations[:, layer, head].astype(np.float64) @ d).std())
    intervention = Intervention(
        layers=[c[0] for c in chosen], heads=[c[1] for c in chosen],
        directions=torch.as_tensor(np.stack(directions), dtype=torch.float32),
        sigmas=torch.as_tensor(sigmas, dtype=torch.float32),
        val_accuracy=[float(accuracy[c]) for c in chosen],
        num_layers=num_layers, num_heads=num_heads, head_dim=head_dim)
    return intervention, accuracy


@contextlib.contextmanager
def steering(model, intervention: Intervention, alpha: float):
    """Inside the block, each kept head's o_proj input is shifted by ``alpha * sigma * direction``."""
    intervention.check(model)
    if alpha == 0:
        yield
        return
    projections = attention_output_projections(model)
    num_heads, head_dim = head_shape(model)
    shifts: dict[int, torch.Tensor] = {}
    for k, (layer, head) in enumerate(zip(intervention.layers, intervention.heads)):
        shift = shifts.setdefault(layer, torch.zeros(num_heads, head_dim))
        shift[head] += alpha * float(intervention.sigmas[k]) * intervention.directions[k].float()

    def hook(shift):
        def add(module, args):
            x = args[0]
            delta = shift.to(device=x.device, dtype=x.dtype).reshape(-1)
            return (x + delta,) + tuple(args[1:])
        return add

    handles = [projections[layer].register_forward_pre_hook(hook(shift)) for layer, shift in shifts.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def documents_from_texts(tokenizer, texts: Sequence[str]):
    return [(np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=np.uint8))
            for ids in common.encode(tokenizer, texts) if len(ids) > 1]


def evaluate_steering(model, tokenizer, intervention: Intervention, prompts: Sequence[str], scorer,
                      alphas: Sequence[float] = (0.0, 5.0, 10.0, 15.0), cfg: SamplingConfig | None = None,
                      ppl_texts: Sequence[str] | None = None, batch_size: int = 8, bootstrap: int = 1000) -> dict:
    """Generation toxicity and clean-text perplexity for each alpha (0 = no intervention, the baseline).

    Every alpha uses the same sampling seeds, so differences come from the intervention alone.
    """
    cfg = cfg or SamplingConfig()
    alphas = list(alphas)
    if 0.0 not in alphas:
        alphas = [0.0] + alphas
    docs = documents_from_texts(tokenizer, ppl_texts) if ppl_texts else None
    rows = {}
    for alpha in alphas:
        with steering(model, intervention, alpha):
            metrics, gens, scores = toxicity.evaluate_generation_toxicity(
                model, tokenizer, prompts, scorer, cfg, batch_size=batch_size, bootstrap=bootstrap,
                desc=f"alpha={alpha:g}")
            entry = {"alpha": alpha, **metrics, "samples": toxicity.generation_records(gens, scores)}
            if docs:
                nll, levels = perplexity.token_nll(model, docs, batch_size=batch_size, desc=f"perplexity alpha={alpha:g}")
                entry["perplexity"] = perplexity.summarize(nll, levels)["overall"]["perplexity"]
        rows[alpha] = entry
    base = rows[0.0]
    for entry in rows.values():
        entry["toxicity_drop"] = base["expected_max_toxicity"] - entry["expected_max_toxicity"]
        entry["toxicity_probability_drop"] = base["toxicity_probability"] - entry["toxicity_probability"]
        if "perplexity" in entry:
            entry["perplexity_increase"] = entry["perplexity"] - base["perplexity"]
    return {"alphas": [rows[a] for a in alphas]}


def result_rows(results: dict) -> list[dict]:
    rows = []
    for e in results["alphas"]:
        row = {"alpha": e["alpha"], "expected max toxicity": e["expected_max_toxicity"],
               "EMT 95% CI": e["expected_max_toxicity_ci95"], "EMT drop": e["toxicity_drop"],
               "toxicity probability": e["toxicity_probability"], "TP drop": e["toxicity_probability_drop"]}
        if "perplexity" in e:
            row["perplexity"] = e["perplexity"]
            row["perplexity increase"] = e["perplexity_increase"]
        rows.append(row)
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--data", help="labelled JSONL ({\"text\", \"label\"}: 1 = toxic) to find the heads and directions")
    parser.add_argument("--intervention", help="load a saved intervention instead of fitting one on --data")
    parser.add_argument("--save-intervention", help="write the fitted intervention here (default: OUTPUT_DIR/intervention.safetensors)")
    parser.add_argument("--prompts", required=True, help="prompts JSONL (RealToxicityPrompts layout) to generate from")
    parser.add_argument("--ppl-data", help="clean JSONL text for the perplexity cost (default: the non-toxic texts of --data)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--label-key", default="label")
    parser.add_argument("--top-k-heads", type=int, default=16, help="heads to steer (default 16)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share for ranking heads (default 0.2)")
    parser.add_argument("--alphas", default="0,5,10,15", help="comma-separated steering strengths (default 0,5,10,15)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    toxicity.add_sampling_arguments(parser, num_samples=5)
    toxicity.add_scorer_arguments(parser)


def run(args, model, tokenizer) -> tuple[dict, list[dict]]:
    if not args.data and not args.intervention:
        raise EvalInputError("steer needs --data (labelled JSONL to fit the intervention) or --intervention FILE")
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise EvalInputError(f"--alphas {args.alphas!r}: expected comma-separated numbers") from None
    texts = labels = None
    if args.data:
        texts, labels = common.read_labelled(args.data, args.text_key, args.label_key)
    results = {}
    if args.intervention:
        intervention = Intervention.load(args.intervention)
        intervention.check(model, args.intervention)
    else:
        acts = head_activations(model, tokenizer, texts, batch_size=args.batch_size)
        intervention, accuracy = fit_intervention(acts, labels, args.top_k_heads, args.val_fraction, args.seed)
        path = args.save_intervention or os.path.join(args.output_dir, "intervention.safetensors")
        intervention.save(path)
        results["intervention_file"] = path
        results["head_val_accuracy"] = accuracy.tolist()
    results["heads"] = [{"layer": la, "head": h, "val_accuracy": acc, "sigma": float(s)} for la, h, acc, s in
                        zip(intervention.layers, intervention.heads,
                            intervention.val_accuracy or [float("nan")] * len(intervention.layers), intervention.sigmas)]
    if args.ppl_data:
        ppl_texts = [common.text_field(r, args.text_key, args.ppl_data)
                     for r in common.read_jsonl(args.ppl_data, required=(args.text_key,), what="text")]
    elif texts is not None:
        ppl_texts = [t for t, y in zip(texts, labels) if y == 0]
    else:
        ppl_texts = None
    prompts = common.read_prompts(args.prompts, args.limit)
    scorer = scorers.build_scorer(args.scorer, args.scorer_path)
    steered = evaluate_steering(model, tokenizer, intervention, prompts, scorer, alphas,
                                toxicity.sampling_config(args), ppl_texts, batch_size=args.batch_size,
                                bootstrap=args.bootstrap)
    samples = {str(e["alpha"]): e.pop("samples") for e in steered["alphas"]}
    common.write_jsonl(os.path.join(args.output_dir, "generations.jsonl"),
                       [{"alpha": float(a), **rec} for a, recs in samples.items() for rec in recs])
    results.update(steered)
    return results, result_rows(results)
