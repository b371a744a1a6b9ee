"""Tokenizers: special tokens, lossless round trips, character offsets with multi-byte UTF-8, the
SentencePiece word cache against the plain encoder, and the padded vocabulary size."""

import numpy as np
import pytest

from megatron_slung.data.tokenizers import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    byte_to_char_offsets,
    char_to_byte_offsets,
    pad_vocab_size,
)
from tests.data_tools_fixtures import (  # noqa: F401  (fixtures)
    MULTIBYTE_TEXTS,
    corpus_file,
    corpus_records,
    hf_tokenizer_dir,
    sp_model,
)

TRICKY = MULTIBYTE_TEXTS + ["lead", " lead", "trail ", "   ", "x" * 300, "a\u2581b \u2581 c", "<|endoftext|> literal",
                            "1234567 89", "e\u0301t\u00e9", "ﬁ Ａ ½", "abc \x00abc", " \x00abc x", "  x  y  "]


def test_pad_vocab_size():
    assert pad_vocab_size(50257, 128, 1) == 50304  # GPT-2's padded size in Megatron
    assert pad_vocab_size(50257, 128, 8) == 51200  # multiple of 128 * 8
    assert pad_vocab_size(32000, 128, 1) == 32000
    assert pad_vocab_size(1, 64, 2) == 128
    with pytest.raises(ValueError):
        pad_vocab_size(0, 128, 1)


def test_byte_char_offset_conversion():
    text = "aé東😀b"  # 1 + 2 + 3 + 4 + 1 bytes
    starts = np.array([0, 1, 2, 3, 6, 7, 8, 10])
    ends = np.array([1, 3, 3, 6, 7, 10, 10, 11])
    s, e = byte_to_char_offsets(text, starts, ends)
    # a byte inside a character widens to that whole character
    assert s.tolist() == [0, 1, 1, 2, 3, 3, 3, 4]
    assert e.tolist() == [1, 2, 2, 3, 4, 4, 4, 5]
    assert char_to_byte_offsets(text, [0, 1, 2, 3, 4, 5]).tolist() == [0, 1, 3, 6, 10, 11]


# ------------------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_specials(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert tok.vocab_size == 1200
    assert tok.eod == tok.token_to_id("<|endoftext|>") == 2
    assert tok.pad == tok.token_to_id("<|pad|>") == 3
    assert tok.token_to_id("<|potentially_unsafe|>") == 4
    assert tok.token_to_id("no-such-piece-xyz") is None
    # Special tokens are control symbols: literal text can never produce them.
    ids = tok.tokenize("<|endoftext|> and <|potentially_unsafe|>")
    assert not {2, 3, 4} & set(ids)
    assert tok.detokenize(ids) == "<|endoftext|> and <|potentially_unsafe|>"


def test_sentencepiece_lossless_round_trip(sp_model, corpus_records):
    tok = SentencePieceTokenizer(sp_model)
    assert tok._lossless and tok.word_cache
    for text in TRICKY + [r["text"] for r in corpus_records[:50]]:
        if "\u2581" not in text:
            assert tok.detokenize(tok.tokenize(text)) == text
    # SentencePiece's one loss: a literal '▁' (its space marker) comes back as a space.
    assert tok.detokenize(tok.tokenize("a\u2581b")) == "a b"


def test_sentencepiece_word_cache_matches_plain_encoder(sp_model, corpus_records):
    cached = SentencePieceTokenizer(sp_model)
    plain = SentencePieceTokenizer(sp_model, word_cache=False)
    texts = TRICKY + [r["text"] for r in corpus_records]
    got = cached.tokenize_batch(texts)
    assert cached.cache_misses < cached.cache_lookups  # the cache was actually used
    want = [np.asarray(plain.sp.encode(t, out_type=int), dtype=np.int32) for t in texts]
    for t, a, b in zip(texts, got, want):
        assert np.array_equal(a, b), t
    # a second pass (all hits) and a tiny cache (resets) give the same
    tiny = SentencePieceTokenizer(sp_model, max_cache_words=10)
    for batch in (texts[:40], texts[40:120], texts[120:]):
        for a, b in zip(tiny.tokenize_batch(batch), cached.tokenize_batch(batch)):
            assert np.array_equal(a, b)


def _check_offsets(tok, text, ids, offsets, surface_of, partial_bytes):
    """Offsets are character spans, in order; whole tokens cover exactly their own text; a token holding
    part of a multi-byte character covers the fewest whole characters that contain its bytes (or, for
    SentencePiece's leading byte pieces, nothing)."""
    assert len(ids) == len(offsets)
    prev_start = 0
    for k, (tid, (s, e)) in enumerate(zip(ids, offsets)):
        assert 0 <= s <= e <= len(text), (text, k, s, e)
        assert s >= prev_start
        prev_start = s
        raw = partial_bytes(tid)
        if raw is not None:
            if e > s:
                assert raw in text[s:e].encode("utf-8"), (text, k, raw, s, e)
                assert raw not in text[s + 1 : e].encode("utf-8") and raw not in text[s : e - 1].encode("utf-8")
        else:
            assert text[s:e] == surface_of(k, tid), (text, k, tok.id_to_token(tid), s, e)


def _gpt2_byte_alphabet():
    """Byte-level BPE writes byte b as a printable character; this is that table, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def test_sentencepiece_offsets_multibyte(sp_model, corpus_records):
    tok = SentencePieceTokenizer(sp_model)

    def byte_of(tid):  # byte-fallback pieces are named <0xNN>
        return int(tok.id_to_token(tid)[3:5], 16) if tok.sp.is_byte(tid) else None

    def surface(k, tid):
        if byte_of(tid) is not None:
            return chr(byte_of(tid))  # an ASCII character with no piece of its own
        s = tok.id_to_token(tid).replace("\u2581", " ")
        return s[1:] if k == 0 and s.startswith(" ") else s  # the dummy prefix stands for no character

    def partial(tid):
        return bytes([byte_of(tid)]) if byte_of(tid) is not None and byte_of(tid) >= 0x80 else None

    texts = TRICKY + [r["text"] for r in corpus_records[-10:]]
    for text, (ids, offsets) in zip(texts, tok.tokenize_batch_with_offsets(texts)):
        if "\u2581" in text:
            continue  # a literal '▁' reads as a space in piece strings; checked against SentencePiece below
        _check_offsets(tok, text, ids.tolist(), offsets.tolist(), surface, partial)
        # single-text API agrees with the batch API
        ids1, offs1 = tok.tokenize_with_offsets(text)
        assert ids1 == ids.tolist() and offs1 == [tuple(o) for o in offsets.tolist()]
    # The numpy (piece-length) offsets agree with SentencePiece's own, except where SentencePiece gives
    # the leading byte pieces of a split character an empty span.
    plain = SentencePieceTokenizer(sp_model, word_cache=False)
    for text, (ids, offs), (ids2, offs2) in zip(texts, tok.tokenize_batch_with_offsets(texts),
                                                 plain._sp_offsets(texts, in_bytes=False)):
        assert np.array_equal(ids, ids2)
        for tid, a, b in zip(ids.tolist(), offs.tolist(), offs2.tolist()):
            if not tok.sp.is_byte(tid):
                assert a == b, (text, tok.id_to_token(tid), a, b)
            else:
                assert b[0] == a[0] and b[1] in (a[0], a[1])


def test_sentencepiece_unigram_and_normalising_models(tmp_path, corpus_records):
    """A model with NFKC normalisation and whitespace removal is not lossless: offsets come from
    SentencePiece itself and the word cache is off; a unigram model works like BPE."""
    import sentencepiece as spm

    texts = [r["text"] for r in corpus_records[:200]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "nfkc"), vocab_size=300,
                                   model_type="unigram", minloglevel=2, num_threads=1)
    tok = SentencePieceTokenizer(str(tmp_path / "nfkc.model"))
    assert not tok._lossless and not tok.word_cache
    assert tok.eod == tok.sp.eos_id()  # no <|endoftext|>: falls back to </s>
    assert tok.pad is None
    text = "ﬁne  Ａpple   x"  # NFKC changes ﬁ and Ａ, spaces collapse
    ids, offsets = tok.tokenize_with_offsets(text)
    assert ids == tok.sp.encode(text, out_type=int)
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert offsets[-1][1] == len(text)


# ------------------------------------------------------------------------------------- Hugging Face


def test_huggingface_directory_and_file(hf_tokenizer_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert tok.eod == tok.token_to_id("<|endoftext|>") == 0
    assert tok.pad == 1
    assert tok.vocab_size == 800
    tok2 = HuggingFaceTokenizer(f"{hf_tokenizer_dir}/tokenizer.json")
    assert tok2.tokenize("café 😀") == tok.tokenize("café 😀")
    assert tok.token_to_id("definitely-not-a-token") is None
    for text in TRICKY:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_huggingface_offsets_multibyte(hf_tokenizer_dir):
    tok = HuggingFaceTokenizer(hf_tokenizer_dir)
    alphabet = _gpt2_byte_alphabet()

    def partial(tid):
        if "\ufffd" not in tok.detokenize([tid]):
            return None
        return bytes(alphabet[c] for c in tok.id_to_token(tid))

    for text in TRICKY:
        ids, offsets = tok.tokenize_with_offsets(text)

        _check_offsets(tok, text, ids, offsets, lambda k, tid: tok.detokenize([tid]), partial)
        covered = sorted({i for s, e in offsets for i in range(s, e)})
        assert covered == list(range(len(text)))  # byte-level BPE covers every character


def test_missing_paths_and_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="local"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_tokenizer("HuggingFaceTokenizer", "gpt2")  # a hub name is never fetched
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("BertWordPieceCase", "x")


def test_huggingface_special_tokens_are_not_read_from_text(hf_tokenizer_dir):
    tok = HuggingFaceTokenizer(hf_tokenizer_dir)
    assert tok.eod not in tok.tokenize("a <|endoftext|> b")
    matching = HuggingFaceTokenizer(hf_tokenizer_dir, special_tokens_in_text=True)
    assert matching.eod in matching.tokenize("a <|endoftext|> b")


def test_word_cache_survives_hash_collisions(sp_model, corpus_records, monkeypatch):
    """With a hash that collides all the time (segment length only), the byte check and the exact side
    table still give SentencePiece's ids."""
    from megatron_slung.data import tokenizers

    monkeypatch.setattr(tokenizers._WordTable, "hashes",
                        lambda self, data, starts, ends: (ends - starts).astype(np.uint64))
    weak = SentencePieceTokenizer(sp_model)
    assert weak.word_cache
    plain = SentencePieceTokenizer(sp_model, word_cache=False)
    texts = TRICKY + [r["text"] for r in corpus_records[:80]]
    for batch in (texts[:30], texts[30:], texts):  # the second and third passes hit the table
        for a, b in zip(weak.tokenize_batch(batch), plain.tokenize_batch(batch)):
            assert np.array_equal(a, b)
    assert len(weak._table.exact) > 100
