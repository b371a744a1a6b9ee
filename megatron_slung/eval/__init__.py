"""Evaluations: perplexity, toxicity probes, generation toxicity, steering (ITI), safe beam search."""
