"""The GPT model in one process: Hugging Face Llama parity, init, config checks, counts, FLOPs."""

import math

import pytest
import torch

from megatron_slung.model import hf_llama
from megatron_slung.model.gpt import (
    GPTConfig,
    GPTModel,
    TransformerLayer,
    flops_per_token,
    merge_tensor_parallel_state_dicts,
    pad_vocab_size,
    split_state_dict_for_tensor_parallel,
    tensor_parallel_layout,
)

transformers = pytest.importorskip("transformers")


def _config(**overrides):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
                vocab_size=128, max_position_embeddings=64, rotary_base=500000.0, norm_epsilon=1e-6)
    base.update(overrides)
    return GPTConfig(**base)


def _hf_model(cfg, sd, dtype=torch.float32):
    hf_cfg = hf_llama.hf_config_dict(cfg)
    hf_cfg.pop("torch_dtype")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).to(dtype).eval()
    missing, unexpected = model.load_state_dict(hf_llama.to_hf_state_dict(sd, cfg), strict=False)
    assert not unexpected
    assert missing == ([] if cfg.untie_embeddings_and_output_weights else ["lm_head.weight"])
    if not cfg.untie_embeddings_and_output_weights:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.mark.parametrize("overrides", [dict(), dict(untie_embeddings_and_output_weights=True),
                                       dict(num_query_groups=8, kv_channels=16)], ids=["gqa_tied", "gqa_untied", "mha_kv16"])
def test_logits_equal_hugging_face_llama(overrides):
    cfg = _config(**overrides)
    model = GPTModel(cfg).eval()
    hf = _hf_model(cfg, model.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.randint(0, cfg.max_position_embeddings, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens, positions), hf(tokens, position_ids=positions).logits, rtol=1e-5, atol=1e-5)
        # the hidden-state path gives the same logits without making them inside the model
        hidden, weight = model(tokens, return_hidden=True)
        assert hidden.shape == (3, 17, cfg.hidden_size) and weight.shape == (cfg.vocab_size, cfg.hidden_size)
        torch.testing.assert_close(hidden @ weight.t(), model(tokens), rtol=1e-5, atol=1e-5)


def test_bf16_logits_close_to_hugging_face_in_bf16():
    cfg = _config(params_dtype=torch.bfloat16)
    model = GPTModel(cfg).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hf = _hf_model(cfg, model.state_dict(), torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def test_hf_round_trip_of_config_and_weights():
    cfg = _config(untie_embeddings_and_output_weights=True)
    sd = GPTModel(cfg).state_dict()
    back = hf_llama.from_hf_state_dict(hf_llama.to_hf_state_dict(sd, cfg), cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    cfg2 = hf_llama.config_from_hf(hf_llama.hf_config_dict(cfg))
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "vocab_size", "max_position_embeddings", "rotary_base", "norm_epsilon",
                  "untie_embeddings_and_output_weights"):
        assert getattr(cfg2, field) == getattr(cfg, field), field
    with pytest.raises(ValueError, match="rope_parameters.rope_type = 'llama3': RoPE scaling is not supported"):
        hf_llama.config_from_hf({**hf_llama.hf_config_dict(cfg), "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="lacks model.layers.1.mlp.up_proj.weight"):
        hf = hf_llama.to_hf_state_dict(sd, cfg)
        del hf["model.layers.1.mlp.up_proj.weight"]
        hf_llama.from_hf_state_dict(hf, cfg)


def test_initialisation_is_seeded_per_parameter_and_scaled_for_output_projections():
    cfg = _config(num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, init_seed=3)
    model = GPTModel(cfg)
    again = GPTModel(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a layer built alone (as a pipeline stage does) has the same weights as inside the model
    alone = TransformerLayer(cfg, 2)
    for name, tensor in alone.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[f"decoder.layers.2.{name}"])
    # the global RNG plays no part
    torch.manual_seed(12345)
    assert torch.equal(GPTModel(cfg).embedding.word_embeddings.weight, model.embedding.word_embeddings.weight)
    assert not torch.equal(GPTModel(_config(num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8,
                                            init_seed=4)).embedding.word_embeddings.weight,
                           model.embedding.word_embeddings.weight)
    layer = model.decoder.layers[0]
    out_std = cfg.init_method_std / math.sqrt(2 * cfg.num_layers)
    assert layer.self_attention.linear_qkv.weight.std().item() == pytest.approx(cfg.init_method_std, rel=0.05)
    assert layer.mlp.linear_fc1.weight.std().item() == pytest.approx(cfg.init_method_std, rel=0.05)
    assert layer.self_attention.linear_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.mlp.linear_fc2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(model.decoder.final_layernorm.weight == 1)


def test_recompute_gives_identical_gradients():
    cfg = _config()
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        model = GPTModel(_config(recompute_activations=recompute))
        model(tokens).logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# Megatron's architecture switches, each combination a model this project builds.
GPT3 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False, add_bias_linear=True)
VARIANTS = {
    "llama": {},
    "gpt3": GPT3,
    "gpt3_untied_openai_gelu_1p": dict(GPT3, untie_embeddings_and_output_weights=True, openai_gelu=True,
                                       apply_layernorm_1p=True),
    "qwen2_qk_norm_partial_rope": dict(add_qkv_bias=True, qk_layernorm=True, rotary_percent=0.5),
    "no_positions_layernorm_qk_norm": dict(position_embedding_type="none", normalization="LayerNorm", qk_layernorm=True,
                                           swiglu=False),
}


@pytest.mark.parametrize("untie", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_and_flops_formula(untie, variant):
    cfg = _config(**{"untie_embeddings_and_output_weights": untie, **VARIANTS[variant]})
    untie = cfg.untie_embeddings_and_output_weights
    model = GPTModel(cfg)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())  # biases, betas, positions too
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embedding" in n or "output_layer" in n)
    assert model.num_parameters(include_embeddings=False) == model.num_parameters() - embedding
    # FLOPs: 6 x (every 2-D matmul weight, the output layer counted once even when tied) + attention
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n)
    matmul += 0 if untie else cfg.vocab_size * cfg.hidden_size
    seq = 32
    attention = 12 * cfg.num_layers * seq * cfg.num_attention_heads * cfg.head_dim
    assert flops_per_token(cfg, seq) == 6 * matmul + attention
    assert flops_per_token(cfg, seq, training=False) == (6 * matmul + attention) / 3


def test_gpt3_style_is_learned_positions_layernorm_gelu_and_biases():
    """The blocks of each switch compute what Megatron's do (written out in plain torch here)."""
    torch.manual_seed(0)
    cfg = _config(**GPT3, num_layers=1)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # biases and betas start at 0: make them count
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if n.endswith("layernorm.weight") else 0.0))
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    sd = model.state_dict()
    f = torch.nn.functional

    def ln(x, name):
        return f.layer_norm(x, (cfg.hidden_size,), sd[name + ".weight"], sd[name + ".bias"], cfg.norm_epsilon)

    x = sd["embedding.word_embeddings.weight"][tokens] + sd["embedding.position_embeddings.weight"][:10]
    p = "decoder.layers.0."
    h = ln(x, p + "input_layernorm")
    qkv = f.linear(h, sd[p + "self_attention.linear_qkv.weight"], sd[p + "self_attention.linear_qkv.bias"])
    d, nh, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
    q = q.view(2, 10, nh, d).transpose(1, 2)
    k, v = (t.view(2, 10, ng, d).transpose(1, 2).repeat_interleave(nh // ng, dim=1) for t in (k, v))
    att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    ctx = (att.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, nh * d)
    x = x + f.linear(ctx, sd[p + "self_attention.linear_proj.weight"], sd[p + "self_attention.linear_proj.bias"])
    h = f.gelu(f.linear(ln(x, p + "pre_mlp_layernorm"), sd[p + "mlp.linear_fc1.weight"], sd[p + "mlp.linear_fc1.bias"]))
    x = x + f.linear(h, sd[p + "mlp.linear_fc2.weight"], sd[p + "mlp.linear_fc2.bias"])
    expected = ln(x, "decoder.final_layernorm") @ sd["embedding.word_embeddings.weight"].t()
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    assert sd[p + "mlp.linear_fc1.weight"].shape == (cfg.ffn_hidden_size, cfg.hidden_size)  # one matrix, no gate
    # openai_gelu: the tanh approximation; zero-centred gamma: weight 0 computes what weight 1 did
    mlp = GPTModel(_config(**GPT3, num_layers=1, openai_gelu=True)).decoder.layers[0].mlp
    x = torch.randn(3, 2, cfg.hidden_size)
    w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    torch.testing.assert_close(mlp(x), f.linear(f.gelu(f.linear(x, w1), approximate="tanh"), w2))
    one_p = GPTModel(_config(**GPT3, apply_layernorm_1p=True))
    plain = GPTModel(_config(**GPT3))
    assert torch.equal(one_p.decoder.final_layernorm.weight, torch.zeros(cfg.hidden_size))
    torch.testing.assert_close(one_p(tokens), plain(tokens), rtol=0, atol=0)


def test_partial_rope_rotates_the_first_channels_only_and_qk_norm_normalises_each_head():
    cfg = _config(rotary_percent=0.5, qk_layernorm=True, add_qkv_bias=True, num_layers=1)
    assert cfg.rotary_dim == cfg.head_dim // 2
    from megatron_slung.model.gpt import apply_rope, rope_for

    cos, sin = rope_for(6, 1, cfg, "cpu")
    assert cos.shape[-1] == cfg.rotary_dim
    x = torch.randn(6, 1, 2, cfg.head_dim)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., cfg.rotary_dim:], x[..., cfg.rotary_dim:])
    assert not torch.allclose(y[1:, ..., :cfg.rotary_dim], x[1:, ..., :cfg.rotary_dim])
    attn = GPTModel(cfg).decoder.layers[0].self_attention
    assert attn.q_layernorm.weight.shape == (cfg.head_dim,) and attn.linear_proj.bias is None
    assert attn.linear_qkv.bias.shape == ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim,)
    with pytest.raises(ValueError, match="rotary dimension"):
        _config(rotary_percent=0.1)
    with pytest.raises(ValueError, match="openai_gelu .* and swiglu"):
        _config(openai_gelu=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensor_parallel_layout_names_every_parameter_of_each_variant(variant):
    cfg = _config(**VARIANTS[variant])
    model = GPTModel(cfg)
    assert set(tensor_parallel_layout(cfg)) == set(model.state_dict())
    full = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    shards = [split_state_dict_for_tensor_parallel(full, cfg, 2, r) for r in range(2)]
    merged = merge_tensor_parallel_state_dicts(shards, cfg)
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_tensor_parallel_split_refuses_a_tensor_the_model_has_no_place_for():
    cfg = _config()
    full = dict(GPTModel(cfg).state_dict())
    full["decoder.layers.0.self_attention.linear_qkv.bias_extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match="tensors the model has no place for: .*linear_qkv.bias_extra"):
        split_state_dict_for_tensor_parallel(full, cfg, 2, 0)


def test_tensor_parallel_state_dict_split_and_merge_round_trip():
    cfg = _config(num_attention_heads=8, num_query_groups=4, untie_embeddings_and_output_weights=True)
    full = GPTModel(cfg).state_dict()
    assert set(tensor_parallel_layout(cfg)) == set(full)
    for tp in (2, 4):
        shards = [split_state_dict_for_tensor_parallel(full, cfg, tp, r) for r in range(tp)]
        d = cfg.head_dim
        qkv = shards[1]["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert qkv.shape[0] == (8 + 2 * 4) * d // tp
        # rank 1's rows: its slice of Q, then of K, then of V
        q, k, v = full["decoder.layers.0.self_attention.linear_qkv.weight"].split([8 * d, 4 * d, 4 * d])
        n_q, n_kv = 8 * d // tp, 4 * d // tp
        assert torch.equal(qkv, torch.cat([q[n_q:2 * n_q], k[n_kv:2 * n_kv], v[n_kv:2 * n_kv]]))
        merged = merge_tensor_parallel_state_dicts(shards, cfg)
        assert all(torch.equal(merged[k], full[k]) for k in full)


def test_config_and_layout_errors_are_clear():
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) is not divisible by num_query_groups \(3\)"):
        _config(num_query_groups=3)
    with pytest.raises(ValueError, match="hidden_size .* is not divisible by num_attention_heads"):
        _config(hidden_size=60)
    with pytest.raises(ValueError, match="unknown dtype"):
        _config(params_dtype="float8")
    cfg = _config(sequence_parallel=True)
    with pytest.raises(ValueError, match=r"num-query-groups \(2\) is not divisible by tensor-model-parallel-size \(4\)"):
        cfg.validate_parallel(4)
    with pytest.raises(ValueError, match=r"num-layers \(2\) is not divisible by pipeline-model-parallel-size \(4\)"):
        cfg.validate_parallel(2, 4)
    with pytest.raises(ValueError, match=r"seq-length \(with --sequence-parallel\) \(9\) is not divisible"):
        cfg.validate_parallel(2, 1, seq_length=9)
    with pytest.raises(ValueError, match=r"seq-length \(128\) is larger than max-position-embeddings \(64\)"):
        cfg.validate_parallel(1, 1, seq_length=128)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["params_dtype"] == "float32"
    assert pad_vocab_size(50257, 1) == 50304 and pad_vocab_size(50257, 2) == 50432 and pad_vocab_size(256, 2) == 256


def test_compiled_layers_keep_the_model_function():
    # dynamo with the "eager" backend: checks the wiring (recomputation outside the compiled body)
    # without compiling kernels; inductor was measured on a GPU (docs/model.md)
    from megatron_slung.model.gpt import compile_transformer_layers

    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        model = GPTModel(_config(recompute_activations=True))
        if compiled:
            assert compile_transformer_layers(model, backend="eager") == 2
        logits = model(tokens)
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
