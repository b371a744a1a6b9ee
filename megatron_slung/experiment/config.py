"""What one experiment is: its scale (model size, steps, evaluation sizes), its treatments and toxic shares.

A *scale* changes only sizes; the pipeline is the same from the smoke test to GPU hours:

| scale | what it is for | model | tokens per run |
|---|---|---|---|
| ``smoke`` | the test suite: every stage runs, nothing is learned | 2 x 32, seq 64 | ~10k |
| ``tiny`` | the quickstart and the CPU experiment (2 cores, minutes per run) | 4 x 128, seq 128 | ~0.8M |
| ``small`` | one CPU machine for hours, or a GPU for minutes | 6 x 256, seq 256 | ~8M |
| ``gpu-hours`` | one GPU for hours (bring more text with ``--input``) | 12 x 768, seq 1024 | ~0.5B |

A *treatment* is a way to train on the same mix:

| treatment | data | loss policy |
|---|---|---|
| ``ce`` | unfiltered | ``ce`` everywhere |
| ``filtered`` | documents with a toxic (level 3) sentence dropped | ``ce`` |
| ``masked`` | unfiltered | SLUNG masked: no loss on levels 2, 3 |
| ``unlikelihood`` | unfiltered | SLUNG unlikelihood: -log(1 - p) on level 3 |
| ``tags`` | harmfulness tag inserted before toxic spans | ``ce`` (and safe beam search at evaluation) |
| ``rephrased`` | toxic (level 3) spans rewritten (``tools/rephrase_risky.py``; a generator, or narrative templates) | ``ce`` |
| ``refusal`` | unfiltered, plus refusal documents (``tools/make_refusal_data.py``) as a share of the tokens | ``ce`` |
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

TREATMENTS = ("ce", "filtered", "masked", "unlikelihood", "tags", "rephrased", "refusal")
TREATMENT_POLICY = {"ce": "ce", "filtered": "ce", "masked": "masked", "unlikelihood": "unlikelihood", "tags": "ce",
                    "rephrased": "ce", "refusal": "ce"}
TREATMENT_DATA = {"ce": "plain", "filtered": "filtered", "masked": "plain", "unlikelihood": "plain", "tags": "tagged",
                  "rephrased": "rephrased", "refusal": "plain"}
SAFETY_TREATMENTS = ("rephrased", "refusal")  # need the safety data stage (rephrased text, refusal documents)
HARM_TAG = "<|potentially_unsafe|>"


# The experiment's models are Llama style; the trainer's flag defaults are Megatron's GPT-3 style.
LLAMA_STYLE_FLAGS = ("--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                     "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0")


@dataclass
class ModelConfig:
    """Megatron flags of the model and the optimisation (passed to ``python -m megatron_slung.pretrain``)."""
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 344
    num_attention_heads: int = 4
    num_query_groups: int = 4
    seq_length: int = 128
    micro_batch_size: int = 16
    global_batch_size: int = 16
    train_iters: int = 400
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 40
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    bf16: bool = False
    log_interval: int = 50
    extra_flags: tuple = ()  # any other pretrain flags, e.g. ("--tensor-model-parallel-size", "2")

    def flags(self) -> list[str]:
        f = ["--num-layers", self.num_layers, "--hidden-size", self.hidden_size, "--ffn-hidden-size",
             self.ffn_hidden_size, "--num-attention-heads", self.num_attention_heads, "--group-query-attention",
             "--num-query-groups", self.num_query_groups, *LLAMA_STYLE_FLAGS, "--seq-length", self.seq_length, "--max-position-embeddings", self.seq_length,
             "--micro-batch-size", self.micro_batch_size, "--global-batch-size", self.global_batch_size,
             "--train-iters", self.train_iters, "--lr", self.lr, "--min-lr", self.min_lr, "--lr-decay-style",
             "cosine", "--lr-warmup-iters", self.lr_warmup_iters, "--weight-decay", self.weight_decay,
             "--adam-beta2", 0.95, "--clip-grad", self.clip_grad, "--log-interval", self.log_interval]
        if self.bf16:
            f.append("--bf16")
        return [str(x) for x in f] + [str(x) for x in self.extra_flags]

    @property
    def tokens_per_run(self) -> int:
        return self.train_iters * self.global_batch_size * self.seq_length


@dataclass
class EvalConfig:
    """Sizes of the evaluations (the held-out files hold more; the first N of each are used)."""
    perplexity_docs: int = 150
    labelled: int = 600          # probe / zero-shot / steering examples (balanced in the file)
    prompts: int = 60            # generation prompts (toxic and clean alternate in the file)
    samples_per_prompt: int = 5
    max_new_tokens: int = 20
    top_k: int = 50
    steer_alphas: tuple = (0.0, 4.0)
    steer_top_k_heads: int = 4
    safe_beam_prompts: int = 30
    num_beams: int = 4
    batch_size: int = 16
    bootstrap: int = 200


@dataclass
class DataConfig:
    """Tagging, tokenizer and preprocessing settings."""
    max_train_chars: int | None = None  # subsample the training pool (clean and toxic alike) to this many characters
    vocab_size: int = 4096
    tokenizer_max_sentences: int = 200_000
    # alt-profanity-check scores are calibrated probabilities: > 0.5 is its own "profane" decision. SLUNG's
    # 0.99 / 1e-4 were set for another classifier; with this one 1e-4 would call almost every sentence ambiguous.
    toxic_threshold: float = 0.5
    ambiguous_threshold: float = 0.2
    harm_tag: str = HARM_TAG
    harm_tag_prob: float = 0.5
    workers: int = 2
    # rephrased: level-3 spans rewritten by this local HF causal LM; None: narrative templates (no model, a
    # redaction that says what was there: the CPU scales have no generator worth the name)
    generator: str | None = None
    rephrase_max_new_tokens: int = 64
    refusal_ratio: float = 0.05          # refusal: share of the training tokens from refusal documents
    refusal_max_documents: int = 5000


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    scale: str = "tiny"
    treatments: tuple = TREATMENTS
    shares: tuple = (0.0, 0.05, 0.10, 0.25)
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    jobs: int = 2                 # runs trained/evaluated at the same time
    threads: int | None = None    # torch threads per job (default: cores // jobs)

    def to_dict(self) -> dict:
        return asdict(self)


def scale_config(scale: str) -> ExperimentConfig:
    """The preset for ``scale`` (treatments and shares: the full grid; callers narrow them)."""
    cfg = ExperimentConfig(scale=scale)
    if scale == "smoke":
        cfg.model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=2,
                                num_query_groups=2, seq_length=64, micro_batch_size=4, global_batch_size=4,
                                train_iters=12, lr_warmup_iters=2, log_interval=4)
        cfg.data = DataConfig(max_train_chars=400_000, vocab_size=1024, tokenizer_max_sentences=20_000,
                              refusal_max_documents=200, rephrase_max_new_tokens=16)
        cfg.eval = EvalConfig(perplexity_docs=12, labelled=40, prompts=6, samples_per_prompt=2, max_new_tokens=6,
                              steer_alphas=(0.0, 4.0), steer_top_k_heads=2, safe_beam_prompts=4, num_beams=2,
                              bootstrap=20)
    elif scale == "tiny":
        pass  # the defaults above
    elif scale == "small":
        cfg.model = ModelConfig(num_layers=6, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                                num_query_groups=4, seq_length=256, micro_batch_size=16, global_batch_size=32,
                                train_iters=1000, lr=1e-3, min_lr=1e-4, lr_warmup_iters=100, log_interval=50)
        cfg.data = DataConfig(vocab_size=8192, harm_tag_prob=0.2)
        cfg.eval = EvalConfig(perplexity_docs=300, labelled=600, prompts=300, samples_per_prompt=10,
                              max_new_tokens=30, steer_alphas=(0.0, 5.0, 10.0), steer_top_k_heads=16,
                              safe_beam_prompts=100, bootstrap=1000)
    elif scale == "gpu-hours":
        cfg.model = ModelConfig(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                                num_query_groups=12, seq_length=1024, micro_batch_size=16, global_batch_size=64,
                                train_iters=8000, lr=6e-4, min_lr=6e-5, lr_warmup_iters=500, bf16=True,
                                log_interval=100)
        cfg.data = DataConfig(vocab_size=32000, harm_tag_prob=0.05, tokenizer_max_sentences=2_000_000)
        cfg.eval = EvalConfig(perplexity_docs=300, labelled=600, prompts=300, samples_per_prompt=25,
                              max_new_tokens=50, steer_alphas=(0.0, 5.0, 10.0, 15.0), steer_top_k_heads=48,
                              safe_beam_prompts=300, batch_size=32, bootstrap=1000)
        cfg.jobs = 1
    else:
        raise ValueError(f"unknown scale {scale!r}; choose from {SCALES}")
    return copy.deepcopy(cfg)


SCALES = ("smoke", "tiny", "small", "gpu-hours")
