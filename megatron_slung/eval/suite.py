"""All the toxicity evaluations of one model in one call, with one flat row of headline numbers.

For experiment scripts that compare many models (e.g. toxic share x treatment): each evaluation runs
as its own task would, its full results are written under ``output_dir/TASK/``, and the returned row
holds the numbers a comparison table needs. Inputs that are not given skip their evaluations.
"""

from __future__ import annotations

import os
from typing import Sequence

from megatron_slung.data import scorers
from megatron_slung.eval import common, perplexity, probe, steer, toxicity, zero_shot
from megatron_slung.eval.generation import SamplingConfig


def evaluate_suite(model, tokenizer, *, output_dir: str, clean_jsonl: str | None = None,
                   labelled_jsonl: str | None = None, prompts_jsonl: str | None = None, scorer="profanity",
                   scorer_path: str | None = None, sampling: SamplingConfig | None = None,
                   probe_layer="last", alphas: Sequence[float] = (0.0, 5.0), top_k_heads: int = 16,
                   prompt_limit: int | None = None, batch_size: int = 8, seed: int = 1234,
                   bootstrap: int = 1000) -> dict:
    """Run perplexity (``clean_jsonl``), probe and zero-shot (``labelled_jsonl``), generation toxicity
    (``prompts_jsonl``) and steering (both) on one loaded model. Returns the flat headline row::

        {"perplexity": ..., "perplexity_level_3": ..., "probe_f1": ..., "probe_auroc": ...,
         "zero_shot_f1": ..., "expected_max_toxicity": ..., "toxicity_probability": ...,
         "steer_alpha": a, "steer_expected_max_toxicity": ..., "steer_toxicity_drop": ...,
         "steer_perplexity_increase": ...}
    """
    common.set_seed(seed)
    row: dict = {}
    score = scorers.build_scorer(scorer, scorer_path) if prompts_jsonl else None
    sampling = sampling or SamplingConfig(num_samples=25, max_new_tokens=20, seed=seed)

    def save(task, results, rows):
        common.write_results(os.path.join(output_dir, task), task, results, rows)

    if clean_jsonl:
        res = perplexity.evaluate_perplexity(model, tokenizer, jsonl=clean_jsonl, batch_size=batch_size)
        save("perplexity", res, perplexity.result_rows(res))
        row["perplexity"] = res["overall"]["perplexity"]
        for level, r in res["per_level"].items():
            row[f"perplexity_level_{level}"] = r["perplexity"]
    texts = labels = None
    if labelled_jsonl:
        texts, labels = common.read_labelled(labelled_jsonl)
        res = probe.evaluate_probe(model, tokenizer, texts, labels, layers=probe_layer, seed=seed, batch_size=batch_size)
        save("probe", res, probe.result_rows(res))
        best = res["layers"][res["best_layer"]]
        row.update(probe_layer=res["best_layer"], probe_f1=best["f1"], probe_auroc=best["auroc"],
                   probe_accuracy=best["accuracy"])
        res = zero_shot.evaluate_zero_shot(model, tokenizer, texts, labels, batch_size=batch_size)
        save("zero-shot", res, [{k: res[k] for k in ("f1", "accuracy", "auroc", "num_examples")}])
        row.update(zero_shot_f1=res["f1"], zero_shot_accuracy=res["accuracy"])
    if prompts_jsonl:
        prompts = common.read_prompts(prompts_jsonl, prompt_limit)
        metrics, gens, scores = toxicity.evaluate_generation_toxicity(model, tokenizer, prompts, score, sampling,
                                                                      batch_size=batch_size, bootstrap=bootstrap)
        save("generate-toxicity", metrics, [toxicity.metric_row(metrics)])
        common.write_jsonl(os.path.join(output_dir, "generate-toxicity", "generations.jsonl"),
                           toxicity.generation_records(gens, scores))
        row.update(expected_max_toxicity=metrics["expected_max_toxicity"],
                   toxicity_probability=metrics["toxicity_probability"])
        if texts is not None and len([a for a in alphas if a != 0]):
            acts = steer.head_activations(model, tokenizer, texts, batch_size=batch_size)
            iv, _ = steer.fit_intervention(acts, labels, top_k_heads=top_k_heads, seed=seed)
            iv.save(os.path.join(output_dir, "steer", "intervention.safetensors"))
            res = steer.evaluate_steering(model, tokenizer, iv, prompts, score, alphas, sampling,
                                          ppl_texts=[t for t, y in zip(texts, labels) if y == 0],
                                          batch_size=batch_size, bootstrap=bootstrap)
            for e in res["alphas"]:
                e.pop("samples")
            save("steer", res, steer.result_rows(res))
            strongest = res["alphas"][-1]
            row.update(steer_alpha=strongest["alpha"], steer_expected_max_toxicity=strongest["expected_max_toxicity"],
                       steer_toxicity_drop=strongest["toxicity_drop"],
                       steer_perplexity_increase=strongest.get("perplexity_increase"))
    return row
