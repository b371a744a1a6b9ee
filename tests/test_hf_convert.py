"""Model exchange: checkpoints (any TP/PP) <-> Hugging Face Llama directories, logit parity, bad input."""

from __future__ import annotations

import glob
import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_slung.model import hf_checkpoint  # noqa: E402
from megatron_slung.model.gpt import GPTConfig, GPTModel  # noqa: E402
from megatron_slung.parallel import state  # noqa: E402
from tests import eval_fixtures as fx  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tools import convert_from_hf, convert_to_hf  # noqa: E402

TOL = dict(rtol=0, atol=1e-4)


def _config(**overrides):
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
                vocab_size=320, max_position_embeddings=64, rotary_base=10000.0, norm_epsilon=1e-6, init_seed=7)
    base.update(overrides)
    return GPTConfig(**base)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A SentencePiece model trained here with the project's tool (control symbols as it adds them)."""
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = "the cat dog sun tree nice kind you are idiot stupid hello world people think Zürich".split()
    with open(d / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "tools", "train_tokenizer.py"), "--input", str(d / "train.jsonl"),
                    "--output-prefix", str(d / "spm"), "--vocab-size", "320", "--harm-tag", fx.HARM_TAG],
                   check=True, capture_output=True)
    return str(d / "spm.model")


def _tokens(cfg, shape=(2, 13), seed=0):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp,pp,untie", [(1, 1, False), (2, 2, True), (2, 1, False), (1, 2, False)])
def test_checkpoint_to_hf_logits_match(tmp_path, spm_model, tp, pp, untie):
    cfg = _config(untie_embeddings_and_output_weights=untie)
    model = GPTModel(cfg).eval()
    ckpt = str(tmp_path / "ckpt")
    hf_checkpoint.write_checkpoint(ckpt, model.state_dict(), cfg, tp, pp, tag="iter_0000010",
                                   tokenizer={"type": "SentencePieceTokenizer", "model": spm_model})
    files = sorted(os.listdir(os.path.join(ckpt, "iter_0000010")))
    if pp > 1:
        assert f"layer_00-model_{tp - 1:02d}-model_states.pt" in files
    else:
        assert [f for f in files if f.startswith("mp_rank")] == [f"mp_rank_{t:02d}_model_states.pt" for t in range(tp)]
    out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--load", ckpt, "--output", out]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # The exported tokenizer is the SentencePiece model, with the harm tag as one special token.
    import sentencepiece as spm

    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    text = "hello world the cat Zürich you idiot"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok.convert_tokens_to_ids(fx.HARM_TAG) == sp.piece_to_id(fx.HARM_TAG)
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|endoftext|>"


def test_hf_to_checkpoint_round_trip_is_exact(tmp_path):
    tok = fx.word_tokenizer()  # 26 tokens: padded to 28 for TP=4
    hf = fx.random_llama(tok, seed=3, hidden=32, heads=4, kv_heads=4, layers=2)
    src = fx.save(hf, tok, str(tmp_path / "src"))
    ckpt = str(tmp_path / "ckpt")
    assert convert_from_hf.main(["--load", src, "--save", ckpt, "--tensor-model-parallel-size", "4",
                                 "--pipeline-model-parallel-size", "2"]) == 0
    full, cfg, meta = hf_checkpoint.read_checkpoint(ckpt)
    assert cfg.vocab_size == 28 and meta["tensor_model_parallel_size"] == 4
    # The trainer's files are there too: iteration 0 and the model's arguments (for --load CKPT --finetune).
    train = torch.load(os.path.join(ckpt, "release", "slung_state.pt"), weights_only=True)
    assert train["iteration"] == 0 and json.loads(train["args_json"])["padded_vocab_size"] == 28
    hf_sd = hf.state_dict()
    assert torch.equal(full["embedding.word_embeddings.weight"][:26], hf_sd["model.embed_tokens.weight"])
    assert full["embedding.word_embeddings.weight"][26:].abs().sum() == 0
    assert torch.equal(full["output_layer.weight"][:26], hf_sd["lm_head.weight"])
    # Back to HF: the tokenizer copied into the checkpoint comes along; the padding rows are left out again.
    out = str(tmp_path / "back")
    assert convert_to_hf.main(["--load", ckpt, "--output", out]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert back_tok.get_vocab() == tok.get_vocab() and back.config.vocab_size == 26
    ids = torch.tensor([tok("hello you are so kind", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)
    for name, t in hf_sd.items():
        assert torch.equal(back.state_dict()[name], t), name


def _tp_logits_body(rank, world_size, ckpt, tokens):
    state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    meta = torch.load(os.path.join(ckpt, "release", f"mp_rank_{rank:02d}_model_states.pt"), weights_only=True)
    model = GPTModel(GPTConfig.from_dict(meta["model_config"])).eval()
    model.load_state_dict(meta["module"])
    with torch.no_grad():
        logits = model(tokens)
    state.destroy_model_parallel()
    return logits


@pytest.mark.distributed
def test_imported_tp2_checkpoint_loads_into_the_tensor_parallel_model(tmp_path):
    """convert_from_hf's TP shards are what a real TP=2 GPTModel expects: its logits equal the HF model's."""
    tok = fx.word_tokenizer()
    hf = fx.random_llama(tok, seed=4, hidden=32, heads=4, kv_heads=2, layers=2)
    src = fx.save(hf, tok, str(tmp_path / "src"))
    ckpt = str(tmp_path / "ckpt")
    assert convert_from_hf.main(["--load", src, "--save", ckpt, "--tensor-model-parallel-size", "2"]) == 0
    tokens = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    shards = run_distributed(_tp_logits_body, 2, args=(ckpt, tokens))
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(torch.cat(shards, dim=-1)[..., :len(tok)], ref, **TOL)


def test_reads_the_trainers_layout(tmp_path, spm_model):
    """DeepSpeed's mp_rank files with the module only, the configuration in the trainer's slung_state.pt."""
    cfg = _config(untie_embeddings_and_output_weights=True)
    model = GPTModel(cfg).eval()
    tag_dir = tmp_path / "ckpt" / "iter_0000100"
    tag_dir.mkdir(parents=True)
    from megatron_slung.model.gpt import split_state_dict_for_tensor_parallel

    for t in range(2):
        shard = split_state_dict_for_tensor_parallel(model.state_dict(), cfg, 2, t)
        torch.save({"module": shard, "dp_world_size": 1, "mp_world_size": 2}, tag_dir / f"mp_rank_{t:02d}_model_states.pt")
    args = {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 8, "num_query_groups": 4,
            "max_position_embeddings": 64, "norm_epsilon": 1e-6, "untie_embeddings_and_output_weights": True,
            "seq_length": 32, "lr": 4e-4, "tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm_model}
    torch.save({"format_version": 1, "iteration": 100, "args_json": json.dumps(args)}, tag_dir / "slung_state.pt")
    (tmp_path / "ckpt" / "latest").write_text("iter_0000100\n")
    full, got_cfg, meta = hf_checkpoint.read_checkpoint(str(tmp_path / "ckpt"))
    assert got_cfg.vocab_size == cfg.vocab_size and got_cfg.untie_embeddings_and_output_weights
    for name, t in model.state_dict().items():
        assert torch.equal(full[name], t), name
    out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--load", str(tmp_path / "ckpt"), "--output", out]) == 0  # tokenizer from the args
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))


def test_evaluations_load_a_checkpoint_directly(tmp_path, spm_model):
    from megatron_slung.eval import common, perplexity

    cfg = _config()
    model = GPTModel(cfg).eval()
    ckpt = str(tmp_path / "ckpt")
    hf_checkpoint.write_checkpoint(ckpt, model.state_dict(), cfg, 2, 1,
                                   tokenizer={"type": "SentencePieceTokenizer", "model": spm_model})
    hf, tok = common.load_model(ckpt)
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
    assert tok.eos_token == "<|endoftext|>"
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "hello world the cat"}) + "\n")
    res = perplexity.evaluate_perplexity(hf, tok, jsonl=str(data))
    assert res["overall"]["tokens"] > 0 and res["overall"]["perplexity"] > 1


def test_conversion_bad_input(tmp_path, capsys):
    assert convert_to_hf.main(["--load", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "nowhere: no such checkpoint directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_to_hf.main(["--load", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "not a megatron-slung checkpoint" in capsys.readouterr().err
    cfg = _config(num_layers=2)
    ckpt = str(tmp_path / "ckpt")
    hf_checkpoint.write_checkpoint(ckpt, GPTModel(cfg).state_dict(), cfg, 1, 2)
    victim = glob.glob(os.path.join(ckpt, "release", "layer_01-*"))[0]
    os.remove(victim)
    assert convert_to_hf.main(["--load", ckpt, "--output", str(tmp_path / "o")]) == 2
    assert "layer_01-model_00-model_states.pt: missing checkpoint file" in capsys.readouterr().err
    with open(glob.glob(os.path.join(ckpt, "release", "layer_02-*"))[0], "wb") as f:
        f.write(b"garbage")
    with pytest.raises(hf_checkpoint.CheckpointError, match="layer_0"):
        hf_checkpoint.read_checkpoint(ckpt)
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("iter_9")
    assert convert_to_hf.main(["--load", ckpt, "--output", str(tmp_path / "o")]) == 2
    assert "names tag 'iter_9'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    # convert_from_hf: not an HF directory; heads not divisible by TP; output exists.
    assert convert_from_hf.main(["--load", str(empty), "--save", str(tmp_path / "c")]) == 2
    assert "no config.json" in capsys.readouterr().err
    tok = fx.word_tokenizer()
    src = fx.save(fx.random_llama(tok, heads=4, kv_heads=2), tok, str(tmp_path / "src"))
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c"), "--tensor-model-parallel-size", "4"]) == 2
    assert "num-query-groups (2) is not divisible by tensor-model-parallel-size (4)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")
    assert convert_from_hf.main(["--load", src, "--save", str(empty)]) == 0
    assert convert_from_hf.main(["--load", src, "--save", str(empty)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert not leftovers


# --------------------------------------------------------------------------- the import refuses what it cannot honour
def _tiny_qwen2(path, seed=0):
    """A Qwen2 model with non-zero q/k/v biases (what Qwen2 checkpoints have), saved to ``path``."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 1.0)
    model.save_pretrained(path)
    return model


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


_DELETE = object()


def test_qwen2_weights_under_a_llama_config_are_refused_naming_the_biases(tmp_path, capsys):
    src = str(tmp_path / "qwen2")
    _tiny_qwen2(src)
    # As saved, Qwen2 imports (--add-qkv-bias; tests/test_hf_architectures.py checks its logits).
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c1")]) == 0
    # The same weights under a Llama config without biases: the bias tensors are named (this once converted
    # with rc 0, and the checkpoint's logits were off by 2.1).
    _edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"], use_sliding_window=_DELETE,
                 sliding_window=_DELETE, max_window_layers=_DELETE, layer_types=_DELETE)
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert "tensors the Llama import does not use" in err and "model.layers.0.self_attn.k_proj.bias" in err
    assert "biases" in err
    assert not os.path.exists(tmp_path / "c2")


def test_a_tensor_the_import_does_not_use_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    tok = fx.word_tokenizer()
    hf = fx.random_llama(tok, seed=1, hidden=32, heads=4, kv_heads=2, layers=2)
    src = fx.save(hf, tok, str(tmp_path / "src"))
    weights = os.path.join(src, "model.safetensors")
    sd = load_file(weights)
    # RoPE's inv_freq buffers (stored by some exports) are derived, not weights: skipped, after a check.
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)  # head_dim 8, rope_theta 10000
    save_file({**sd, "model.rotary_emb.inv_freq": inv_freq}, weights)
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "ok")]) == 0
    save_file({**sd, "model.rotary_emb.inv_freq": inv_freq / 8}, weights)  # a scaled RoPE
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c")]) == 2
    assert "model.rotary_emb.inv_freq is not the default RoPE" in capsys.readouterr().err
    # A qk-norm weight, and a layer beyond num_hidden_layers: named, nothing written.
    extra = {"model.layers.1.self_attn.q_norm.weight": torch.ones(8),
             "model.layers.2.mlp.down_proj.weight": torch.zeros(32, 64)}
    save_file({**sd, **extra}, weights)
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "does not use: model.layers.1.self_attn.q_norm.weight, model.layers.2.mlp.down_proj.weight" in err
    # A tensor of the wrong shape is named with both shapes.
    save_file({**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(65, 32)}, weights)
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c")]) == 2
    assert "model.layers.0.mlp.up_proj.weight has shape [65, 32], the config says [64, 32]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("changes,message", [
    (dict(attention_bias=True), "attention_bias = True: biases on attention without the MLP's"),
    (dict(mlp_bias=True), "mlp_bias = True: biases on attention without the MLP's (or the reverse)"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu': only silu"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}),
     "rope_parameters.rope_type = 'llama3': RoPE scaling is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type = 'linear'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
     "rope_parameters.partial_rotary_factor = 0.5"),
    (dict(rope_theta=500000.0), "rope_parameters.rope_theta = 10000.0: contradicts rope_theta = 500000.0"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16),
     "sliding_window = 16: sliding-window attention is not supported"),
    (dict(use_qk_norm=True), "use_qk_norm = True: not understood by the Llama import"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config = {'quant_method'"),
    (dict(model_type="gpt2"), "LlamaForCausalLM is not GPT-2's causal LM"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification is not a Llama causal LM"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings = True, but lm_head.weight differs"),
], ids=["attention_bias", "mlp_bias", "gelu", "llama3_rope", "linear_rope", "partial_rope", "theta_contradiction",
        "sliding_window", "qk_norm", "quantized", "gpt2", "classifier", "tie_with_own_head"])
def test_config_fields_the_import_cannot_honour_are_refused_by_name(tmp_path, capsys, changes, message):
    tok = fx.word_tokenizer()
    src = fx.save(fx.random_llama(tok, seed=2, hidden=32, heads=4, kv_heads=2, layers=2), tok, str(tmp_path / "src"))
    _edit_config(src, **changes)
    assert convert_from_hf.main(["--load", src, "--save", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not os.path.exists(tmp_path / "c")


def test_an_inactive_sliding_window_and_metadata_fields_import(tmp_path):
    """Mistral with no window (or one as long as the context) is the Llama function; generation defaults
    and token ids saved by older transformers versions do not change it."""
    tok = fx.word_tokenizer()
    hf = fx.random_llama(tok, seed=2, hidden=32, heads=4, kv_heads=2, layers=2)
    src = fx.save(hf, tok, str(tmp_path / "src"))
    _edit_config(src, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=128,
                 num_beams=1, top_k=50, pretraining_tp=1, rope_scaling=None)
    ckpt = str(tmp_path / "c")
    assert convert_from_hf.main(["--load", src, "--save", ckpt]) == 0
    full, cfg, _ = hf_checkpoint.read_checkpoint(ckpt)
    model = GPTModel(cfg).eval()
    model.load_state_dict(full)
    ids = _tokens(cfg, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :len(tok)], hf(ids).logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the export: every tensor, the real vocabulary
def test_export_refuses_what_no_hf_class_can_hold(tmp_path, capsys):
    from megatron_slung.model import hf_llama

    cfg = _config(num_layers=2)
    sd = GPTModel(cfg).state_dict()
    with pytest.raises(ValueError, match="decoder.layers.0.self_attention.linear_qkv.bias have no place"):
        hf_llama.to_hf_state_dict({**sd, "decoder.layers.0.self_attention.linear_qkv.bias": torch.zeros(128)}, cfg)
    # A model no HF class holds (learned positions with RMSNorm and SwiGLU), recorded as the trainer records it.
    odd = _config(num_layers=2, position_embedding_type="learned_absolute")
    ckpt = str(tmp_path / "odd")
    hf_checkpoint.write_checkpoint(ckpt, GPTModel(odd).state_dict(), odd, unpadded_vocab_size=320)
    assert convert_to_hf.main(["--load", ckpt, "--output", str(tmp_path / "hf")]) == 2
    assert "--position-embedding-type learned_absolute (Llama/Qwen2 use RoPE)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")
    # An older trainer checkpoint (no architecture record) whose arguments name such a flag: it was accepted
    # and ignored then, so the model is the Llama it was, and exports as one.
    ckpt = _trainer_layout_checkpoint(tmp_path / "ckpt", cfg, {"tokenizer_type": "NullTokenizer", "vocab_size": 320,
                                                                "position_embedding_type": "learned_absolute"})
    assert convert_to_hf.main(["--load", ckpt, "--output", str(tmp_path / "old")]) == 0


def _trainer_layout_checkpoint(path, cfg, extra_args, model=None):
    """A checkpoint as the trainer writes it: mp_rank files with the module only, the arguments beside."""
    model = model or GPTModel(cfg)
    tag_dir = path / "iter_0000001"
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "dp_world_size": 1, "mp_world_size": 1},
               tag_dir / "mp_rank_00_model_states.pt")
    args = {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                         "num_query_groups", "max_position_embeddings", "norm_epsilon",
                                         "untie_embeddings_and_output_weights")}
    args.update(padded_vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
                **extra_args)
    torch.save({"format_version": 1, "iteration": 1, "args_json": json.dumps(args)}, tag_dir / "slung_state.pt")
    (path / "latest").write_text("iter_0000001\n")
    return str(path)


def test_export_keeps_only_the_tokenizers_vocabulary_and_generate_never_emits_padding(tmp_path):
    # A NullTokenizer run with --vocab-size 499: the trainer padded it to 512 rows (random like the others).
    cfg = _config(num_layers=2, vocab_size=512)
    model = GPTModel(cfg).eval()
    ckpt = _trainer_layout_checkpoint(tmp_path / "ckpt", cfg, {"tokenizer_type": "NullTokenizer", "vocab_size": 499},
                                      model)
    out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--load", ckpt, "--output", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 499
    from safetensors.torch import load_file

    assert load_file(os.path.join(out, "model.safetensors"))["model.embed_tokens.weight"].shape == (499, 64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokens = _tokens(GPTConfig(**{**cfg.to_dict(), "vocab_size": 499}), (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[..., :499], rtol=0, atol=1e-5)
        # The random model is nearly uniform over its rows: 13 of 512 were padding, so sampling 400 tokens
        # from the padded export emitted some with near certainty.
        torch.manual_seed(0)
        gen = hf.generate(tokens[:, :3].repeat(4, 1), do_sample=True, max_new_tokens=50, top_k=0, pad_token_id=0)
    assert gen.shape[1] == 53 and int(gen.max()) < 499


def test_export_vocabulary_from_the_tokenizer_or_a_flag_never_a_guess(tmp_path, spm_model, capsys):
    from megatron_slung.eval import common

    cfg = _config(num_layers=2, vocab_size=384)  # the 320-piece SentencePiece model padded to 128
    model = GPTModel(cfg).eval()
    ckpt = str(tmp_path / "ckpt")
    hf_checkpoint.write_checkpoint(ckpt, model.state_dict(), cfg, 1, 1,
                                   tokenizer={"type": "SentencePieceTokenizer", "model": spm_model})
    out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--load", ckpt, "--output", out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.vocab_size == 320 and hf.lm_head.weight.shape[0] == 320
    # The evaluations' in-memory conversion (--model CKPT) keeps the same rows.
    evaluated, tok = common.load_model(ckpt)
    assert evaluated.config.vocab_size == 320 and len(tok) == 320
    ids = _tokens(GPTConfig(**{**cfg.to_dict(), "vocab_size": 320}))
    with torch.no_grad():
        torch.testing.assert_close(evaluated(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)
    # No tokenizer and no record: refused, naming the flags; --vocab-size says it.
    bare = str(tmp_path / "bare")
    hf_checkpoint.write_checkpoint(bare, model.state_dict(), cfg, 1, 1)
    assert convert_to_hf.main(["--load", bare, "--output", str(tmp_path / "o")]) == 2
    assert "the real vocabulary size is not known" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    assert convert_to_hf.main(["--load", bare, "--output", str(tmp_path / "o"), "--vocab-size", "300"]) == 0
    assert json.load(open(tmp_path / "o" / "config.json"))["vocab_size"] == 300
    # A trainer checkpoint whose tokenizer does not pad to its rows: not the tokenizer it was trained with.
    wrong = _trainer_layout_checkpoint(tmp_path / "wrong", _config(num_layers=2, vocab_size=512),
                                       {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm_model})
    assert convert_to_hf.main(["--load", wrong, "--output", str(tmp_path / "o2")]) == 2
    assert "the tokenizer has 320 tokens, which pads to 384" in capsys.readouterr().err


@pytest.mark.parametrize("copy_tokenizer", [True, False], ids=["with_tokenizer", "no_tokenizer"])
def test_padded_vocabulary_round_trip(tmp_path, copy_tokenizer):
    """HF (499 tokens) -> checkpoint (padded to 512 for TP=2) -> HF: 499 rows again, the same logits."""
    tok = fx.word_tokenizer([f"w{i}" for i in range(494)])
    assert len(tok) == 499
    hf = fx.random_llama(tok, seed=5, hidden=32, heads=4, kv_heads=2, layers=2)
    src = fx.save(hf, tok, str(tmp_path / "src"))
    ckpt = str(tmp_path / "ckpt")
    argv = ["--load", src, "--save", ckpt, "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "128"]
    assert convert_from_hf.main(argv + ([] if copy_tokenizer else ["--no-tokenizer"])) == 0
    assert hf_checkpoint.read_checkpoint(ckpt)[1].vocab_size == 512
    out = str(tmp_path / "back")
    assert convert_to_hf.main(["--load", ckpt, "--output", out]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert back.config.vocab_size == 499 and back.lm_head.weight.shape == (499, 32)
    ids = torch.randint(0, 499, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
