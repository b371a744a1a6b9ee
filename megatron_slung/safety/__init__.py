"""Safety Pretraining's data steps, beside the risk tagger (``megatron_slung/data/tagging.py``).

``classifier.py`` (a 0-5 safety classifier trained from labelled JSONL: hashed n-grams + a linear model,
fastText, or a fine-tuned HF encoder; ``tools/train_risk_classifier.py``), ``generator.py`` (a local
text generator: an HF causal LM, or vLLM), ``rephrase.py`` (risky documents or spans rewritten;
``tools/rephrase_risky.py``), ``refusal.py`` (refusal-style documents; ``tools/make_refusal_data.py``),
``records.py`` (reading JSONL inputs with file:line provenance), ``templates/`` (the default prompts).
"""
