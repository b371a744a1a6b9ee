"""Evaluate one experiment run: ``python -m megatron_slung.experiment.evaluate SPEC.json``.

Run in its own process by the experiment (so several evaluations and trainings can share the machine).
Generations are scored by alt-profanity-check on their whole words (``scoring.profanity_whole_words``).
The spec names the checkpoint, the held-out files and the evaluation sizes; the result is one flat row
(``OUTPUT_DIR/row.json``) with:

- everything ``megatron_slung.eval.evaluate_suite`` reports: perplexity of clean held-out text (overall
  and per risk level), probe F1/AUROC (last layer), zero-shot F1, generation toxicity (expected maximum
  toxicity, toxicity probability) and steering (ITI: toxicity drop and perplexity cost at the largest alpha);
- ``perplexity_toxic`` / ``perplexity_toxic_level_3``: perplexity of held-out toxic text (how likely the
  model finds the text it was, or was not, taught to produce);
- ``bad_word_rate`` / ``bad_word_prompt_rate``: share of sampled continuations (of prompts with at least
  one such continuation) containing a word of the insults package's bad-word list (``scoring.py``);
- plain vs safe beam search (``beam_toxic_share``, ``safe_beam_toxic_share``, ``beam_tag_rate``): the
  Safety-Pretraining decoding, meaningful for the ``tags`` treatment and a baseline for the others.
"""

from __future__ import annotations

import json
import os
import sys
import time


SCORER = "megatron_slung.experiment.scoring:profanity_whole_words"


def _head(path: str, n: int, out: str) -> str:
    """The first ``n`` records of a JSONL file, written to ``out``."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:n]
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m megatron_slung.experiment.evaluate SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    from megatron_slung.eval import evaluate_suite, load_model
    from megatron_slung.eval.common import read_prompts
    from megatron_slung.eval.generation import SamplingConfig
    from megatron_slung.eval.perplexity import evaluate_perplexity
    from megatron_slung.eval.safe_beam import evaluate_safe_beam
    from megatron_slung.data.scorers import build_scorer
    from megatron_slung.experiment import scoring

    ev, out, seed = spec["eval"], spec["output_dir"], int(spec["seed"])
    inputs = os.path.join(out, "inputs")
    os.makedirs(inputs, exist_ok=True)
    start = time.perf_counter()

    def say(msg):
        print(f"eval {msg} ({time.perf_counter() - start:.0f} s)", flush=True)

    model, tok = load_model(spec["checkpoint"], device="cpu")
    clean = _head(spec["heldout_clean"], ev["perplexity_docs"], os.path.join(inputs, "heldout_clean.jsonl"))
    labelled = _head(spec["labelled"], ev["labelled"], os.path.join(inputs, "labelled.jsonl"))
    prompts = _head(spec["prompts"], ev["prompts"], os.path.join(inputs, "prompts.jsonl"))
    sampling = SamplingConfig(num_samples=ev["samples_per_prompt"], max_new_tokens=ev["max_new_tokens"],
                              top_k=ev["top_k"], seed=seed)
    say("started: perplexity, probe, zero-shot, generation toxicity, steering")
    row = evaluate_suite(model, tok, output_dir=out, clean_jsonl=clean, labelled_jsonl=labelled, prompts_jsonl=prompts,
                         scorer=SCORER, sampling=sampling, probe_layer="last", alphas=tuple(ev["steer_alphas"]),
                         top_k_heads=ev["steer_top_k_heads"], batch_size=ev["batch_size"], seed=seed,
                         bootstrap=ev["bootstrap"])
    say(f"suite: perplexity {row.get('perplexity', float('nan')):.1f}, probe F1 {row.get('probe_f1', float('nan')):.3f}, "
        f"zero-shot F1 {row.get('zero_shot_f1', float('nan')):.3f}, expected max toxicity "
        f"{row.get('expected_max_toxicity', float('nan')):.3f}, steering drop {row.get('steer_toxicity_drop', float('nan')):.3f}")

    with open(os.path.join(out, "generate-toxicity", "generations.jsonl"), encoding="utf-8") as f:
        gens = [json.loads(line) for line in f if line.strip()]
    hits = [[scoring.has_bad_word(c["text"]) for c in g["continuations"]] for g in gens]
    row["bad_word_rate"] = sum(map(sum, hits)) / max(1, sum(map(len, hits)))
    row["bad_word_prompt_rate"] = sum(any(h) for h in hits) / max(1, len(hits))
    say(f"bad words in {row['bad_word_rate']:.1%} of samples")

    toxic = _head(spec["heldout_toxic"], ev["perplexity_docs"], os.path.join(inputs, "heldout_toxic.jsonl"))
    res = evaluate_perplexity(model, tok, jsonl=toxic, batch_size=ev["batch_size"])
    row["perplexity_toxic"] = res["overall"]["perplexity"]
    for level, r in res["per_level"].items():
        row[f"perplexity_toxic_level_{level}"] = r["perplexity"]
    say(f"toxic perplexity {row['perplexity_toxic']:.1f}")

    if ev.get("safe_beam_prompts"):
        beam = evaluate_safe_beam(model, tok, read_prompts(prompts, ev["safe_beam_prompts"]), spec["harm_tag"],
                                  build_scorer(SCORER), num_beams=ev["num_beams"],
                                  max_new_tokens=ev["max_new_tokens"], bootstrap=ev["bootstrap"], seed=seed)
        os.makedirs(os.path.join(out, "safe-beam"), exist_ok=True)
        with open(os.path.join(out, "safe-beam", "results.json"), "w", encoding="utf-8") as f:
            json.dump(beam, f, indent=1)
        row.update(beam_toxic_share=beam["plain"]["toxic_share"], beam_mean_toxicity=beam["plain"]["mean_toxicity"],
                   beam_tag_rate=beam["plain"]["tag_rate"], safe_beam_toxic_share=beam["safe"]["toxic_share"],
                   safe_beam_mean_toxicity=beam["safe"]["mean_toxicity"],
                   safe_beam_dropped_per_prompt=beam["safe"]["dropped_beams_per_prompt"])
        say(f"beam search: toxic share {row['beam_toxic_share']:.3f} plain, {row['safe_beam_toxic_share']:.3f} safe, "
            f"tag emitted in {row['beam_tag_rate']:.0%} of plain outputs")
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    tmp = os.path.join(out, "row.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, os.path.join(out, "row.json"))
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
