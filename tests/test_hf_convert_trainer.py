"""Model exchange with the real trainer: its checkpoints export to HF with the same logits, and an HF import
loads into `--load CKPT --finetune` with exactly the HF model's weights (its first loss is the HF model's)."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_slung.model import hf_checkpoint  # noqa: E402
from megatron_slung.model.gpt import GPTModel  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.pretrain_helpers import TINY, pretrain_body, read_jsonl, run_cli, train_records  # noqa: E402
from tools import convert_from_hf, convert_to_hf  # noqa: E402


def _export_and_compare(ckpt, out):
    full, cfg, meta = hf_checkpoint.read_checkpoint(str(ckpt))
    assert meta["args"]["num_layers"] == 4 and cfg.vocab_size == 256
    model = GPTModel(cfg).eval()
    model.load_state_dict(full)
    assert convert_to_hf.main(["--load", str(ckpt), "--output", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
    return hf, full


def test_trainer_checkpoint_exports_and_an_import_finetunes(tmp_path):
    save = tmp_path / "ckpt"
    run = run_cli(TINY + ["--train-iters", "2", "--save", save])
    assert run.returncode == 0, run.stderr[-3000:]
    hf, trained = _export_and_compare(save, tmp_path / "hf")
    fresh = GPTModel(hf_checkpoint.read_checkpoint(str(save))[1]).state_dict()
    assert not torch.equal(fresh["decoder.layers.0.mlp.linear_fc1.weight"], trained["decoder.layers.0.mlp.linear_fc1.weight"])

    # Import the export and fine-tune from it: iteration 1's loss is the HF model's loss on the first batch.
    imported = tmp_path / "imported"
    assert convert_from_hf.main(["--load", str(tmp_path / "hf"), "--save", str(imported)]) == 0
    metrics = tmp_path / "m.jsonl"
    run = run_cli(TINY + ["--train-iters", "1", "--lr-warmup-iters", "0", "--load", imported, "--finetune",
                          "--metrics-jsonl", metrics])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded the weights of" in run.stdout
    rec = train_records(read_jsonl(metrics))[0]

    from megatron_slung.loss import masked_cross_entropy_reference
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.training.data import MockGPTDataset, to_micro_batch

    args = parse_args(TINY + ["--train-iters", "1", "--lr-warmup-iters", "0"], world_size=1)
    data = MockGPTDataset(8, 32, 256, seed=args.seed)
    batch = to_micro_batch({k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]})
    with torch.no_grad():
        logits = hf(batch.tokens).logits
    out = masked_cross_entropy_reference(logits.reshape(-1, 256), batch.labels.reshape(-1), batch.risk.reshape(-1),
                                         args.risk_loss_policy)
    assert rec["loss"] == pytest.approx(float(out.loss_sum / out.num_tokens), rel=1e-4)


def _train_body(rank, world_size, argv):
    return pretrain_body(rank, world_size, argv)


@pytest.mark.distributed
@pytest.mark.parametrize("flag,expect", [("--pipeline-model-parallel-size", "layer_05-model_00-model_states.pt"),
                                         ("--tensor-model-parallel-size", "mp_rank_01_model_states.pt")],
                         ids=["pp2", "tp2"])
def test_parallel_trainer_checkpoint_exports(tmp_path, flag, expect):
    """A PP=2 run's DeepSpeed pipeline files (layer_XX-model_00) and a TP=2 run's mp_rank shards export
    with the same logits."""
    save = tmp_path / "ckpt"
    argv = [str(a) for a in TINY + ["--train-iters", "2", flag, "2", "--save", save]]
    run_distributed(_train_body, 2, args=(argv,))
    tag_dir = save / (save / "latest").read_text().strip()
    assert os.path.isfile(tag_dir / expect)
    _export_and_compare(save, tmp_path / "hf")


# --------------------------------------------------------------------------- the checkpoint's architecture
def _import_llama(tmp_path, vocab=256, **config):
    """A tiny random HF Llama with TINY's shapes (rope_theta 500000, eps 1e-6, tied), imported as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500000.0,
                  tie_word_embeddings=True)
    values.update(config)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**values)).save_pretrained(str(tmp_path / "hf_src"))
    ckpt = tmp_path / "imported"
    assert convert_from_hf.main(["--load", str(tmp_path / "hf_src"), "--save", str(ckpt)]) == 0
    return ckpt


def _with_vocab(args, vocab):
    args = list(args)
    args[args.index("--vocab-size") + 1] = str(vocab)
    return args


def test_finetuning_an_import_adopts_its_rotary_base_and_exports_it(tmp_path):
    """No --rotary-base on the command line: the imported Llama's 500000 is used (one line says so) and the
    export says rope_theta 500000 (it trained and exported 10000 before)."""
    import json

    ckpt = _import_llama(tmp_path)
    run = run_cli(TINY + ["--train-iters", "2", "--load", ckpt, "--finetune", "--save", tmp_path / "tuned"])
    assert run.returncode == 0, run.stderr[-3000:]
    adopted = [line for line in run.stdout.splitlines() if line.startswith("model settings from the checkpoint")]
    assert len(adopted) == 1, run.stdout
    assert "--rotary-base 500000.0" in adopted[0] and "--norm-epsilon 1e-06" in adopted[0]
    assert convert_to_hf.main(["--load", str(tmp_path / "tuned"), "--output", str(tmp_path / "hf_out")]) == 0
    cfg = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-6 and cfg["tie_word_embeddings"] is True


def test_a_model_flag_that_contradicts_the_checkpoint_is_refused(tmp_path):
    ckpt = _import_llama(tmp_path)
    run = run_cli(TINY + ["--train-iters", "2", "--load", ckpt, "--finetune", "--rotary-base", "10000"])
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "--rotary-base 10000.0 contradicts the checkpoint, whose model has rotary_base = 500000.0" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_imported_vocabulary_of_499_is_adopted_or_the_flag_to_set_is_named(tmp_path):
    """convert_from_hf keeps 499 rows (--make-vocab-size-divisible-by 1); the trainer's default 128 would pad
    to 512 and DeepSpeed failed with a size dump."""
    ckpt = _import_llama(tmp_path, vocab=499)
    args = _with_vocab(TINY, 499) + ["--train-iters", "2", "--load", ckpt, "--finetune"]
    run = run_cli(args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vocabulary: the checkpoint's 499 rows (saved with --make-vocab-size-divisible-by 1)" in run.stdout
    assert "(padded 499)" in run.stdout
    run = run_cli(args + ["--make-vocab-size-divisible-by", "128"])
    assert run.returncode == 2, run.stderr[-3000:]
    assert ("--make-vocab-size-divisible-by 128 pads the tokenizer's 499 tokens to 512 rows at TP 1, but the "
            "checkpoint has 499" in run.stderr)
    assert "pass --make-vocab-size-divisible-by 1" in run.stderr and "Traceback" not in run.stderr


def test_trainer_checkpoint_with_a_padded_vocabulary_exports_the_real_one(tmp_path):
    """--vocab-size 499 pads to 512 rows in the trainer (divisible by 128); the export has 499 and the same
    logits over them (it had 512 rows before, and sampling emitted ids that decode to nothing)."""
    argv = [a if a != "256" else "499" for a in TINY]
    save = tmp_path / "ckpt"
    run = run_cli(argv + ["--train-iters", "2", "--save", save])
    assert run.returncode == 0, run.stderr[-3000:]
    full, cfg, meta = hf_checkpoint.read_checkpoint(str(save))
    assert cfg.vocab_size == 512 and meta["args"]["padded_vocab_size"] == 512
    model = GPTModel(cfg).eval()
    model.load_state_dict(full)
    out = tmp_path / "hf"
    assert convert_to_hf.main(["--load", str(save), "--output", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert hf.config.vocab_size == 499 and hf.lm_head.weight.shape[0] == 499
    tokens = torch.randint(0, 499, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)[..., :499]).abs().max().item() <= 1e-4
