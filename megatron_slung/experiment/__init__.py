"""The quickstart and the experiment: corpus -> risk tags -> tokenizer -> preprocess -> pretrain -> evaluate.

``config.py`` (scales, treatments), ``stages.py`` (the cached stages, shared by both entry points),
``evaluate.py`` (one run's evaluation, in its own process), ``report.py`` (table, JSON, plot),
``runner.py`` (the command line of ``examples/quickstart.py`` and ``examples/experiment.py``),
``corpora.py`` (the built-in corpus, ``python -m megatron_slung.experiment.corpora``) and ``synthetic.py``
(seeded synthetic JSONL for benchmarks, tests and the README's demo).
"""
