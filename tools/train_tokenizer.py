#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram) from JSONL or plain text.

    python tools/train_tokenizer.py --input 'data/*.jsonl' --output-prefix runs/tok/spm \\
        --vocab-size 32000 --model-type bpe

writes ``runs/tok/spm.model`` and ``runs/tok/spm.vocab``, for ``--tokenizer-type SentencePieceTokenizer
--tokenizer-model runs/tok/spm.model``.

The model is lossless (identity normalisation, whitespace kept, unknown characters fall back to bytes),
so ``detokenize(tokenize(text)) == text`` and character offsets are exact. It has three special tokens,
each a single piece that ordinary text can never produce (SentencePiece control symbols): the
end-of-document ``<|endoftext|>`` (the tokenizer's ``eod``), the padding ``<|pad|>`` and the harmfulness
tag ``<|potentially_unsafe|>`` (``--harm-tag``), plus any ``--special-tokens``. Ids: 0 ``<unk>``, 1 ``<s>``,
2 ``<|endoftext|>`` (it is the model's EOS, so Megatron-LM, which takes EOS as end-of-document, agrees),
3 ``<|pad|>`` (the model's pad), 4 the harmfulness tag, then the other special tokens.

Deterministic: the same input and flags give the same model bytes (sentences are sampled with a
seeded RNG; training uses one thread unless --threads says otherwise).
"""

import argparse
import io
import os
import random
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.corpus import (  # noqa: E402
    InputError,
    atomic_output,
    decode_lines,
    expand_inputs,
    get_text,
    iter_records,
    read_chunks,
)
from megatron_slung.data.leftovers import remove_leftovers  # noqa: E402
from megatron_slung.data.tokenizers import EOD_TOKEN, HARM_TAG_TOKEN, PAD_TOKEN  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="files or globs: .jsonl/.json (.gz/.zst) or plain text")
    p.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="auto: .jsonl/.json (optionally compressed) are JSONL, anything else plain text (one sentence a line)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys whose text is used")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--eod-token", default=EOD_TOKEN)
    p.add_argument("--pad-token", default=PAD_TOKEN)
    p.add_argument("--harm-tag", default=HARM_TAG_TOKEN, help="the harmfulness tag token")
    p.add_argument("--special-tokens", nargs="*", default=[], help="more single-piece special tokens")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="train on at most this many lines (a seeded uniform sample); 0 = all")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines (in bytes) are skipped")
    p.add_argument("--no-split-digits", action="store_true", help="let digits merge into multi-digit pieces")
    p.add_argument("--hard-vocab-limit", action="store_true",
                   help="fail when the corpus is too small for --vocab-size (default: use a smaller vocabulary)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sentence sample")
    p.add_argument("--threads", type=int, default=1, help="SentencePiece training threads")
    p.add_argument("--hf-export", default=None, metavar="DIR",
                   help="also write a Hugging Face tokenizer (tokenizer.json + config) to DIR; BPE only, checked "
                        "to give the same ids as the SentencePiece model on the training sample")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    return p.parse_args(argv)


def _is_jsonl(path: str, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "jsonl"
    base = path[:-3] if path.endswith(".gz") else path[:-4] if path.endswith(".zst") else path
    return base.endswith((".jsonl", ".json"))


def iter_sentences(files, fmt: str, json_keys):
    """Yield training lines: every non-blank line of every document (SentencePiece trains on lines)."""
    for file_index, path in enumerate(files):
        jsonl = _is_jsonl(path, fmt)
        for chunk in read_chunks(path, file_index):
            if not jsonl:
                yield from (line.rstrip("\r") for line in decode_lines(chunk) if line.strip())
                continue
            for line_no, record in iter_records(chunk):
                for key in json_keys:
                    yield from (sub for sub in get_text(record, key, path, line_no).split("\n") if sub.strip())


def sample_sentences(sentences, limit: int, seed: int):
    """All sentences, or a seeded uniform sample of ``limit`` of them (reservoir sampling, order kept)."""
    if limit <= 0:
        return list(sentences), None
    rng = random.Random(seed)
    reservoir, seen = [], 0
    for s in sentences:
        if seen < limit:
            reservoir.append((seen, s))
        else:
            j = rng.randrange(seen + 1)
            if j < limit:
                reservoir[j] = (seen, s)
        seen += 1
    reservoir.sort()
    return [s for _, s in reservoir], seen


def export_hf(model_path: str, out_dir: str, check_texts, eod_token: str, pad_token: str) -> None:
    """Write the SentencePiece BPE model as a Hugging Face fast tokenizer that gives the same ids.

    SentencePiece BPE merges the adjacent pair whose concatenation is the best-scored piece; a BPE model
    whose merges are every two-piece split of each piece, ranked by that piece's score, does the same.
    The dummy prefix and the space mark are a normaliser; control pieces are special tokens that text
    never produces (``encode_special_tokens``). The result is checked on ``check_texts``.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_path)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges = []
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        merges += [(-sp.get_score(i), i, a, b) for a, b in splits]
    merges.sort(key=lambda m: (m[0], m[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges],
                               unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.encode_special_tokens = True  # like SentencePiece: the text "<|endoftext|>" is not the token
    for text in check_texts:
        want = sp.encode(text, out_type=int)
        got = tok.encode(text, add_special_tokens=False).ids
        if want != got:
            raise ValueError(f"--hf-export: the Hugging Face tokenizer differs from SentencePiece on {text[:60]!r}")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=sp.id_to_piece(sp.unk_id()),
                                 bos_token=sp.id_to_piece(sp.bos_id()), eos_token=eod_token, pad_token=pad_token)
    remove_leftovers([out_dir.rstrip("/") + ".tmp-"])  # what a killed earlier export left
    tmp = out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    hf.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def train(args) -> dict:
    import sentencepiece as spm

    files = expand_inputs(args.input)
    if args.hf_export and args.model_type != "bpe":
        raise ValueError("--hf-export supports --model-type bpe only (a unigram export would not give the same ids)")
    if not args.eod_token or not args.pad_token or args.eod_token == args.pad_token:
        raise ValueError("--eod-token and --pad-token must be two different, non-empty tokens")
    specials = []  # control symbols after SentencePiece's own unk/bos/eos/pad
    for tok in [args.harm_tag, *args.special_tokens]:
        if tok and tok not in specials and tok not in (args.eod_token, args.pad_token):
            specials.append(tok)
    start = time.time()
    sentences, seen = sample_sentences(iter_sentences(files, args.input_format, args.json_keys),
                                       args.max_sentences, args.seed)
    if not sentences:
        raise ValueError(f"no text found in {', '.join(files)}")
    print(f"[train_tokenizer] {len(sentences)} training lines"
          + (f" (sampled from {seen})" if seen is not None and seen > len(sentences) else "")
          + f" from {len(files)} file(s); training {args.model_type} with vocab {args.vocab_size}", file=sys.stderr)

    # Train from memory (an iterator in, bytes out), so no temporary path ends up inside the model.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        # The end-of-document token *is* the model's EOS and <|pad|> its pad piece, so any reader that
        # takes eos_id as end-of-document (Megatron-LM's SentencePieceTokenizer does) agrees with ours.
        eos_piece=args.eod_token,
        pad_id=3,
        pad_piece=args.pad_token,
        control_symbols=specials,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=not args.no_split_digits,
        max_sentence_length=args.max_sentence_length,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=args.hard_vocab_limit,
        num_threads=max(1, args.threads),
        minloglevel=0 if args.verbose else 2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # PREFIX.vocab (piece, score per line, as spm_train writes it), then PREFIX.model, each atomically.
    with atomic_output(args.output_prefix + ".vocab") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    with atomic_output(args.output_prefix + ".model") as tmp, open(tmp, "wb") as f:
        f.write(model.getvalue())

    if args.hf_export:
        check = sentences[:: max(1, len(sentences) // 2000)] + ["  two  spaces ", "Zürich 😀 東京\n\tx", args.eod_token]
        export_hf(args.output_prefix + ".model", args.hf_export, check, args.eod_token, args.pad_token)
    named = [args.eod_token, args.pad_token, *specials]
    info = {"model": args.output_prefix + ".model", "vocab_size": sp.get_piece_size(),
            "special_tokens": {t: sp.piece_to_id(t) for t in named}, "seconds": time.time() - start}
    return info


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        info = train(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # SentencePiece's own errors (e.g. a vocabulary too large for the corpus)
        print(f"error: SentencePiece training failed: {e}", file=sys.stderr)
        return 1
    specials = ", ".join(f"{t}={i}" for t, i in info["special_tokens"].items())
    print(f"wrote {info['model']} (vocab {info['vocab_size']}; {specials}) in {info['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
