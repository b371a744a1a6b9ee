"""Hugging Face Llama / Qwen2 <-> GPTModel: config and state-dict adapters (pure functions, no files).

A Llama-style GPTModel (RoPE over the whole head, RMSNorm, SwiGLU; ``llama_model_type`` checks) computes
what these classes compute (see the docstring of ``megatron_slung.model.gpt``):

    no biases                                   LlamaForCausalLM (attention_bias, mlp_bias false)
    --add-qkv-bias (q/k/v biases only)          Qwen2ForCausalLM
    linear biases (--disable-bias-linear absent) LlamaForCausalLM with attention_bias and mlp_bias true
                                                (q/k/v/o and gate/up/down biases)

so a conversion only renames tensors and splits/concatenates the fused ones (biases likewise):

    linear_qkv = cat([q_proj, k_proj, v_proj])      linear_fc1 = cat([gate_proj, up_proj])

Both functions work on the TP=1 state dict; for a TP>1 checkpoint merge the shards first
(``gpt.merge_tensor_parallel_state_dicts``) and split after importing
(``gpt.split_state_dict_for_tensor_parallel``). A tied model has no ``lm_head.weight`` in its
export (``tie_word_embeddings: true``); Hugging Face ties it on load.

Nothing is converted silently into a different model: both directions use every tensor they are given
or raise naming the leftovers, shapes are checked against the config, and `config_from_hf` accepts a
``config.json`` field only when it is used, is metadata, or has the one value this model computes.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_slung.model.gpt import GPTConfig


def llama_model_type(config: GPTConfig) -> str:
    """"llama" or "qwen2": the Hugging Face class that holds this model; ValueError naming what none holds."""
    c = config
    problems = []
    if c.position_embedding_type != "rope":
        problems.append(f"--position-embedding-type {c.position_embedding_type} (Llama/Qwen2 use RoPE)")
    elif c.rotary_percent != 1.0:
        problems.append(f"--rotary-percent {c.rotary_percent} (Llama/Qwen2 rotate the whole head)")
    if c.normalization != "RMSNorm":
        problems.append(f"--normalization {c.normalization} (Llama/Qwen2 use RMSNorm)")
    if c.apply_layernorm_1p:
        problems.append("--apply-layernorm-1p (zero-centred norm weights)")
    if c.qk_layernorm:
        problems.append("--qk-layernorm (Llama/Qwen2 have no query/key norms)")
    if not c.swiglu:
        problems.append("a GeLU MLP (Llama/Qwen2 use SwiGLU: --swiglu)")
    if problems:
        raise ValueError("no Hugging Face Llama-family class holds this model: " + "; ".join(problems))
    return "qwen2" if c.add_qkv_bias and not c.add_bias_linear else "llama"


def hf_config_dict(config: GPTConfig, **extra) -> dict:
    """A ``config.json`` for ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` (``extra`` adds e.g. bos/eos token
    ids); ValueError for a model neither holds."""
    model_type = llama_model_type(config)
    rope_theta = float(config.rotary_base)
    out = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},  # transformers >= 5
        "hidden_act": "silu",
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "initializer_range": config.init_method_std,
        "torch_dtype": str(config.params_dtype).replace("torch.", ""),
    }
    if model_type == "llama":  # q/k/v/o and gate/up/down biases, or none
        out.update(attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear)
    else:  # Qwen2: q/k/v biases always, no sliding window
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    out.update(extra)
    return out


# What the import does with each field of a Llama / Mistral ``config.json``. Every field is in one of
# these groups, or has its own check in `config_from_hf`; any other field is refused with its name, so
# a setting this model cannot honour never converts silently (quantization_config, qk-norm, ...).
_SIZE_FIELDS = {"num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "initializer_range", "tie_word_embeddings", "attention_dropout", "rope_theta", "rope_parameters",
                "rope_scaling"}
# transformers' generic fields: names, token ids, output switches and generation defaults (older versions
# saved those in config.json). None of them changes the function the model computes (pretraining_tp > 1
# only splits HF's matmuls into slices).
_METADATA_FIELDS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
    "id2label", "label2id", "problem_type", "finetuning_task", "prefix", "task_specific_params", "use_cache",
    "return_dict", "output_attentions", "output_hidden_states", "torchscript", "tf_legacy_loss",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "pruned_heads", "_attn_implementation_autoset", "pretraining_tp",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# What is known about the refused model types, so the message says why.
_REFUSED_TYPES = {
    "qwen3": "Qwen3 is not supported by this import (its q/k norms and head layout are not mapped)",
    "gemma": "Gemma scales the embeddings, uses (1 + weight) RMSNorm and GeGLU",
}


def _refuse(field, value, why):
    raise ValueError(f"config field {field} = {value!r}: {why}")


def _rope_theta(hf: dict) -> float:
    """rope_theta from the top-level field and/or the rope dicts, refusing every RoPE variant but the default."""
    theta = hf.get("rope_theta")
    for field in ("rope_parameters", "rope_scaling"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            _refuse(field, rope, "expected a dict or null")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            _refuse(f"{field}.rope_type", kind, "RoPE scaling is not supported (only default RoPE)")
        for key, value in rope.items():
            if key in ("rope_type", "type"):
                continue
            if key == "rope_theta":
                if theta is not None and float(value) != float(theta):
                    _refuse(f"{field}.rope_theta", value, f"contradicts rope_theta = {theta!r}")
                theta = value
            elif key == "partial_rotary_factor" and float(value) == 1.0:
                continue
            else:
                _refuse(f"{field}.{key}", value, "not supported (only default RoPE over the whole head)")
    return float(10000.0 if theta is None else theta)


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """A ``GPTConfig`` from a Llama ``config.json`` dict.

    Every field is either used, known not to change the function (metadata), or checked to have the one
    value this model computes; anything else raises ``ValueError`` naming the field and its value."""
    model_type = hf.get("model_type", "llama")
    if model_type not in _ARCHITECTURES:
        why = _REFUSED_TYPES.get(model_type, "only the Llama architecture imports (model_type llama or mistral)")
        _refuse("model_type", model_type, why)
    for arch in hf.get("architectures") or []:
        if arch not in _ARCHITECTURES.values():
            _refuse("architectures", hf["architectures"], f"{arch} is not a Llama causal LM")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        _refuse("hidden_act", hf["hidden_act"], "only silu (SwiGLU) is supported")
    # Llama's attention_bias (q/k/v/o) and mlp_bias (gate/up/down) together are --add-bias-linear; one
    # without the other is no model this one builds. Qwen2 always has q/k/v biases (--add-qkv-bias).
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if model_type == "qwen2":
        for field in ("attention_bias", "mlp_bias"):
            if field in hf:
                _refuse(field, hf[field], "not a Qwen2 field (Qwen2 has q/k/v biases only)")
    elif attention_bias != mlp_bias:
        _refuse("attention_bias" if attention_bias else "mlp_bias", True,
                "biases on attention without the MLP's (or the reverse) are not supported: both or neither "
                "(--disable-bias-linear)")
    max_positions = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", True) and window is not None and window < max_positions:
        _refuse("sliding_window", window, f"sliding-window attention is not supported (window < "
                                          f"max_position_embeddings = {max_positions})")
    if hf.get("use_sliding_window"):
        _refuse("use_sliding_window", True, "sliding-window attention is not supported")
    for i, kind in enumerate(hf.get("layer_types") or []):
        if kind != "full_attention":
            _refuse(f"layer_types[{i}]", kind, "only full attention is supported")
    if hf.get("pruned_heads"):
        _refuse("pruned_heads", hf["pruned_heads"], "pruned attention heads are not supported")
    checked = {"hidden_act", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
               "max_window_layers", "layer_types"}
    try:
        import transformers

        generic = set(transformers.PretrainedConfig().to_dict())  # this version's generic fields
    except ImportError:
        generic = set()
    for field, value in hf.items():
        if field not in _SIZE_FIELDS | _METADATA_FIELDS | checked | generic:
            _refuse(field, value, "not understood by the Llama import, so it cannot be honoured; remove it from "
                                  "config.json only if it does not change what the model computes")
    theta = _rope_theta(hf)
    values = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=max_positions,
        rotary_base=theta,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        init_method_std=hf.get("initializer_range", 0.02),
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
        add_bias_linear=attention_bias and mlp_bias, add_qkv_bias=model_type == "qwen2",
    )
    values.update(overrides)
    return GPTConfig(**values)


def to_hf_state_dict(sd: Dict[str, torch.Tensor], config: GPTConfig) -> Dict[str, torch.Tensor]:
    """TP=1 ``GPTModel`` state dict -> ``LlamaForCausalLM`` state dict (every tensor of ``sd`` is used)."""
    c, d = config, config.head_dim
    q_rows, kv_rows = c.num_attention_heads * d, c.num_query_groups * d
    rest = dict(sd)
    take = _taker(rest, "our state dict")
    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight"),
           "model.norm.weight": take("decoder.final_layernorm.weight")}
    llama_model_type(c)
    for i in range(c.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in (["weight", "bias"] if c.qkv_bias else ["weight"]):
            q, k, v = take(src + f"self_attention.linear_qkv.{kind}").split([q_rows, kv_rows, kv_rows], dim=0)
            out.update({dst + f"self_attn.q_proj.{kind}": q, dst + f"self_attn.k_proj.{kind}": k,
                        dst + f"self_attn.v_proj.{kind}": v})
        if c.add_bias_linear:
            gate_b, up_b = take(src + "mlp.linear_fc1.bias").split([c.ffn_hidden_size, c.ffn_hidden_size], dim=0)
            out.update({dst + "self_attn.o_proj.bias": take(src + "self_attention.linear_proj.bias"),
                        dst + "mlp.gate_proj.bias": gate_b, dst + "mlp.up_proj.bias": up_b,
                        dst + "mlp.down_proj.bias": take(src + "mlp.linear_fc2.bias")})
        gate, up = take(src + "mlp.linear_fc1.weight").split([c.ffn_hidden_size, c.ffn_hidden_size], dim=0)
        out.update({
            dst + "input_layernorm.weight": take(src + "input_layernorm.weight"),
            dst + "self_attn.o_proj.weight": take(src + "self_attention.linear_proj.weight"),
            dst + "post_attention_layernorm.weight": take(src + "pre_mlp_layernorm.weight"),
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": take(src + "mlp.linear_fc2.weight"),
        })
    if c.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = take("output_layer.weight")
    if rest:
        raise ValueError(f"{_names(rest)} have no place in a Hugging Face {_ARCHITECTURES[llama_model_type(c)]}; "
                         "refusing to export "
                         "without them")
    _check_shapes(out, hf_shapes(config), "the exported state dict")
    return {k: v.contiguous() for k, v in out.items()}


def hf_shapes(config: GPTConfig) -> Dict[str, tuple]:
    """The shape of every ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` tensor for ``config`` (``lm_head.weight``
    only when untied; biases as the config has them)."""
    c, h, d, f = config, config.hidden_size, config.head_dim, config.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (c.num_attention_heads * d, h),
                       p + "self_attn.k_proj.weight": (c.num_query_groups * d, h),
                       p + "self_attn.v_proj.weight": (c.num_query_groups * d, h),
                       p + "self_attn.o_proj.weight": (h, c.num_attention_heads * d),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
        if c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (c.num_attention_heads * d,),
                           p + "self_attn.k_proj.bias": (c.num_query_groups * d,),
                           p + "self_attn.v_proj.bias": (c.num_query_groups * d,)})
        if c.add_bias_linear:
            shapes.update({p + "self_attn.o_proj.bias": (h,), p + "mlp.gate_proj.bias": (f,),
                           p + "mlp.up_proj.bias": (f,), p + "mlp.down_proj.bias": (h,)})
    if c.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def _names(tensors, limit: int = 6) -> str:
    names = sorted(tensors)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _taker(rest: Dict[str, torch.Tensor], what: str):
    """``take(name)``: remove and return ``rest[name]``; what is left in ``rest`` afterwards was not used."""
    def take(name):
        if name not in rest:
            raise ValueError(f"{what} lacks {name}")
        return rest.pop(name)
    return take


def _check_shapes(tensors: Dict[str, torch.Tensor], shapes: Dict[str, tuple], what: str) -> None:
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{what}: {name} has shape {list(tensors[name].shape)}, the config says {list(shape)}")


def rope_inv_freq(config: GPTConfig) -> torch.Tensor:
    """RoPE's inverse frequencies, as `megatron_slung.model.gpt.rope_cos_sin` (and HF's default RoPE) make them."""
    d = config.head_dim
    return 1.0 / (config.rotary_base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def from_hf_state_dict(hf: Dict[str, torch.Tensor], config: GPTConfig) -> Dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` state dict -> TP=1 ``GPTModel`` state dict.

    Every source tensor is used or the call fails naming the unused ones (e.g. Qwen2's q/k/v biases, a
    layer beyond num_hidden_layers): a tensor left out would silently change the function. Only RoPE's
    ``inv_freq`` buffers, which some exports store, are skipped: they are derived from rope_theta, and
    they are checked to equal what this model computes."""
    c = config
    llama_model_type(c)
    _check_shapes(hf, {k: v for k, v in hf_shapes(c).items() if k in hf}, "Hugging Face state dict")
    rest = dict(hf)
    take = _taker(rest, "Hugging Face state dict")
    for name in ["model.rotary_emb.inv_freq"] + [f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
                                                  for i in range(c.num_layers)]:
        if name in rest:
            inv_freq = rest.pop(name).float()
            if inv_freq.shape != (c.head_dim // 2,) or not torch.allclose(inv_freq, rope_inv_freq(c), rtol=1e-5):
                raise ValueError(f"{name} is not the default RoPE of rope_theta = {c.rotary_base} and head_dim "
                                 f"{c.head_dim} (scaled or partial RoPE is not supported)")
    out = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": take("model.norm.weight")}
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        try:
            out.update({
                dst + "input_layernorm.weight": take(src + "input_layernorm.weight"),
                dst + "self_attention.linear_qkv.weight": torch.cat(
                    [take(src + "self_attn.q_proj.weight"), take(src + "self_attn.k_proj.weight"),
                     take(src + "self_attn.v_proj.weight")], dim=0),
                dst + "self_attention.linear_proj.weight": take(src + "self_attn.o_proj.weight"),
                dst + "pre_mlp_layernorm.weight": take(src + "post_attention_layernorm.weight"),
                dst + "mlp.linear_fc1.weight": torch.cat(
                    [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")], dim=0),
                dst + "mlp.linear_fc2.weight": take(src + "mlp.down_proj.weight"),
            })
            if c.qkv_bias:
                out[dst + "self_attention.linear_qkv.bias"] = torch.cat(
                    [take(src + "self_attn.q_proj.bias"), take(src + "self_attn.k_proj.bias"),
                     take(src + "self_attn.v_proj.bias")], dim=0)
            if c.add_bias_linear:
                out.update({
                    dst + "self_attention.linear_proj.bias": take(src + "self_attn.o_proj.bias"),
                    dst + "mlp.linear_fc1.bias": torch.cat([take(src + "mlp.gate_proj.bias"),
                                                            take(src + "mlp.up_proj.bias")], dim=0),
                    dst + "mlp.linear_fc2.bias": take(src + "mlp.down_proj.bias"),
                })
        except ValueError as e:
            raise ValueError(f"{e} (layer {i})") from None
    if c.untie_embeddings_and_output_weights:
        if "lm_head.weight" not in rest:
            raise ValueError("untied config (tie_word_embeddings false) but the Hugging Face state dict has no "
                             "lm_head.weight")
        out["output_layer.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in rest:
        # Tied: HF uses the embedding as the output layer; a stored copy must be that same matrix.
        if not torch.equal(rest["lm_head.weight"], out["embedding.word_embeddings.weight"]):
            raise ValueError("config field tie_word_embeddings = True, but lm_head.weight differs from "
                             "model.embed_tokens.weight: the tied model cannot hold both")
        rest.pop("lm_head.weight")
    if rest:
        biases = (" (biases the config does not declare: attention_bias/mlp_bias, or model_type qwen2?)"
                  if any(k.endswith(".bias") for k in rest) else "")
        raise ValueError(f"tensors the Llama import does not use: {_names(rest)}{biases}; converting without "
                         "them would change the model")
    return out
