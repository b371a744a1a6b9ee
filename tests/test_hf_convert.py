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
    # Back to HF: the tokenizer copied into the checkpoint comes along; logits over the real vocabulary match.
    out = str(tmp_path / "back")
    assert convert_to_hf.main(["--load", ckpt, "--output", out]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert back_tok.get_vocab() == tok.get_vocab()
    ids = torch.tensor([tok("hello you are so kind", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits[..., :26], hf(ids).logits, rtol=0, atol=1e-6)
    for name, t in hf_sd.items():
        if "embed_tokens" not in name and "lm_head" not in name:
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
