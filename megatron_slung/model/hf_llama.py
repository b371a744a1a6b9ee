"""Hugging Face Llama <-> GPTModel: config and state-dict adapters (pure functions, no files).

The two models compute the same function (see the docstring of ``megatron_slung.model.gpt``), so a
conversion only renames tensors and splits/concatenates the fused ones:

    linear_qkv = cat([q_proj, k_proj, v_proj])      linear_fc1 = cat([gate_proj, up_proj])

Both functions work on the TP=1 state dict; for a TP>1 checkpoint merge the shards first
(``gpt.merge_tensor_parallel_state_dicts``) and split after importing
(``gpt.split_state_dict_for_tensor_parallel``). A tied model has no ``lm_head.weight`` in its
export (``tie_word_embeddings: true``); Hugging Face ties it on load.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_slung.model.gpt import GPTConfig


def hf_config_dict(config: GPTConfig, **extra) -> dict:
    """A ``config.json`` for ``LlamaForCausalLM`` (``extra`` adds e.g. bos/eos token ids)."""
    rope_theta = float(config.rotary_base)
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "initializer_range": config.init_method_std,
        "torch_dtype": str(config.params_dtype).replace("torch.", ""),
    }
    out.update(extra)
    return out


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """A ``GPTConfig`` from a Llama ``config.json`` dict (rejects what our model cannot represent)."""
    if hf.get("model_type", "llama") not in ("llama", "mistral") and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ValueError(f"not a Llama-architecture config (model_type={hf.get('model_type')!r})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias / mlp_bias are not supported (the model has no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported (only default RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    values = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rotary_base=float(theta),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        init_method_std=hf.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
    )
    values.update(overrides)
    return GPTConfig(**values)


def to_hf_state_dict(sd: Dict[str, torch.Tensor], config: GPTConfig) -> Dict[str, torch.Tensor]:
    """TP=1 ``GPTModel`` state dict -> ``LlamaForCausalLM`` state dict."""
    c, d = config, config.head_dim
    q_rows, kv_rows = c.num_attention_heads * d, c.num_query_groups * d
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    for i in range(c.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "self_attention.linear_qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = sd[src + "mlp.linear_fc1.weight"].split([c.ffn_hidden_size, c.ffn_hidden_size], dim=0)
        out.update({
            dst + "input_layernorm.weight": sd[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": sd[src + "mlp.linear_fc2.weight"],
        })
    if c.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: Dict[str, torch.Tensor], config: GPTConfig) -> Dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` state dict -> TP=1 ``GPTModel`` state dict."""
    c = config
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face state dict lacks {missing}")
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        try:
            out.update({
                dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
                dst + "self_attention.linear_qkv.weight": torch.cat(
                    [hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
                     hf[src + "self_attn.v_proj.weight"]], dim=0),
                dst + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
                dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
                dst + "mlp.linear_fc1.weight": torch.cat(
                    [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0),
                dst + "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"],
            })
        except KeyError as e:
            raise ValueError(f"Hugging Face state dict lacks {e.args[0]} (layer {i})") from None
    if c.untie_embeddings_and_output_weights:
        if "lm_head.weight" not in hf:
            raise ValueError("untied config but the Hugging Face state dict has no lm_head.weight")
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out
