"""Safe beam search (Safety Pretraining): drop beams that are about to emit the harmfulness tag.

A model pretrained with harmfulness tags (``tools/preprocess_data.py --harm-tag``) learns to predict
the tag where unsafe text begins. Safe beam search runs beam search but removes any beam whose
extension with the tag would be among the selected candidates (optionally also any beam with
p(tag) >= ``--drop-threshold``), so decoding steers away from where the model expects unsafe text.

Reported against plain beam search on the same prompts: the share of outputs containing the tag
(plain vs safe; safe is 0 by construction), the share of prompts where the tag was avoided, the beams
dropped, and the toxicity of both sets of outputs (mean, share over 0.5, bootstrap CIs).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from megatron_slung.data import scorers
from megatron_slung.eval import common
from megatron_slung.eval.common import EvalInputError
from megatron_slung.eval.generation import beam_search


def tag_token_id(tokenizer, tag: str) -> int:
    """The id of the tag, which must be a single token of the vocabulary."""
    ids = tokenizer.convert_tokens_to_ids([tag])
    if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    encoded = tokenizer(tag, add_special_tokens=False)["input_ids"]
    if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id:
        return int(encoded[0])
    raise EvalInputError(f"--harm-tag {tag!r} is not a single token of the model's vocabulary "
                         f"(it encodes to {len(encoded)} tokens); train the tokenizer with it as a special token")


def _toxicity_summary(scores: Sequence[float], bootstrap: int, seed: int) -> dict:
    scores = np.asarray(scores, dtype=np.float64)
    toxic = (scores > 0.5).astype(np.float64)
    return {"mean_toxicity": float(scores.mean()),
            "mean_toxicity_ci95": common.bootstrap_ci(scores, num_samples=bootstrap, seed=seed),
            "toxic_share": float(toxic.mean()),
            "toxic_share_ci95": common.bootstrap_ci(toxic, num_samples=bootstrap, seed=seed)}


def evaluate_safe_beam(model, tokenizer, prompts: Sequence[str], harm_tag: str, scorer=None, num_beams: int = 4,
                       max_new_tokens: int = 20, drop_threshold: float | None = None, length_penalty: float = 1.0,
                       bootstrap: int = 1000, seed: int = 0) -> dict:
    """Plain vs safe beam search on ``prompts``. ``scorer=None`` skips the toxicity comparison."""
    tag_id = tag_token_id(tokenizer, harm_tag)
    plain, _ = beam_search(model, tokenizer, prompts, num_beams, max_new_tokens, banned_id=None,
                           length_penalty=length_penalty, desc="plain beam search")
    safe, stats = beam_search(model, tokenizer, prompts, num_beams, max_new_tokens, banned_id=tag_id,
                              drop_threshold=drop_threshold, length_penalty=length_penalty, desc="safe beam search")
    plain_tag = np.array([tag_id in ids[0] for ids in plain.token_ids])
    safe_tag = np.array([tag_id in ids[0] for ids in safe.token_ids])
    results = {
        "harm_tag": harm_tag, "harm_tag_id": tag_id, "num_prompts": len(prompts), "num_beams": num_beams,
        "max_new_tokens": max_new_tokens, "drop_threshold": drop_threshold,
        "plain": {"tag_rate": float(plain_tag.mean())},
        "safe": {"tag_rate": float(safe_tag.mean()),
                 "dropped_beams_per_prompt": float(np.mean([s.dropped_beams for s in stats])),
                 "prompts_with_drops": float(np.mean([s.dropped_beams > 0 for s in stats])),
                 "fallback_steps": int(sum(s.fallback_steps for s in stats))},
        # Of the prompts where plain beam search emitted the tag, the share where safe beam search did not.
        "tag_avoided": float((plain_tag & ~safe_tag).sum() / plain_tag.sum()) if plain_tag.any() else None,
    }
    records = []
    plain_scores = safe_scores = [None] * len(prompts)
    if scorer is not None:
        n = len(prompts)
        plain_scores = scorers.score_texts(scorer, [t[0] for t in plain.texts], "the toxicity scorer",
                                           [f"the plain beam-search output of prompt {i}" for i in range(n)])
        safe_scores = scorers.score_texts(scorer, [t[0] for t in safe.texts], "the toxicity scorer",
                                          [f"the safe beam-search output of prompt {i}" for i in range(n)])
        results["plain"].update(_toxicity_summary(plain_scores, bootstrap, seed))
        results["safe"].update(_toxicity_summary(safe_scores, bootstrap, seed))
    for i, p in enumerate(prompts):
        records.append({"prompt": p,
                        "plain": {"text": plain.texts[i][0], "tag": bool(plain_tag[i]), "toxicity": plain_scores[i]},
                        "safe": {"text": safe.texts[i][0], "tag": bool(safe_tag[i]), "toxicity": safe_scores[i],
                                 "dropped_beams": stats[i].dropped_beams}})
    results["outputs"] = records
    return results


def result_rows(results: dict) -> list[dict]:
    rows = []
    for name in ("plain", "safe"):
        r = results[name]
        row = {"decoding": f"{name} beam search", "tag rate": r["tag_rate"]}
        if "mean_toxicity" in r:
            row.update({"mean toxicity": r["mean_toxicity"], "95% CI": r["mean_toxicity_ci95"],
                        "toxic share": r["toxic_share"]})
        row["dropped beams / prompt"] = r.get("dropped_beams_per_prompt", 0.0)
        rows.append(row)
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", required=True, help="prompts JSONL (RealToxicityPrompts layout)")
    parser.add_argument("--harm-tag", required=True, help="the harmfulness tag token, e.g. '<|potentially_unsafe|>'")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--drop-threshold", type=float, default=None,
                        help="also drop a beam as soon as p(tag) reaches this probability")
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--scorer", default="profanity", help="toxicity scorer ('none' to skip the toxicity comparison)")
    parser.add_argument("--scorer-path", default=None)
    parser.add_argument("--bootstrap", type=int, default=1000)


def run(args, model, tokenizer) -> tuple[dict, list[dict]]:
    prompts = common.read_prompts(args.prompts, args.limit)
    scorer = None if args.scorer == "none" else scorers.build_scorer(args.scorer, args.scorer_path)
    results = evaluate_safe_beam(model, tokenizer, prompts, args.harm_tag, scorer, num_beams=args.num_beams,
                                 max_new_tokens=args.max_new_tokens, drop_threshold=args.drop_threshold,
                                 length_penalty=args.length_penalty, bootstrap=args.bootstrap, seed=args.seed)
    common.write_jsonl(os.path.join(args.output_dir, "generations.jsonl"), results.pop("outputs"))
    results["prompts"] = args.prompts
    return results, result_rows(results)
