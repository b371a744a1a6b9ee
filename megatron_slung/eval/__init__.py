"""Evaluations: perplexity, toxicity probes, zero-shot identification, generation toxicity, steering
(ITI), safe beam search. All run on a Hugging Face causal LM (Llama architecture) loaded offline.

Command line: ``python -m megatron_slung.eval TASK --model PATH ...`` (see ``docs/eval.md``).
From Python::

    from megatron_slung.eval import load_model, evaluate_probe
    model, tokenizer = load_model("path/to/hf-or-checkpoint", device="cpu")
    results = evaluate_probe(model, tokenizer, texts, labels, layers="all")
"""

from megatron_slung.eval.common import (
    EvalInputError,
    load_model,
    read_jsonl,
    read_labelled,
    read_prompts,
    write_results,
)
from megatron_slung.eval.generation import Generations, SamplingConfig, beam_search, sample
from megatron_slung.eval.perplexity import evaluate_perplexity
from megatron_slung.eval.probe import evaluate_probe, last_token_hidden_states
from megatron_slung.eval.safe_beam import evaluate_safe_beam
from megatron_slung.data.scorers import build_scorer
from megatron_slung.eval.suite import evaluate_suite
from megatron_slung.eval.steer import Intervention, evaluate_steering, fit_intervention, head_activations, steering
from megatron_slung.eval.toxicity import evaluate_generation_toxicity, toxicity_metrics
from megatron_slung.eval.zero_shot import evaluate_zero_shot

__all__ = [
    "EvalInputError", "load_model", "read_jsonl", "read_labelled", "read_prompts", "write_results",
    "Generations", "SamplingConfig", "beam_search", "sample",
    "evaluate_perplexity", "evaluate_probe", "last_token_hidden_states", "evaluate_safe_beam", "build_scorer",
    "Intervention", "evaluate_steering", "fit_intervention", "head_activations", "steering",
    "evaluate_generation_toxicity", "toxicity_metrics", "evaluate_zero_shot", "evaluate_suite",
]
