"""Hugging Face exchange for each architecture HF can hold: Llama (with or without biases), Qwen2 (q/k/v
biases), GPT-2 (learned positions, LayerNorm, GeLU, biases); logits parity <= 1e-4 in fp32 both ways, and
a clear refusal for a combination no HF class holds."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_slung.model import hf_checkpoint  # noqa: E402
from megatron_slung.model.gpt import GPTConfig, GPTModel  # noqa: E402
from tools import convert_from_hf, convert_to_hf  # noqa: E402

LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False)
GPT2 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False, add_bias_linear=True,
            num_query_groups=4)
# name -> (GPTConfig switches, the HF class the export must be, TP, PP)
EXPORTS = {
    "llama_with_biases": (dict(LLAMA, add_bias_linear=True), "LlamaForCausalLM", 2, 1),
    "qwen2": (dict(LLAMA, add_qkv_bias=True, untie_embeddings_and_output_weights=True), "Qwen2ForCausalLM", 2, 2),
    "gpt2_exact_gelu": (GPT2, "GPT2LMHeadModel", 2, 2),
    "gpt2_openai_gelu_untied": (dict(GPT2, openai_gelu=True, untie_embeddings_and_output_weights=True),
                                "GPT2LMHeadModel", 1, 1),
}


def _config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                vocab_size=96, max_position_embeddings=32, norm_epsilon=1e-5, init_seed=5)
    base.update(overrides)
    return GPTConfig(**base)


def _model_with_nonzero_vectors(cfg):
    """Biases and LayerNorm betas start at 0, where a wrong mapping would not show."""
    model = GPTModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _tokens(vocab, seed=0):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_logits_match_the_hugging_face_class(tmp_path, name):
    switches, cls, tp, pp = EXPORTS[name]
    cfg = _config(**switches)
    model = _model_with_nonzero_vectors(cfg)
    ckpt = str(tmp_path / "ckpt")
    hf_checkpoint.write_checkpoint(ckpt, model.state_dict(), cfg, tp, pp, unpadded_vocab_size=cfg.vocab_size)
    out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--load", ckpt, "--output", out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == cls
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    # and back: the same model, tensor for tensor
    back = str(tmp_path / "back")
    assert convert_from_hf.main(["--load", out, "--save", back]) == 0
    full, back_cfg, _ = hf_checkpoint.read_checkpoint(back)
    for field in switches:
        assert getattr(back_cfg, field) == getattr(cfg, field), field
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(full[key][:tensor.shape[0]] if "word_embeddings" in key or "output_layer" in key
                                   else full[key], tensor, rtol=0, atol=0, msg=key)


def _random_vectors_(hf_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf_model.eval()


def _hf_models():
    torch.manual_seed(0)
    yield "qwen2", _random_vectors_(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)))
    yield "llama_attention_and_mlp_bias", _random_vectors_(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True)))
    yield "gpt2", _random_vectors_(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)))
    yield "gpt2_exact_gelu_n_inner_untied", _random_vectors_(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=40, n_inner=56, activation_function="gelu",
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)))


@pytest.mark.parametrize("name", ["qwen2", "llama_attention_and_mlp_bias", "gpt2", "gpt2_exact_gelu_n_inner_untied"])
def test_import_logits_match_transformers_built_models(tmp_path, name):
    hf = dict(_hf_models())[name]
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    ckpt = str(tmp_path / "ckpt")
    assert convert_from_hf.main(["--load", src, "--save", ckpt, "--tensor-model-parallel-size", "2"]) == 0
    full, cfg, _ = hf_checkpoint.read_checkpoint(ckpt)
    model = GPTModel(cfg).eval()
    model.load_state_dict(full)
    tokens = _tokens(80, seed=2)
    with torch.no_grad():
        assert (model(tokens)[..., :80] - hf(tokens).logits).abs().max().item() <= 1e-4
    if name.startswith("gpt2"):
        assert cfg.position_embedding_type == "learned_absolute" and cfg.normalization == "LayerNorm"
        assert cfg.openai_gelu == (name == "gpt2")  # gelu_new is the tanh GeLU (--openai-gelu)
    # The trainer adopts the imported architecture from the checkpoint's record (no model flags needed).
    from megatron_slung.training.arguments import parse_args

    args = parse_args(["--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-4",
                       "--mock-data", "--vocab-size", "80", "--load", ckpt, "--finetune",
                       "--tensor-model-parallel-size", "2"], world_size=2)
    assert (args.position_embedding_type, args.normalization, args.swiglu, args.add_bias_linear, args.add_qkv_bias) \
        == (cfg.position_embedding_type, cfg.normalization, cfg.swiglu, cfg.add_bias_linear, cfg.add_qkv_bias)


@pytest.mark.parametrize("switches,message", [
    (dict(position_embedding_type="learned_absolute"), "--position-embedding-type learned_absolute (Llama/Qwen2 use "
                                                       "RoPE)"),
    (dict(GPT2, qk_layernorm=True), "--qk-layernorm (GPT-2 has no query/key norms)"),
    (dict(qk_layernorm=True), "no Hugging Face class holds this combination"),
    (dict(LLAMA, rotary_percent=0.5), "--rotary-percent 0.5 (Llama/Qwen2 rotate the whole head)"),
    (dict(GPT2, num_query_groups=2), "--num-query-groups 2 (GPT-2 has one key/value head per query head)"),
    (dict(GPT2, apply_layernorm_1p=True), "--apply-layernorm-1p"),
], ids=["learned_rmsnorm_swiglu", "gpt2_qk_norm", "qk_norm", "partial_rope", "gpt2_gqa", "1p"])
def test_a_combination_no_hugging_face_class_holds_is_refused(tmp_path, capsys, switches, message):
    cfg = _config(**switches)
    ckpt = str(tmp_path / "ckpt")
    hf_checkpoint.write_checkpoint(ckpt, GPTModel(cfg).state_dict(), cfg, unpadded_vocab_size=cfg.vocab_size)
    assert convert_to_hf.main(["--load", ckpt, "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert message in err and "no Hugging Face class holds this combination" in err, err
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("changes,message", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx = True"),
    (dict(activation_function="relu"), "activation_function = 'relu'"),
    (dict(add_cross_attention=True), "add_cross_attention = True"),
    (dict(rope_theta=10000.0), "rope_theta = 10000.0: not understood by the GPT-2 import"),
    (dict(embd_pdrop=0.2, resid_pdrop=0.1), "embd_pdrop = 0.2: differs from resid_pdrop = 0.1"),
], ids=["layer_idx_scaling", "relu", "cross_attention", "foreign_field", "embedding_dropout"])
def test_gpt2_config_fields_the_import_cannot_honour_are_refused(tmp_path, capsys, changes, message):
    hf = dict(_hf_models())["gpt2"]
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")


def test_gpt2_dropout_settings_are_imported():
    """resid_pdrop and attn_pdrop become --hidden-dropout and --attention-dropout (attn_pdrop was dropped)."""
    from megatron_slung.model import hf_gpt2

    base = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    config = hf_gpt2.config_from_hf({**base, "resid_pdrop": 0.2, "embd_pdrop": 0.2, "attn_pdrop": 0.3})
    assert (config.hidden_dropout, config.attention_dropout) == (0.2, 0.3)
    assert hf_gpt2.hf_config_dict(config)["attn_pdrop"] == 0.3
