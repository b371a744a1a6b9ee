"""Indexed datasets with a per-token risk channel, tokenizers, the GPT dataset and blending."""
