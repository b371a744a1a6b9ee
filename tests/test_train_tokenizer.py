"""tools/train_tokenizer.py: special tokens as single pieces, determinism, BPE and unigram, text input."""

import json

import pytest

from megatron_slung.data.tokenizers import SentencePieceTokenizer
from tests.data_tools_fixtures import corpus_file, corpus_records, run_tool, sp_model  # noqa: F401


def test_special_tokens_and_lossless(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert [tok.id_to_token(i) for i in range(5)] == ["<unk>", "<s>", "<|endoftext|>", "<|pad|>", "<|potentially_unsafe|>"]
    assert tok.eod == 2 == tok.sp.eos_id() and tok.pad == 3 == tok.sp.pad_id()  # what Megatron-LM reads as EOD
    assert all(tok.sp.is_control(i) for i in (1, 2, 3, 4))  # single pieces that text cannot produce
    assert tok._lossless


def test_deterministic(tmp_path, corpus_file, sp_model):
    run_tool("train_tokenizer.py", "--input", corpus_file, "--output-prefix", tmp_path / "again", "--vocab-size", 1200)
    assert (tmp_path / "again.model").read_bytes() == open(sp_model, "rb").read()
    vocab = (tmp_path / "again.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 1200 and vocab[2].startswith("<|endoftext|>\t")


def test_unigram_text_input_custom_tags(tmp_path, corpus_records):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(r["text"] for r in corpus_records), encoding="utf-8")
    proc = run_tool("train_tokenizer.py", "--input", text, "--output-prefix", tmp_path / "uni", "--vocab-size", 700,
                    "--model-type", "unigram", "--harm-tag", "<unsafe>", "--special-tokens", "<|sys|>",
                    "--max-sentences", 400)
    assert "vocab 700" in proc.stdout
    tok = SentencePieceTokenizer(str(tmp_path / "uni.model"))
    assert tok.token_to_id("<unsafe>") == 4 and tok.token_to_id("<|sys|>") == 5
    assert tok.token_to_id("<|potentially_unsafe|>") is None
    assert tok.detokenize(tok.tokenize("Zürich 😀 东京")) == "Zürich 😀 东京"


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', ":2: malformed JSON"),
    ('{"body": "ok"}\n', ":1: missing key 'text'"),
    ("", "no text found"),
])
def test_bad_input(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    proc = run_tool("train_tokenizer.py", "--input", path, "--output-prefix", tmp_path / "m", "--vocab-size", 300,
                    check=False)
    assert proc.returncode == 1 and message in proc.stderr
    assert not list(tmp_path.glob("m.*"))


def test_vocabulary_too_large(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"text": "just a few words here"}) + "\n")
    proc = run_tool("train_tokenizer.py", "--input", path, "--output-prefix", tmp_path / "m", "--vocab-size", 5000,
                    "--hard-vocab-limit", check=False)
    assert proc.returncode == 1 and "SentencePiece training failed" in proc.stderr
    assert not list(tmp_path.glob("m.*"))
