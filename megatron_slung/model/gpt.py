"""The GPT decoder as Megatron builds it; tensor- and sequence-parallel.

The architecture switches are Megatron's (``GPTConfig``): positions ``learned_absolute`` (a table added
to the word embeddings), ``rope`` or ``none``; ``LayerNorm`` or ``RMSNorm`` (optionally zero-centred,
``apply_layernorm_1p``, and on queries/keys, ``qk_layernorm``); an MLP with GeLU (exact, or tanh with
``openai_gelu``) or SwiGLU; linear biases (``add_bias_linear``, ``add_qkv_bias``); tied or untied output.
GPT-3/GPT-2 style is learned positions + LayerNorm + GeLU + biases; Llama style is RoPE + RMSNorm +
SwiGLU without biases, and then the math is exactly Hugging Face's ``LlamaForCausalLM`` (so an export is a
rename plus splitting of fused matrices; ``megatron_slung.model.hf_llama`` does it):

* RMSNorm: ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``, computed in float32
  (LayerNorm: ``layer_norm(x32, weight, bias)``, also in float32);
* RoPE, "rotate-half" convention: ``inv_freq = 1 / base^(arange(0, r, 2) / r)`` over the first
  ``r = int(head_dim * rotary_percent)`` channels, angles ``pos * inv_freq`` concatenated twice,
  ``q' = q cos + rotate_half(q) sin`` with ``rotate_half([a, b]) = [-b, a]``, cos/sin made in float32
  then cast; the other channels pass through;
* attention: causal ``scaled_dot_product_attention`` with scale ``1/sqrt(head_dim)``; query head h
  reads key/value group ``h // (heads / groups)``; optionally within documents and on a chosen kernel
  (``megatron_slung.model.attention``: ``document_ids``, ``attention_backend``);
* MLP: ``down(silu(gate(x)) * up(x))`` or ``fc2(gelu(fc1(x)))``; pre-norm residual blocks; final norm.

Layout inside the model is [sequence, batch, hidden] (Megatron's), so that sequence parallelism
splits one contiguous block per TP rank. ``GPTModel.forward`` takes tokens [batch, seq] and returns
logits [batch, seq, vocab / tp] (this rank's vocabulary shard).

Parameter names (the same at every TP size; shapes are per TP rank, ``tp`` = TP size, ``d`` = head
dim, ``nh`` heads, ``ng`` query groups, ``F`` = ffn_hidden_size; Megatron-core's names):

    embedding.word_embeddings.weight                [V/tp, H]         vocab rows, rank r: [r V/tp, (r+1) V/tp)
    decoder.layers.{i}.input_layernorm.weight       [H]               replicated
    decoder.layers.{i}.self_attention.linear_qkv.weight
                                                    [(nh+2ng) d/tp, H]  rows [q_r; k_r; v_r]: rank r's slice of
                                                                      each of Q [nh d, H], K [ng d, H], V [ng d, H]
    decoder.layers.{i}.self_attention.linear_proj.weight   [H, nh d/tp]  columns split
    decoder.layers.{i}.pre_mlp_layernorm.weight     [H]               replicated
    decoder.layers.{i}.mlp.linear_fc1.weight        [2F/tp, H]        rows [gate_r; up_r]
    decoder.layers.{i}.mlp.linear_fc2.weight        [H, F/tp]         columns split
    decoder.final_layernorm.weight                  [H]               replicated
    output_layer.weight                             [V/tp, H]         only when untied

and, depending on the config: ``embedding.position_embeddings.weight`` [max_positions, H] (replicated;
learned positions), ``*.bias`` of each LayerNorm (replicated), ``linear_qkv.bias`` [(nh+2ng) d/tp] and
``linear_fc1.bias`` [2F/tp or F/tp] (split like their weights' rows), ``linear_proj.bias`` and
``linear_fc2.bias`` [H] (replicated, added after the reduction), ``self_attention.{q,k}_layernorm.weight``
[d] (replicated; gradients summed over TP, each rank normalising other heads). Without SwiGLU
``linear_fc1.weight`` is [F/tp, H].

Note the QKV layout is per-part blocks, NOT Megatron-core's per-group interleaving: Megatron-LM
checkpoints need their QKV rows reordered before loading. Hugging Face Llama names (TP=1 tensors):

    embedding.word_embeddings.weight                  -> model.embed_tokens.weight
    decoder.layers.{i}.input_layernorm.weight         -> model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight  = cat([q_proj, k_proj, v_proj]) of
                                                         model.layers.{i}.self_attn.{q,k,v}_proj.weight
    decoder.layers.{i}.self_attention.linear_proj.weight -> model.layers.{i}.self_attn.o_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight       -> model.layers.{i}.post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight           = cat([gate_proj, up_proj]) of model.layers.{i}.mlp.*
    decoder.layers.{i}.mlp.linear_fc2.weight          -> model.layers.{i}.mlp.down_proj.weight
    decoder.final_layernorm.weight                    -> model.norm.weight
    output_layer.weight (untied) / the embedding (tied) -> lm_head.weight

Initialisation (Megatron's): every matrix ~ N(0, init_method_std), except the two output projections
of each layer (``linear_proj``, ``linear_fc2``) ~ N(0, init_method_std / sqrt(2 num_layers)); the
position table ~ N(0, init_method_std); biases 0; norm weights 1 (0 when zero-centred), norm biases 0.
Each parameter is drawn from its own generator seeded by ``(init_seed, parameter name)``, so the model
is identical for every TP/PP layout and build order.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_slung.model.attention import ATTENTION_BACKENDS, core_attention
from megatron_slung.parallel import state
from megatron_slung.parallel.layers import (
    ColumnParallelLinear,
    mark_replicated,
    RowParallelLinear,
    VocabParallelEmbedding,
    merge_tensor_parallel_shards,
    split_for_tensor_parallel,
    tensor_parallel_input,
)
from megatron_slung.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron_slung.parallel.random import checkpoint, get_rng_tracker

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# --------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class GPTConfig:
    """Architecture of the decoder (Megatron's flag names, without dashes).

    The dataclass defaults of the architecture switches are the Llama-style model this project built
    before they existed (RoPE, RMSNorm, SwiGLU, no biases), so that a checkpoint that does not name a
    field is read as the model it was. The command line's defaults are Megatron's (learned positions,
    LayerNorm, GeLU, biases, dropout 0.1): see ``megatron_slung.training.arguments``."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # already padded (see pad_vocab_size)
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    num_query_groups: Optional[int] = None  # GQA key/value heads; default = num_attention_heads
    kv_channels: Optional[int] = None  # head dimension; default hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    init_seed: int = 1234
    untie_embeddings_and_output_weights: bool = False  # False: the output layer reuses the embedding
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    sequence_parallel: bool = False
    # Activation recomputation, Megatron's fields and meanings (see recompute_plan): "full" recomputes whole
    # layers (chunks of recompute_num_layers with method "uniform"; the first recompute_num_layers layers of
    # each pipeline stage with "block"); "selective" only the core attention (softmax, dropout, context).
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_method: Optional[str] = None  # "uniform" | "block" (full only)
    recompute_num_layers: Optional[int] = None  # full only
    recompute_activations: bool = False  # Megatron's shorthand: = recompute_granularity "selective"
    params_dtype: torch.dtype = torch.float32
    position_embedding_type: str = "rope"  # "learned_absolute" | "rope" | "none"
    rotary_percent: float = 1.0  # RoPE on the first int(head_dim * rotary_percent) channels of each head
    normalization: str = "RMSNorm"  # "LayerNorm" (weight and bias) | "RMSNorm" (weight)
    apply_layernorm_1p: bool = False  # zero-centred gamma: the norms compute (1 + weight), weight starts at 0
    qk_layernorm: bool = False  # a norm (of `normalization`'s kind) over each query and key head, before RoPE
    swiglu: bool = True  # the MLP: silu(gate) * up; False: one matrix and GeLU
    openai_gelu: bool = False  # GeLU's tanh approximation instead of the exact erf (not with swiglu)
    add_bias_linear: bool = False  # biases in linear_qkv, linear_proj, linear_fc1, linear_fc2
    add_qkv_bias: bool = False  # a bias in linear_qkv only (Qwen2)
    attention_backend: str = "auto"  # Megatron's --attention-backend (megatron_slung.model.attention)

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if isinstance(self.params_dtype, str):
            self.params_dtype = _parse_dtype(self.params_dtype)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size",
                     "num_query_groups", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {value!r}")
        choices = {"position_embedding_type": POSITION_EMBEDDING_TYPES, "normalization": NORMALIZATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.swiglu and self.openai_gelu:
            raise ValueError("GPTConfig: openai_gelu (a GeLU MLP) and swiglu (a SiLU-gated MLP) exclude each other")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"GPTConfig: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set kv_channels explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.position_embedding_type == "rope":
            if not 0.0 < self.rotary_percent <= 1.0:
                raise ValueError(f"GPTConfig: rotary_percent must be in (0, 1], got {self.rotary_percent}")
            if self.rotary_dim < 2 or self.rotary_dim % 2 != 0:
                raise ValueError(f"GPTConfig: the rotary dimension int(head_dim {self.kv_channels} x rotary_percent "
                                 f"{self.rotary_percent}) = {self.rotary_dim} must be even and >= 2 for RoPE")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"GPTConfig: num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_query_groups ({self.num_query_groups})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPTConfig: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"GPTConfig: attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        self._check_recompute()

    def _check_recompute(self) -> None:
        """Megatron's rules (its TransformerConfig): --recompute-activations is selective; full needs a method
        and a layer count; selective takes neither."""
        if self.recompute_activations:
            if self.recompute_granularity not in (None, "selective"):
                raise ValueError(f"GPTConfig: recompute_activations (= selective) contradicts recompute_granularity "
                                 f"{self.recompute_granularity!r}")
            self.recompute_granularity = "selective"
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"GPTConfig: recompute_granularity must be None, full or selective, got {g!r}")
        if m not in (None,) + RECOMPUTE_METHODS:
            raise ValueError(f"GPTConfig: recompute_method must be uniform or block, got {m!r}")
        if g == "full":
            if m is None or n is None:
                raise ValueError("recompute granularity full needs --recompute-method (uniform or block) and "
                                 "--recompute-num-layers")
            if not isinstance(n, int) or n < 0 or (m == "uniform" and n < 1):
                raise ValueError(f"--recompute-num-layers must be >= {1 if m == 'uniform' else 0} with "
                                 f"--recompute-method {m}, got {n!r}")
        elif m is not None or n is not None:
            what = "--recompute-method" if m is not None else "--recompute-num-layers"
            raise ValueError(f"{what} needs --recompute-granularity full" + (
                " (selective recomputes the core attention of every layer: Megatron takes no method or layer "
                "count with it)" if g == "selective" else ""))

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (Megatron: int(kv_channels * rotary_percent))."""
        return int(self.kv_channels * self.rotary_percent)

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    def validate_parallel(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                          seq_length: Optional[int] = None) -> None:
        """Raise a clear error when this model cannot be split this way."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        checks = [
            (self.num_attention_heads, tp, "num-attention-heads", "tensor-model-parallel-size"),
            (self.num_query_groups, tp, "num-query-groups", "tensor-model-parallel-size"),
            (self.ffn_hidden_size, tp, "ffn-hidden-size", "tensor-model-parallel-size"),
            (self.vocab_size, tp, "padded vocabulary size", "tensor-model-parallel-size"),
            (self.num_layers, pp, "num-layers", "pipeline-model-parallel-size"),
        ]
        if self.sequence_parallel and seq_length is not None:
            checks.append((seq_length, tp, "seq-length (with --sequence-parallel)", "tensor-model-parallel-size"))
        for value, by, what, by_what in checks:
            if value % by != 0:
                raise ValueError(f"{what} ({value}) is not divisible by {by_what} ({by})")
        if seq_length is not None and seq_length > self.max_position_embeddings:
            raise ValueError(
                f"seq-length ({seq_length}) is larger than max-position-embeddings ({self.max_position_embeddings})"
            )

    def layer_parameters(self) -> int:
        """Parameters of one transformer layer (full size, all TP ranks): matrices, biases and norms."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        nh, ng = self.num_attention_heads, self.num_query_groups
        norm = h * (2 if self.normalization == "LayerNorm" else 1)  # weight (and LayerNorm's bias)
        qkv_out = (nh + 2 * ng) * d
        fc1_out = (2 if self.swiglu else 1) * f
        attn = h * qkv_out + nh * d * h + (qkv_out if self.qkv_bias else 0) + (h if self.add_bias_linear else 0)
        mlp = h * fc1_out + f * h + ((fc1_out + h) if self.add_bias_linear else 0)
        qk_norms = 2 * d * (2 if self.normalization == "LayerNorm" else 1) if self.qk_layernorm else 0
        return attn + mlp + 2 * norm + qk_norms

    def embedding_parameters(self) -> int:
        """Word embeddings (and learned positions) of the first stage."""
        positions = self.max_position_embeddings if self.position_embedding_type == "learned_absolute" else 0
        return (self.vocab_size + positions) * self.hidden_size

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the whole model (all TP/PP ranks together; a tied matrix counted once), biases,
        LayerNorm betas and learned positions included; without embeddings: no word/position embeddings
        and no output layer."""
        final_norm = self.hidden_size * (2 if self.normalization == "LayerNorm" else 1)
        total = self.num_layers * self.layer_parameters() + final_norm
        if include_embeddings:
            total += self.embedding_parameters()
            if self.untie_embeddings_and_output_weights:
                total += self.vocab_size * self.hidden_size
        return total

    def to_dict(self) -> dict:
        """JSON-friendly (the dtype as its name)."""
        out = asdict(self)
        out["params_dtype"] = str(self.params_dtype).replace("torch.", "")
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}")
        return cls(**values)


# GPTConfig fields that are settings of a training run, not properties of the model: a checkpoint may be
# resumed or fine-tuned with other values. Every other field defines the model (what it computes, or the
# shapes of its weights): checkpoints record it, and loading one adopts or refuses it
# (megatron_slung.training.checkpointing). A new field is therefore checked unless it is listed here.
RUN_SETTINGS = frozenset({"init_method_std", "init_seed", "hidden_dropout", "attention_dropout",
                          "sequence_parallel", "recompute_activations", "params_dtype",
                          "attention_backend", "recompute_granularity",
                          "recompute_method", "recompute_num_layers"})


def architecture_fields() -> List[str]:
    """The GPTConfig fields that define the model, in declaration order (``vocab_size`` is the padded size)."""
    return [f.name for f in fields(GPTConfig) if f.name not in RUN_SETTINGS]


def _parse_dtype(name: str) -> torch.dtype:
    key = name.replace("torch.", "")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(key, key)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (use one of {', '.join(_DTYPES)})")
    return _DTYPES[key]


def pad_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of ``divisible_by * tp``."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def flops_per_token(config: GPTConfig, seq_length: int, training: bool = True) -> float:
    """Model FLOPs per token (for MFU), Megatron-LM's ``num_floating_point_operations`` accounting.

    Forward = 2 x (parameters used in matmuls) + attention, per token:

        matmul params N = L [H (nh + 2 ng) d  +  nh d H  +  m H F]  +  V H      (QKV, out-proj, MLP, logits;
                                                                      m = 3 with SwiGLU, 2 with GeLU)
        attention       = 2 x 2 L S nh d            (Q K^T and A V over the full S x S, as PaLM counts it:
                                                     the causal mask is not halved away)

    Training = 3 x forward (forward, backward data-grad, backward weight-grad):
    ``6 N + 12 L S nh d``, PaLM's "6N + 12 L H Q T" with N the matmul parameters (the output layer
    included, the embedding lookup not). Recomputation is not counted (model FLOPs, not hardware FLOPs).
    Like Megatron's formula, it counts matmuls only: bias adds, norms and position lookups are O(H) per
    token, not O(H^2) (they are parameters, counted by ``num_parameters``, but not matmul FLOPs).
    """
    c = config
    h, d, L = c.hidden_size, c.head_dim, c.num_layers
    matmul_params = L * (h * (c.num_attention_heads + 2 * c.num_query_groups) * d
                         + c.num_attention_heads * d * h + (3 if c.swiglu else 2) * h * c.ffn_hidden_size) \
        + c.vocab_size * h
    forward = 2 * matmul_params + 4 * L * seq_length * c.num_attention_heads * d
    return float(3 * forward if training else forward)


# --------------------------------------------------------------------------- init
def _param_seed(init_seed: int, name: str) -> int:
    return (int(init_seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def normal_init(std: float, init_seed: int, name: str) -> Callable[[torch.Tensor], None]:
    """Fill a (master) tensor from N(0, std) with a generator of its own, seeded by (init_seed, name)."""

    def init(tensor: torch.Tensor) -> None:
        gen = torch.Generator(device="cpu").manual_seed(_param_seed(init_seed, name))
        with torch.no_grad():
            tensor.normal_(0.0, std, generator=gen)

    return init


def _output_std(config: GPTConfig) -> float:
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


# --------------------------------------------------------------------------- blocks
class Norm(nn.Module):
    """LayerNorm (weight and bias) or Llama's RMSNorm (weight), computed in float32.

    RMSNorm: ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` (Hugging Face's, bit for bit);
    LayerNorm: ``layer_norm(x32, weight, bias, eps).to(x.dtype)``. With ``zero_centered_gamma``
    (``--apply-layernorm-1p``) the stored weight is gamma - 1: it starts at 0 and the norm uses 1 + weight.

    ``grad_summed_over_tp``: each TP rank sees other inputs (its tokens under sequence parallelism, its
    heads for the q/k norms), so the parameters' gradients are partial and summed over the TP group
    (``copy_to`` on the parameters)."""

    def __init__(self, hidden_size: int, eps: float, *, normalization: str = "RMSNorm",
                 zero_centered_gamma: bool = False, sequence_parallel: bool = False,
                 grad_summed_over_tp: Optional[bool] = None, params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        self.eps = eps
        self.normalization = normalization
        self.zero_centered_gamma = zero_centered_gamma
        self.grad_summed_over_tp = sequence_parallel if grad_summed_over_tp is None else grad_summed_over_tp
        init = torch.zeros if zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=params_dtype, device=device))
        mark_replicated(self.weight, self.grad_summed_over_tp)
        self.bias = None
        if normalization == "LayerNorm":
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype, device=device))
            mark_replicated(self.bias, self.grad_summed_over_tp)

    def _param(self, p: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(p) if self.grad_summed_over_tp else p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._param(self.weight)
        if self.zero_centered_gamma:
            weight = weight + 1
        x32 = x.to(torch.float32)
        if self.bias is None:
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return weight * normed.to(x.dtype)
        bias = self._param(self.bias)
        return F.layer_norm(x32, x.shape[-1:], weight.float(), bias.float(), self.eps).to(x.dtype)


def norm_kwargs(config: GPTConfig) -> dict:
    """The ``Norm`` settings the config decides (kind, zero-centred gamma, sequence parallel, dtype)."""
    return dict(normalization=config.normalization, zero_centered_gamma=config.apply_layernorm_1p,
                sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype)


def build_norm(config: GPTConfig, size: Optional[int] = None, grad_summed_over_tp: Optional[bool] = None) -> Norm:
    """The config's norm over ``size`` channels (default hidden_size)."""
    return Norm(size or config.hidden_size, config.norm_epsilon, grad_summed_over_tp=grad_summed_over_tp,
                **norm_kwargs(config))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [*positions.shape, head_dim] in float32 (Hugging Face's default RoPE, bit for bit).
    ``head_dim`` here is the rotary dimension (all of the head unless rotary_percent < 1)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, B, heads, d]; cos/sin broadcastable to its first rotary channels (float32, cast to x's dtype
    like HF). Channels beyond cos's width pass through (partial rotary, Megatron's --rotary-percent)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def rope_for(seq_length: int, batch: int, config: GPTConfig, device, position_ids: Optional[torch.Tensor] = None):
    """cos/sin shaped [S, 1, 1, r] (default positions 0..S-1) or [S, B, 1, r] (position_ids [B, S]),
    r = the rotary dimension; (None, None) when the model has no RoPE."""
    if config.position_embedding_type != "rope":
        return None, None
    if position_ids is None:
        positions = torch.arange(seq_length, device=device)
        cos, sin = rope_cos_sin(positions, config.rotary_dim, config.rotary_base)
        return cos[:, None, None, :], sin[:, None, None, :]
    _check_position_ids(position_ids, batch, seq_length)
    cos, sin = rope_cos_sin(position_ids.t(), config.rotary_dim, config.rotary_base)
    return cos[:, :, None, :], sin[:, :, None, :]


def _check_position_ids(position_ids: torch.Tensor, batch: int, seq_length: int, name: str = "position_ids") -> None:
    if position_ids.shape != (batch, seq_length):
        raise ValueError(f"{name} must be [batch, seq] = [{batch}, {seq_length}], got {tuple(position_ids.shape)}")


class SelfAttention(nn.Module):
    """Causal grouped-query self-attention; heads and query groups split across TP ranks.

    Optional: a bias on the fused QKV (``add_bias_linear`` or ``add_qkv_bias``) and on the output
    projection (``add_bias_linear``); per-head norms of the queries and keys (``qk_layernorm``, Megatron's
    ``q_layernorm``/``k_layernorm``, applied before RoPE). ``doc_ids`` [B, S] (full sequence, also under
    sequence parallelism): attention stays within documents (``megatron_slung.model.attention``), on the
    config's ``attention_backend``."""

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        tp = state.get_tensor_model_parallel_world_size()
        c = config
        self.config = c
        self.heads_per_rank = c.num_attention_heads // tp
        self.groups_per_rank = c.num_query_groups // tp
        d = c.head_dim
        prefix = f"decoder.layers.{layer_number}.self_attention"
        self.linear_qkv = ColumnParallelLinear(
            c.hidden_size, (c.num_attention_heads + 2 * c.num_query_groups) * d,
            init_method=normal_init(c.init_method_std, c.init_seed, f"{prefix}.linear_qkv.weight"),
            sequence_parallel=c.sequence_parallel,
            output_parts=[c.num_attention_heads * d, c.num_query_groups * d, c.num_query_groups * d],
            bias=c.qkv_bias,
            params_dtype=c.params_dtype,
        )
        self.linear_proj = RowParallelLinear(
            c.num_attention_heads * d, c.hidden_size,
            init_method=normal_init(_output_std(c), c.init_seed, f"{prefix}.linear_proj.weight"),
            sequence_parallel=c.sequence_parallel,
            bias=c.add_bias_linear,
            params_dtype=c.params_dtype,
        )
        self.q_layernorm = self.k_layernorm = None
        if c.qk_layernorm:  # shared by the heads, which are split across TP ranks: gradients summed over TP
            self.q_layernorm = build_norm(c, d, grad_summed_over_tp=tp > 1)
            self.k_layernorm = build_norm(c, d, grad_summed_over_tp=tp > 1)

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        d = self.config.head_dim
        qkv = self.linear_qkv(x)  # [S, B, (nh + 2 ng) d / tp]
        s, b = qkv.shape[:2]
        q, k, v = qkv.split([self.heads_per_rank * d, self.groups_per_rank * d, self.groups_per_rank * d], dim=-1)
        q = q.view(s, b, self.heads_per_rank, d)
        k = k.view(s, b, self.groups_per_rank, d)
        v = v.view(s, b, self.groups_per_rank, d)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # SDPA wants [B, heads, S, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            # Megatron's selective recomputation ("core_attn"): keep q, k, v; redo softmax, dropout, context
            ctx = checkpoint(self.core_attention, q, k, v, doc_ids)
        else:
            ctx = self.core_attention(q, k, v, doc_ids)
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_rank * d)
        return self.linear_proj(ctx)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + causal mask, within documents given ``doc_ids``) v, with attention dropout,
        on the configured backend: q [B, nh, S, d], k/v [B, ng, S, d]."""
        p = self.config.attention_dropout if self.training else 0.0
        # heads are split across TP ranks: with dropout each rank needs its own mask
        with get_rng_tracker().fork() if p > 0.0 else contextlib.nullcontext():
            return core_attention(q, k, v, backend=self.config.attention_backend, doc_ids=doc_ids, dropout_p=p)


class MLP(nn.Module):
    """SwiGLU ``fc2(silu(gate) * up)`` with [gate; up] fused in one column-parallel matrix, or (``swiglu``
    off) ``fc2(gelu(fc1(x)))``: exact (erf) GeLU, Megatron's default, or the tanh approximation with
    ``openai_gelu`` (Hugging Face's ``gelu_new``). Biases on both matrices with ``add_bias_linear``."""

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        c = config
        self.config = c
        prefix = f"decoder.layers.{layer_number}.mlp"
        f = c.ffn_hidden_size
        self.linear_fc1 = ColumnParallelLinear(
            c.hidden_size, 2 * f if c.swiglu else f,
            init_method=normal_init(c.init_method_std, c.init_seed, f"{prefix}.linear_fc1.weight"),
            sequence_parallel=c.sequence_parallel,
            output_parts=[f, f] if c.swiglu else None,
            bias=c.add_bias_linear,
            params_dtype=c.params_dtype,
        )
        self.linear_fc2 = RowParallelLinear(
            f, c.hidden_size,
            init_method=normal_init(_output_std(c), c.init_seed, f"{prefix}.linear_fc2.weight"),
            sequence_parallel=c.sequence_parallel,
            bias=c.add_bias_linear,
            params_dtype=c.params_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.config.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.linear_fc2(F.silu(gate) * up)
        return self.linear_fc2(F.gelu(h, approximate="tanh" if self.config.openai_gelu else "none"))


def _hidden_dropout(x: torch.Tensor, p: float, training: bool, sequence_parallel: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    if sequence_parallel:  # each rank holds different tokens: different masks
        with get_rng_tracker().fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)  # replicated activations: same mask on every TP rank


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    ``forward(hidden, cos=None, sin=None, doc_ids=None)``: hidden [S, B, H] ([S/tp, B, H] with sequence
    parallelism); cos/sin from ``rope_for`` (computed here for positions 0..S-1 when omitted; unused
    without RoPE); ``doc_ids`` [B, S]: attention within documents (see SelfAttention). Full recomputation
    of layers is decided by the block that runs them (``run_transformer_layers``); selective recomputation
    lives in ``SelfAttention``.
    """

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        c = config
        self.config = c
        self.layer_number = layer_number
        self.input_layernorm = build_norm(c)
        self.self_attention = SelfAttention(c, layer_number)
        self.pre_mlp_layernorm = build_norm(c)
        self.mlp = MLP(c, layer_number)
        self._compiled_forward = None  # set by compile_body()

    def _forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                 doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.config
        x = x + _hidden_dropout(self.self_attention(self.input_layernorm(x), cos, sin, doc_ids),
                                c.hidden_dropout, self.training, c.sequence_parallel)
        x = x + _hidden_dropout(self.mlp(self.pre_mlp_layernorm(x)), c.hidden_dropout, self.training, c.sequence_parallel)
        return x

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None):
        if cos is None:
            tp = state.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
            cos, sin = rope_for(x.shape[0] * tp, x.shape[1], self.config, x.device)
        body = self._compiled_forward or self._forward
        return body(x, cos, sin, doc_ids)

    def compile_body(self, **compile_kwargs) -> None:
        """``torch.compile`` the layer's computation (inside the recomputation wrapper, which stays eager)."""
        self._compiled_forward = torch.compile(self._forward, **compile_kwargs)


class Embedding(nn.Module):
    """Token embedding, plus learned absolute positions (``position_embedding_type="learned_absolute"``):
    tokens [B, S] -> [S, B, H] (or [S/tp, B, H] with sequence parallelism).

    The position table [max_position_embeddings, H] is replicated over TP. Under sequence parallelism
    each rank adds the rows of its own block of positions, so the table's gradient is partial and summed
    over the TP group; without it every rank computes the same gradient. ``with_positions=False`` builds
    the word embeddings only (the tied output layer of the last pipeline stage)."""

    def __init__(self, config: GPTConfig, with_positions: bool = True):
        super().__init__()
        c = config
        self.config = c
        self.word_embeddings = VocabParallelEmbedding(
            c.vocab_size, c.hidden_size,
            init_method=normal_init(c.init_method_std, c.init_seed, "embedding.word_embeddings.weight"),
            sequence_parallel=c.sequence_parallel,
            params_dtype=c.params_dtype,
        )
        self.position_embeddings = None
        if with_positions and c.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size, dtype=c.params_dtype)
            master = torch.empty(c.max_position_embeddings, c.hidden_size, dtype=torch.float32)
            normal_init(c.init_method_std, c.init_seed, "embedding.position_embeddings.weight")(master)
            with torch.no_grad():
                self.position_embeddings.weight.copy_(master)
            mark_replicated(self.position_embeddings.weight, c.sequence_parallel)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        x = self.word_embeddings(tokens.t())  # [S, B, H]; reduce(-scatter)ed over TP
        if self.position_embeddings is not None:
            b, s = tokens.shape
            if position_ids is None:
                positions = torch.arange(s, device=tokens.device)[:, None]  # [S, 1]
            else:
                _check_position_ids(position_ids, b, s)
                positions = position_ids.t()  # [S, B]
            weight = self.position_embeddings.weight
            if self.config.sequence_parallel:  # this rank's block of the sequence
                tp, rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
                positions = positions.chunk(tp, dim=0)[rank]
                weight = copy_to_tensor_model_parallel_region(weight)
            x = x + F.embedding(positions, weight)
        return _hidden_dropout(x, self.config.hidden_dropout, self.training, self.config.sequence_parallel)


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Hidden [S, B, H] ([S/tp, B, H] with SP) and this rank's vocab rows [V/tp, H] -> logits [B, S, V/tp]."""
    x = lm_head_input(hidden, sequence_parallel)
    return F.linear(x, weight)


def lm_head_input(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The input of the vocab-parallel head, [B, S, H]: full sequence, replicated over TP, and its
    gradient summed over the TP group (each rank's vocabulary shard contributes a part)."""
    return tensor_parallel_input(hidden, sequence_parallel).transpose(0, 1)


def fused_head_input(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The head input [B, S, H] for a fused linear + loss that sums the hidden gradient over the TP group
    itself (``megatron_slung.loss.fused_linear_masked_cross_entropy`` does): full sequence, replicated,
    and no all-reduce of its gradient here (with sequence parallelism each rank keeps its own slice of
    the already complete gradient)."""
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return hidden.transpose(0, 1)


def recompute_plan(config: GPTConfig, num_layers: int) -> List[Tuple[int, int, bool]]:
    """How the ``num_layers`` transformer layers of one pipeline stage run: ``(start, end, recomputed)``
    chunks, Megatron's ``_checkpointed_forward``. Full + uniform: chunks of ``recompute_num_layers`` layers,
    each keeping only its input; full + block: the first ``recompute_num_layers`` layers of the stage each
    recomputed, the rest not; otherwise (none, selective) one chunk that is not recomputed as a whole."""
    if config.recompute_granularity != "full":
        return [(0, num_layers, False)]
    n = config.recompute_num_layers
    if config.recompute_method == "uniform":
        return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
    return [(i, i + 1, i < n) for i in range(num_layers)]


def run_transformer_layers(layers: Sequence[nn.Module], x: torch.Tensor, cos: Optional[torch.Tensor] = None,
                           sin: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run one stage's transformer layers in order, recomputing chunks as ``recompute_plan`` says
    (``doc_ids``: attention within documents, see SelfAttention)."""
    if not layers:
        return x
    config = layers[0].config
    recompute = torch.is_grad_enabled() and layers[0].training

    def run(chunk):
        def forward(h, c, s, d):
            for layer in chunk:
                h = layer(h, c, s, d)
            return h
        return forward

    for start, end, recomputed in recompute_plan(config, len(layers)):
        chunk = run(layers[start:end])
        x = checkpoint(chunk, x, cos, sin, doc_ids) if recomputed and recompute else chunk(x, cos, sin, doc_ids)
    return x


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, layer_numbers=None):
        super().__init__()
        numbers = range(config.num_layers) if layer_numbers is None else layer_numbers
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in numbers)
        self.final_layernorm = build_norm(config)


def output_layer(config: GPTConfig) -> ColumnParallelLinear:
    """The untied output matrix [V/tp, H] (used as a weight holder; the head goes through vocab_parallel_logits)."""
    return ColumnParallelLinear(
        config.hidden_size, config.vocab_size,
        init_method=normal_init(config.init_method_std, config.init_seed, "output_layer.weight"),
        sequence_parallel=config.sequence_parallel,
        params_dtype=config.params_dtype,
    )


# --------------------------------------------------------------------------- the model
class GPTModel(nn.Module):
    """The whole decoder on one pipeline stage (for pipelines see ``megatron_slung.model.pipeline``).

    Build it after ``initialize_model_parallel`` when TP > 1 (it reads the TP size and rank).
    Move it to the GPU with ``.to(device)`` after construction (weights are made on the CPU).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate_parallel(state.get_tensor_model_parallel_world_size())
        self.config = config
        self.embedding = Embedding(config)
        self.decoder = TransformerBlock(config)
        self.output_layer = output_layer(config) if config.untie_embeddings_and_output_weights else None

    def output_weight(self) -> torch.Tensor:
        """This rank's rows of the output matrix [V/tp, H] (the embedding's when tied)."""
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None, *,
                document_ids: Optional[torch.Tensor] = None, return_hidden: bool = False):
        """tokens [B, S] -> logits [B, S, V/tp] (fp32 when the model is fp32; the vocab shard of this TP rank).

        ``position_ids`` [B, S]: the positions of the tokens (default 0..S-1; restarted at each document
        with --reset-position-ids); ``document_ids`` [B, S] (non-decreasing along each sample): a token
        attends only to earlier tokens of its own document (--reset-attention-mask). Both come from
        ``megatron_slung.model.attention.document_inputs``.

        With ``return_hidden=True`` returns ``(hidden [B, S, H], weight [V/tp, H])`` instead, for a fused
        linear + loss that never materialises the logits (``logits = hidden @ weight.T``): hidden is after
        the final norm, full sequence, the same on every TP rank, and (see ``fused_head_input``) the
        consumer must return its *complete* gradient on every TP rank, as
        ``fused_linear_masked_cross_entropy`` does by all-reducing it over the TP group. (At TP = 1 any
        consumer will do.)
        """
        b, s = tokens.shape
        c = self.config
        cos, sin = rope_for(s, b, c, tokens.device, position_ids)
        x = self.embedding(tokens, position_ids)
        if document_ids is not None:
            _check_position_ids(document_ids, b, s, "document_ids")
        x = run_transformer_layers(self.decoder.layers, x, cos, sin, document_ids)
        x = self.decoder.final_layernorm(x)
        if return_hidden:
            return fused_head_input(x, c.sequence_parallel), self.output_weight()
        return vocab_parallel_logits(x, self.output_weight(), c.sequence_parallel)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the full model (all TP ranks), from the config."""
        return self.config.num_parameters(include_embeddings)


def compile_transformer_layers(module: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` the body of every ``TransformerLayer`` inside ``module`` (GPTModel or a pipeline
    stage; activation recomputation stays outside the compiled code); returns how many. Fuses the elementwise work around the matmuls (RoPE, RMSNorm, SwiGLU,
    residuals): measured on one H100, a 1.0B model in bf16 went from 37% to 54% MFU (forward+backward).
    The numerics change at rounding level, so tests that compare bit for bit run without it."""
    layers = [m for m in module.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.compile_body(**compile_kwargs)
    return len(layers)


# --------------------------------------------------------------------------- pipeline checkpoints
def pipeline_layer_prefixes(config: GPTConfig) -> List[Optional[str]]:
    """For each layer index of the pipeline (``megatron_slung.model.pipeline``; DeepSpeed's checkpoint
    files ``layer_XX-model_YY-model_states.pt``), the ``GPTModel`` name prefix of its parameters:
    ``GPTModel name = prefix + name inside the layer file``. None: no parameters of its own (the tied
    head, whose weight is layer 0's)."""
    prefixes: List[Optional[str]] = ["embedding."]
    prefixes += [f"decoder.layers.{i}." for i in range(config.num_layers)]
    prefixes.append("decoder.final_layernorm.")
    prefixes.append("output_layer." if config.untie_embeddings_and_output_weights else None)
    return prefixes


# --------------------------------------------------------------------------- TP state dicts
def tensor_parallel_layout(config: GPTConfig) -> Dict[str, Tuple[Optional[int], Optional[Tuple[int, ...]]]]:
    """For every parameter name of ``GPTModel``: (partition dim or None if replicated, parts or None)."""
    c, d = config, config.head_dim
    layout: Dict[str, Tuple[Optional[int], Optional[Tuple[int, ...]]]] = {"embedding.word_embeddings.weight": (0, None)}
    replicated = (None, None)
    if c.position_embedding_type == "learned_absolute":
        layout["embedding.position_embeddings.weight"] = replicated
    norm_params = ("weight", "bias") if c.normalization == "LayerNorm" else ("weight",)
    qkv_parts = (c.num_attention_heads * d, c.num_query_groups * d, c.num_query_groups * d)
    fc1_parts = (c.ffn_hidden_size, c.ffn_hidden_size) if c.swiglu else None
    for i in range(c.num_layers):
        p = f"decoder.layers.{i}."
        norms = ["input_layernorm", "pre_mlp_layernorm"]
        if c.qk_layernorm:
            norms += ["self_attention.q_layernorm", "self_attention.k_layernorm"]
        for norm in norms:
            for param in norm_params:
                layout[f"{p}{norm}.{param}"] = replicated
        layout[p + "self_attention.linear_qkv.weight"] = (0, qkv_parts)
        layout[p + "self_attention.linear_proj.weight"] = (1, None)
        layout[p + "mlp.linear_fc1.weight"] = (0, fc1_parts)
        layout[p + "mlp.linear_fc2.weight"] = (1, None)
        if c.qkv_bias:
            layout[p + "self_attention.linear_qkv.bias"] = (0, qkv_parts)  # split like the weight's rows
        if c.add_bias_linear:
            layout[p + "self_attention.linear_proj.bias"] = replicated  # added once, after the reduce
            layout[p + "mlp.linear_fc1.bias"] = (0, fc1_parts)
            layout[p + "mlp.linear_fc2.bias"] = replicated
    for param in norm_params:
        layout["decoder.final_layernorm." + param] = replicated
    if c.untie_embeddings_and_output_weights:
        layout["output_layer.weight"] = (0, None)
    return layout


def merge_tensor_parallel_state_dicts(state_dicts, config: GPTConfig) -> Dict[str, torch.Tensor]:
    """The TP=1 state dict from the TP ranks' ``GPTModel`` state dicts (in TP-rank order)."""
    layout = tensor_parallel_layout(config)
    names = set(state_dicts[0])
    if names != set(layout):
        raise ValueError(f"state dict names do not match the config: missing {sorted(set(layout) - names)}, "
                         f"unexpected {sorted(names - set(layout))}")
    merged = {}
    for name, (dim, parts) in layout.items():
        shards = [sd[name] for sd in state_dicts]
        merged[name] = shards[0].clone() if dim is None else merge_tensor_parallel_shards(shards, dim, parts)
    return merged


def split_state_dict_for_tensor_parallel(full: Dict[str, torch.Tensor], config: GPTConfig, tp_size: int,
                                         tp_rank: int) -> Dict[str, torch.Tensor]:
    """Rank ``tp_rank``'s ``GPTModel`` state dict from a TP=1 state dict."""
    config.validate_parallel(tp_size)
    layout = tensor_parallel_layout(config)
    missing = set(layout) - set(full)
    if missing:
        raise ValueError(f"state dict lacks {sorted(missing)}")
    unexpected = set(full) - set(layout)
    if unexpected:  # the split would leave them out silently
        raise ValueError(f"tensors the model has no place for: {sorted(unexpected)[:6]}")
    return {
        name: full[name].clone() if dim is None else split_for_tensor_parallel(full[name], tp_size, tp_rank, dim, parts).clone()
        for name, (dim, parts) in layout.items()
    }
