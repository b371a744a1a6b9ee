"""Megatron's GPT2BPETokenizer, NullTokenizer and TikTokenizer: round trips, Megatron's special-token ids, and the
same ids from tools/preprocess_data.py as from the trainer's tokenizer (same flags in both)."""

import base64
import json

import pytest

from megatron_slung.data.indexed_dataset import IndexedDataset, risk_prefix
from megatron_slung.data.tokenizers import build_tokenizer
from megatron_slung.training.arguments import ArgumentError, parse_args
from megatron_slung.training.data import build_tokenizer_for_args, check_inputs
from tests.data_tools_fixtures import MULTIBYTE_TEXTS, run_tool, write_jsonl

TEXTS = ["the theme of the thesis", "hello there, the end", "Zürich 😀 ok"] + [t for t in MULTIBYTE_TEXTS if t]
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
        "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--split", "1,0,0", "--eval-iters", "0"]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A small GPT-2-style byte-level BPE (vocab.json + merges.txt) with <|endoftext|> at the end, like GPT-2's."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TEXTS * 20, vocab_size=300, min_frequency=2, special_tokens=[])
    out = tmp_path_factory.mktemp("gpt2")
    tok.save_model(str(out))
    vocab = json.loads((out / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    return str(out / "vocab.json"), str(out / "merges.txt")


# a tiny tiktoken file: the 256 bytes, then merges buildable from them
MERGES = [b"th", b"he", b"the", b" t", b" the", b"es", b"is", b"hesis", b"en", b"end"]


@pytest.fixture(scope="module")
def tiktoken_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiktoken")
    tokens = [bytes([b]) for b in range(256)] + MERGES
    native = out / "tiny.tiktoken"
    native.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    megatron = out / "tiny.json"
    megatron.write_text(json.dumps([{"rank": r, "token_bytes": base64.b64encode(t).decode(),
                                     "token_str": t.decode("utf-8", "replace")} for r, t in enumerate(tokens)]))
    return str(native), str(megatron)


def _gpt2_reference_encode(vocab_file, merge_file, text):
    """GPT-2's published encoder algorithm in plain Python (bytes -> unicode table, its regex, greedy lowest-rank
    merges), the reference the fast tokenizer is checked against."""
    import regex

    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    encoder = json.load(open(vocab_file, encoding="utf-8"))
    lines = open(merge_file, encoding="utf-8").read().split("\n")
    ranks = {tuple(line.split()): i for i, line in enumerate(m for m in lines[1:] if m.strip())}
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for piece in pattern.findall(text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
        ids += [encoder[w] for w in word]
    return ids


def test_gpt2_bpe_matches_gpt2s_encoder_and_megatrons_eod(gpt2_files):
    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert tok.vocab_size == len(json.load(open(vocab)))
    # Megatron: eod = encoder['<|endoftext|>'] (50256 in GPT-2's own files, the last id as here)
    assert tok.eod == json.load(open(vocab))["<|endoftext|>"] == tok.vocab_size - 1 and tok.pad is None
    for text in TEXTS + ["it's 12 o'clock <|endoftext|>"]:
        ids = tok.tokenize(text)
        assert ids == _gpt2_reference_encode(vocab, merges, text), text
        assert tok.detokenize(ids) == text
    assert tok.eod not in tok.tokenize("<|endoftext|>")  # text is text, as GPT-2's encoder does


def test_null_tokenizer_is_megatrons(tmp_path):
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod, tok.pad) == (100, 99, None)
    assert tok.tokenize("3 5  7\n99") == [3, 5, 7, 99]
    assert tok.detokenize([3, 5, 7]) == "3 5 7"
    ids, offsets = tok.tokenize_with_offsets("12 3")
    assert ids == [12, 3] and offsets == [(0, 2), (3, 4)]
    for bad in ("100", "-1", "x"):
        with pytest.raises(ValueError, match="not a token id"):
            tok.tokenize(bad)


@pytest.mark.parametrize("fmt", ["tiktoken", "megatron_json"])
def test_tiktokenizer_layout_round_trip_and_eod(tiktoken_files, fmt):
    path = tiktoken_files[0 if fmt == "tiktoken" else 1]
    tok = build_tokenizer("TikTokenizer", path, tiktoken_num_special_tokens=16)
    assert tok.vocab_size == 16 + 256 + len(MERGES)  # the file's size (below Megatron's 2**17 default)
    # Megatron's layout: <unk> <s> </s> <mask> <pad> <cls> <sep>, fillers, then the BPE ranks shifted
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")] == list(range(7))
    assert tok.token_to_id("<SPECIAL_9>") == 9 and tok.eod == 2 and tok.pad == 4
    assert tok.tokenize(" the") == [16 + 256 + MERGES.index(b" the")]
    assert tok.tokenize("a") == [16 + ord("a")]
    assert tok.tokenize("x</s>") == [16 + ord("x"), 2]  # as in Megatron: special tokens in text are special
    for text in TEXTS:
        assert tok.detokenize(tok.tokenize(text)) == text
        ids, offsets = tok.tokenize_with_offsets(text)
        assert "".join(text[s:e] for s, e in offsets if e > s) == text or not text.isascii()
    # the two file formats give the same ids; pattern v1 is another split
    other = build_tokenizer("TikTokenizer", tiktoken_files[1 - (fmt != "tiktoken")], tiktoken_num_special_tokens=16)
    assert all(tok.tokenize(t) == other.tokenize(t) for t in TEXTS)
    v1 = build_tokenizer("TikTokenizer", path, tiktoken_pattern="v1", tiktoken_num_special_tokens=16)
    assert all(v1.detokenize(v1.tokenize(t)) == t for t in TEXTS)
    # --vocab-size keeps the first ranks (Megatron's cut); more than the file holds is refused
    small = build_tokenizer("TikTokenizer", path, tiktoken_num_special_tokens=16, vocab_size=16 + 256)
    assert small.vocab_size == 272 and small.tokenize(" the") == [16 + ord(" "), 16 + ord("t"), 16 + ord("h"), 16 + ord("e")]
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("TikTokenizer", path, tiktoken_num_special_tokens=16, vocab_size=10**6)
    with pytest.raises(ValueError, match="must include"):
        build_tokenizer("TikTokenizer", path, tiktoken_num_special_tokens=16, special_tokens=["<s>", "</s>"])


def _preprocess_and_train_args(tmp_path, flags, records):
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    prefix = tmp_path / "out"
    run_tool("preprocess_data.py", "--input", data, "--output-prefix", prefix, "--append-eod", *flags)
    ds = IndexedDataset(f"{prefix}_text_document")
    risk = IndexedDataset(risk_prefix(f"{prefix}_text_document"))
    args = parse_args(BASE + ["--data-path", f"{prefix}_text_document"] + flags, world_size=1)
    return ds, risk, args


def _cases(gpt2_files, tiktoken_files):
    vocab, merges = gpt2_files
    return {
        "GPT2BPETokenizer": (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges],
                             TEXTS),
        "TikTokenizer": (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", tiktoken_files[0],
                          "--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "16"], TEXTS),
        "NullTokenizer": (["--tokenizer-type", "NullTokenizer", "--vocab-size", "50"], ["1 2 3", "7 8 49 0", "5"]),
    }


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "TikTokenizer", "NullTokenizer"])
def test_preprocess_and_training_give_the_same_ids(tmp_path, gpt2_files, tiktoken_files, kind):
    flags, texts = _cases(gpt2_files, tiktoken_files)[kind]
    records = [{"text": t, "risk_spans": [[0, len(t), 3]] if i == 0 else []} for i, t in enumerate(texts)]
    ds, risk, args = _preprocess_and_train_args(tmp_path, flags, records)
    tok = build_tokenizer_for_args(args)
    assert ds.num_documents == len(texts)
    for i, text in enumerate(texts):
        ids = ds[i].tolist()
        assert ids == tok.tokenize(text) + [tok.eod]
        assert risk[i].tolist() == [3 if i == 0 else 0] * (len(ids) - 1) + [0]  # the EOD is level 0
    assert check_inputs(args).tokenizer.vocab_size == tok.vocab_size  # the trainer accepts the data


def test_tokenizer_flags_refused_where_they_mean_nothing(gpt2_files, tiktoken_files):
    vocab, merges = gpt2_files
    mock = BASE + ["--mock-data"]
    cases = [
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab], "--merge-file"),
        (["--vocab-file", vocab, "--merge-file", merges, "--vocab-size", "64"], "GPT2BPETokenizer"),
        (["--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--tiktoken-num-special-tokens", "8"],
         "TikTokenizer only"),
        (["--tokenizer-type", "BertWordPieceCase", "--tokenizer-model", vocab], "not supported"),
    ]
    for extra, message in cases:
        with pytest.raises(ArgumentError, match=message):
            parse_args(mock + extra, world_size=1)
    # Megatron's Llama example passes --tiktoken-pattern with NullTokenizer: accepted, with a warning
    with pytest.warns(UserWarning, match="no effect"):
        parse_args(mock + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--tiktoken-pattern", "v2"],
                   world_size=1)
    proc = run_tool("preprocess_data.py", "--input", "x.jsonl", "--output-prefix", "x", "--tokenizer-type",
                    "NullTokenizer", "--tokenizer-model", "m", check=False)
    assert proc.returncode != 0 and "--vocab-size" in proc.stderr
