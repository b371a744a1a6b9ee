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


def test_hf_export_gives_the_same_ids_tokens_and_risk(tmp_path, corpus_file, corpus_records):
    """The exported Hugging Face tokenizer agrees with SentencePiece on ids, and preprocessing with either
    writes the same tokens and the same risk levels (two independent offset paths: bytes vs characters)."""
    from megatron_slung.data.preprocess import PreprocessOptions, preprocess
    from megatron_slung.data.tokenizers import HuggingFaceTokenizer
    from tests.data_tools_fixtures import MULTIBYTE_TEXTS, write_jsonl

    run_tool("train_tokenizer.py", "--input", corpus_file, "--output-prefix", tmp_path / "bpe", "--vocab-size", 1200,
             "--hf-export", tmp_path / "hf")
    sp = SentencePieceTokenizer(str(tmp_path / "bpe.model"))
    hf = HuggingFaceTokenizer(str(tmp_path / "hf"))
    assert (hf.vocab_size, hf.eod, hf.pad) == (sp.vocab_size, sp.eod, sp.pad)
    texts = MULTIBYTE_TEXTS + [r["text"] for r in corpus_records] + ["<|endoftext|> is text", "  x  "]
    for text in texts:
        assert hf.tokenize(text) == sp.tokenize(text), text
    recs = []
    for text in texts[:120]:
        n = len(text)
        recs.append({"text": text, "risk_spans": [[n // 5, n // 2, 3], [n // 2, (3 * n) // 4, 4]] if n > 4 else []})
    path = write_jsonl(tmp_path / "in.jsonl", recs)
    outs = []
    for kind, model in (("SentencePieceTokenizer", str(tmp_path / "bpe.model")), ("HuggingFaceTokenizer", str(tmp_path / "hf"))):
        preprocess(path, str(tmp_path / kind), PreprocessOptions(tokenizer_type=kind, tokenizer_model=model, append_eod=True))
        outs.append([open(f"{tmp_path / kind}_text_document{ext}", "rb").read() for ext in (".bin", ".idx", ".risk.bin")])
    assert outs[0] == outs[1]


def test_hf_export_refuses_unigram(tmp_path, corpus_file):
    proc = run_tool("train_tokenizer.py", "--input", corpus_file, "--output-prefix", tmp_path / "u", "--vocab-size", 500,
                    "--model-type", "unigram", "--hf-export", tmp_path / "hf", check=False)
    assert proc.returncode == 1 and "bpe only" in proc.stderr and not list(tmp_path.iterdir())
