"""megatron-slung: risk-aware large-scale GPT pretraining (selective loss on tagged data)."""

__version__ = "0.1.0"
