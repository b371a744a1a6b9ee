"""Hugging Face GPT-2 <-> GPTModel: config and state-dict adapters (pure functions, no files).

A GPT-2-style GPTModel (``--position-embedding-type learned_absolute --normalization LayerNorm``, a GeLU MLP,
linear biases, one key/value head per query head; ``is_gpt2`` checks) computes what ``GPT2LMHeadModel``
computes. GeLU: ``--openai-gelu`` (tanh approximation) is GPT-2's ``gelu_new``, the exact GeLU (Megatron's
default) is ``gelu``. GPT-2's matrices are ``Conv1D`` (stored [in, out], ours [out, in]: transposed), and its
``c_attn`` holds [q | k | v] along the output, which is our ``linear_qkv`` with MHA:

    transformer.wte / wpe                = embedding.word_embeddings / position_embeddings
    transformer.h.{i}.ln_1, ln_2         = input_layernorm, pre_mlp_layernorm (weight and bias)
    transformer.h.{i}.attn.c_attn        = self_attention.linear_qkv^T (and its bias)
    transformer.h.{i}.attn.c_proj        = self_attention.linear_proj^T
    transformer.h.{i}.mlp.c_fc, c_proj   = mlp.linear_fc1^T, mlp.linear_fc2^T
    transformer.ln_f                     = decoder.final_layernorm
    lm_head.weight                       = output_layer (untied) or the embedding (tied)

Like ``hf_llama``: every tensor is used or the call fails naming the leftovers; every ``config.json``
field is used, metadata, or checked to have the value this model computes.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_slung.model.gpt import GPTConfig
from megatron_slung.model.hf_llama import _METADATA_FIELDS, _check_shapes, _names, _refuse, _taker

_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}  # name -> openai_gelu


def gpt2_problems(config: GPTConfig) -> list:
    """What of ``config`` a ``GPT2LMHeadModel`` cannot hold (empty: it can)."""
    c = config
    problems = []
    if c.position_embedding_type != "learned_absolute":
        problems.append(f"--position-embedding-type {c.position_embedding_type} (GPT-2 has learned positions)")
    if c.normalization != "LayerNorm":
        problems.append(f"--normalization {c.normalization} (GPT-2 uses LayerNorm)")
    if c.apply_layernorm_1p:
        problems.append("--apply-layernorm-1p (zero-centred norm weights)")
    if c.qk_layernorm:
        problems.append("--qk-layernorm (GPT-2 has no query/key norms)")
    if c.swiglu:
        problems.append("--swiglu (GPT-2's MLP is GeLU)")
    if not c.add_bias_linear:
        problems.append("--disable-bias-linear (GPT-2 has biases in every linear layer)")
    if c.num_query_groups != c.num_attention_heads:
        problems.append(f"--num-query-groups {c.num_query_groups} (GPT-2 has one key/value head per query head)")
    if c.kv_channels * c.num_attention_heads != c.hidden_size:
        problems.append(f"--kv-channels {c.kv_channels} (GPT-2's head dimension is hidden / heads)")
    return problems


def is_gpt2(config: GPTConfig) -> bool:
    return not gpt2_problems(config)


def _check(config: GPTConfig) -> None:
    problems = gpt2_problems(config)
    if problems:
        raise ValueError("a Hugging Face GPT2LMHeadModel cannot hold this model: " + "; ".join(problems))


def hf_config_dict(config: GPTConfig, **extra) -> dict:
    """A ``config.json`` for ``GPT2LMHeadModel`` (``extra`` adds e.g. bos/eos token ids)."""
    _check(config)
    c = config
    out = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_attention_heads,
        "n_inner": c.ffn_hidden_size,
        "n_positions": c.max_position_embeddings,
        "activation_function": "gelu_new" if c.openai_gelu else "gelu",
        "layer_norm_epsilon": c.norm_epsilon,
        "initializer_range": c.init_method_std,
        "resid_pdrop": c.hidden_dropout,
        "embd_pdrop": c.hidden_dropout,
        "attn_pdrop": c.attention_dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": not c.untie_embeddings_and_output_weights,
        "torch_dtype": str(c.params_dtype).replace("torch.", ""),
    }
    out.update(extra)
    return out


# Fields GPT2LMHeadModel reads to build the model, and those of the double-heads and sequence-classification
# heads (summary_*), which the LM head model never uses.
_SIZE_FIELDS = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "activation_function",
                "layer_norm_epsilon", "initializer_range", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "tie_word_embeddings"}
_UNUSED_HEAD_FIELDS = {"summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                       "summary_first_dropout"}


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """A ``GPTConfig`` from a GPT-2 ``config.json`` dict; ValueError naming a field it cannot honour."""
    if hf.get("model_type", "gpt2") != "gpt2":
        _refuse("model_type", hf.get("model_type"), "not a GPT-2 config")
    for arch in hf.get("architectures") or []:
        if arch != "GPT2LMHeadModel":
            _refuse("architectures", hf["architectures"], f"{arch} is not GPT-2's causal LM")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        _refuse("activation_function", act, f"only {', '.join(_ACTIVATIONS)} (GeLU, exact or tanh) are supported")
    if hf.get("scale_attn_weights", True) is not True:
        _refuse("scale_attn_weights", hf["scale_attn_weights"], "unscaled attention is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        _refuse("scale_attn_by_inverse_layer_idx", True, "attention scaled by the layer index is not supported")
    if hf.get("add_cross_attention", False):
        _refuse("add_cross_attention", True, "cross-attention is not supported")
    if hf.get("n_ctx") is not None and hf.get("n_positions") is not None and hf["n_ctx"] != hf["n_positions"]:
        _refuse("n_ctx", hf["n_ctx"], f"differs from n_positions = {hf['n_positions']}")
    if float(hf.get("embd_pdrop", 0.1)) != float(hf.get("resid_pdrop", 0.1)):  # one --hidden-dropout holds both
        _refuse("embd_pdrop", hf["embd_pdrop"] if "embd_pdrop" in hf else 0.1,
                f"differs from resid_pdrop = {hf.get('resid_pdrop', 0.1)} (one --hidden-dropout covers both)")
    # reorder_and_upcast_attn computes the same attention (in float32): numerics only.
    checked = {"scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention", "reorder_and_upcast_attn"}
    try:
        import transformers

        generic = set(transformers.PretrainedConfig().to_dict())
    except ImportError:
        generic = set()
    for field, value in hf.items():
        if field not in _SIZE_FIELDS | _UNUSED_HEAD_FIELDS | _METADATA_FIELDS | checked | generic:
            _refuse(field, value, "not understood by the GPT-2 import, so it cannot be honoured")
    hidden = hf.get("n_embd", 768)
    values = dict(
        num_layers=hf.get("n_layer", 12), hidden_size=hidden, num_attention_heads=hf.get("n_head", 12),
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden, vocab_size=hf.get("vocab_size", 50257),
        max_position_embeddings=hf.get("n_positions") or hf.get("n_ctx") or 1024,
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), init_method_std=hf.get("initializer_range", 0.02),
        hidden_dropout=float(hf.get("resid_pdrop", 0.1)),  # training settings (embd_pdrop checked equal above)
        attention_dropout=float(hf.get("attn_pdrop", 0.1)),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
        position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
        openai_gelu=_ACTIVATIONS[act], add_bias_linear=True, add_qkv_bias=False,
    )
    values.update(overrides)
    return GPTConfig(**values)


def hf_shapes(config: GPTConfig) -> Dict[str, tuple]:
    """The shape of every ``GPT2LMHeadModel`` tensor for ``config`` (``lm_head.weight`` only when untied)."""
    c, h, f = config, config.hidden_size, config.ffn_hidden_size
    shapes = {"transformer.wte.weight": (c.vocab_size, h), "transformer.wpe.weight": (c.max_position_embeddings, h),
              "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
    for i in range(c.num_layers):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                       p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
                       p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                       p + "mlp.c_fc.weight": (h, f), p + "mlp.c_fc.bias": (f,),
                       p + "mlp.c_proj.weight": (f, h), p + "mlp.c_proj.bias": (h,)})
    if c.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


# (ours inside a layer, GPT-2's inside a block, transposed: a Conv1D weight)
_LAYER_MAP = [
    ("input_layernorm.weight", "ln_1.weight", False), ("input_layernorm.bias", "ln_1.bias", False),
    ("self_attention.linear_qkv.weight", "attn.c_attn.weight", True),
    ("self_attention.linear_qkv.bias", "attn.c_attn.bias", False),
    ("self_attention.linear_proj.weight", "attn.c_proj.weight", True),
    ("self_attention.linear_proj.bias", "attn.c_proj.bias", False),
    ("pre_mlp_layernorm.weight", "ln_2.weight", False), ("pre_mlp_layernorm.bias", "ln_2.bias", False),
    ("mlp.linear_fc1.weight", "mlp.c_fc.weight", True), ("mlp.linear_fc1.bias", "mlp.c_fc.bias", False),
    ("mlp.linear_fc2.weight", "mlp.c_proj.weight", True), ("mlp.linear_fc2.bias", "mlp.c_proj.bias", False),
]
_TOP_MAP = [("embedding.word_embeddings.weight", "transformer.wte.weight"),
            ("embedding.position_embeddings.weight", "transformer.wpe.weight"),
            ("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
            ("decoder.final_layernorm.bias", "transformer.ln_f.bias")]


def to_hf_state_dict(sd: Dict[str, torch.Tensor], config: GPTConfig) -> Dict[str, torch.Tensor]:
    """TP=1 ``GPTModel`` state dict -> ``GPT2LMHeadModel`` state dict (every tensor of ``sd`` is used)."""
    _check(config)
    rest = dict(sd)
    take = _taker(rest, "our state dict")
    out = {theirs: take(ours) for ours, theirs in _TOP_MAP}
    for i in range(config.num_layers):
        for ours, theirs, transpose in _LAYER_MAP:
            t = take(f"decoder.layers.{i}.{ours}")
            out[f"transformer.h.{i}.{theirs}"] = t.t() if transpose else t
    if config.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = take("output_layer.weight")
    if rest:
        raise ValueError(f"{_names(rest)} have no place in a Hugging Face GPT2LMHeadModel; refusing to export "
                         "without them")
    _check_shapes(out, hf_shapes(config), "the exported state dict")
    return {k: v.contiguous() for k, v in out.items()}


def _is_attention_buffer(name: str) -> bool:
    # Older transformers stored the causal mask (attn.bias) and attn.masked_bias as buffers: derived, no weights.
    parts = name.split(".")
    return len(parts) == 5 and parts[:2] == ["transformer", "h"] and parts[3] == "attn" and parts[4] in (
        "bias", "masked_bias")


def from_hf_state_dict(hf: Dict[str, torch.Tensor], config: GPTConfig) -> Dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` state dict -> TP=1 ``GPTModel`` state dict (every source tensor used, or refused
    naming the unused ones; only the attention-mask buffers older versions stored are skipped)."""
    _check(config)
    rest = {k: v for k, v in hf.items() if not _is_attention_buffer(k)}
    rest = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in rest.items()}
    _check_shapes(rest, {k: v for k, v in hf_shapes(config).items() if k in rest}, "Hugging Face state dict")
    take = _taker(rest, "Hugging Face state dict")
    out = {ours: take(theirs) for ours, theirs in _TOP_MAP}
    for i in range(config.num_layers):
        for ours, theirs, transpose in _LAYER_MAP:
            t = take(f"transformer.h.{i}.{theirs}")
            out[f"decoder.layers.{i}.{ours}"] = t.t().contiguous() if transpose else t
    if config.untie_embeddings_and_output_weights:
        if "lm_head.weight" not in rest:
            raise ValueError("untied config (tie_word_embeddings false) but the state dict has no lm_head.weight")
        out["output_layer.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in rest:
        if not torch.equal(rest["lm_head.weight"], out["embedding.word_embeddings.weight"]):
            raise ValueError("config field tie_word_embeddings = True, but lm_head.weight differs from "
                             "transformer.wte.weight: the tied model cannot hold both")
        rest.pop("lm_head.weight")
    if rest:
        raise ValueError(f"tensors the GPT-2 import does not use: {_names(rest)}; converting without them would "
                         "change the model")
    return out
