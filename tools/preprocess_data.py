#!/usr/bin/env python
"""Tokenize JSONL into Megatron indexed datasets with a per-token risk channel.

    python tools/preprocess_data.py --input data.jsonl --output-prefix runs/data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model runs/tok/spm.model \\
        --workers 2 --append-eod --harm-tag '<|potentially_unsafe|>' --harm-tag-prob 0.05

writes ``runs/data/corpus_text_document.bin/.idx`` and ``..._text_document.risk.bin/.idx``.
Flags follow Megatron-LM's tools/preprocess_data.py; the risk and harmfulness-tag flags are ours.
Each record's ``--risk-key`` field (default ``risk_spans``, as written by tools/tag_risk.py) holds
``[[char_start, char_end, level], ...]``; a token takes the highest level of the characters it covers.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.corpus import InputError, atomic_output  # noqa: E402
from megatron_slung.data.preprocess import PreprocessOptions, preprocess, print_summary  # noqa: E402
from megatron_slung.data.tokenizers import TOKENIZER_TYPES, tokenizer_kwargs  # noqa: E402
from megatron_slung.training.arguments import add_tiktoken_args  # noqa: E402


def add_preprocess_args(p) -> None:
    """The tokenizer, input, risk and tag flags (shared with tools/pipeline.py)."""
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES + ("GPTSentencePieceTokenizer",))
    g.add_argument("--tokenizer-model", default=None,
                   help="a local SentencePiece .model, a local Hugging Face tokenizer directory / tokenizer.json, or "
                        "TikTokenizer's tiktoken file (Megatron's .json list or tiktoken's BASE64 RANK lines)")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: the GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: the GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: the vocabulary size (documents are whitespace-separated ids; the end of "
                        "document is vocab size - 1); TikTokenizer: the total size with the special tokens")
    add_tiktoken_args(g)
    g.add_argument("--no-tokenizer-cache", action="store_true",
                   help="SentencePiece: call the plain encoder for every document instead of the word cache "
                        "(same output, slower; for checking)")
    g = p.add_argument_group("input data")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each record")
    g.add_argument("--split-sentences", action="store_true", help="(Megatron flag; not supported here)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="(Megatron flag; order is always kept here)")
    g.add_argument("--empty-documents", choices=("skip", "error"), default="skip",
                   help="a document with no tokens is skipped (counted, first locations listed) or is an error")
    g = p.add_argument_group("risk levels and harmfulness tags")
    g.add_argument("--risk-key", default="risk_spans",
                   help="record field with [[char_start, char_end, level], ...] (or {json_key: spans})")
    g.add_argument("--default-risk-level", type=int, default=0,
                   help="level of characters no span covers, and of records without --risk-key")
    g.add_argument("--harm-tag", default=None, help="token inserted before risky spans, e.g. '<|potentially_unsafe|>'")
    g.add_argument("--harm-tag-prob", type=float, default=0.05, help="probability of a tag before each risky span")
    g.add_argument("--harm-tag-min-level", type=int, default=3,
                   help="a risky span is a maximal run of tokens with level >= this")
    g.add_argument("--seed", type=int, default=1234, help="seed of the tag decisions (keyed by file and line)")
    g = p.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token (risk level 0)")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")


def options_from_args(p, args) -> PreprocessOptions:
    """The PreprocessOptions of these flags; a combination that cannot work is a parser error."""
    t = args.tokenizer_type
    if t == "GPT2BPETokenizer":
        if not args.vocab_file or not args.merge_file or args.tokenizer_model:
            p.error("--tokenizer-type GPT2BPETokenizer reads --vocab-file and --merge-file (not --tokenizer-model)")
    elif args.vocab_file or args.merge_file:
        p.error(f"--vocab-file/--merge-file are read by GPT2BPETokenizer only, not --tokenizer-type {t}")
    elif t == "NullTokenizer":
        if args.vocab_size is None or args.tokenizer_model:
            p.error("--tokenizer-type NullTokenizer needs --vocab-size (and no --tokenizer-model)")
    elif not args.tokenizer_model:
        p.error(f"--tokenizer-type {t} needs --tokenizer-model")
    if t not in ("NullTokenizer", "TikTokenizer") and args.vocab_size is not None:
        p.error(f"--vocab-size is for NullTokenizer and TikTokenizer; {t} has its own size")
    if t != "TikTokenizer" and (args.tiktoken_pattern or args.special_tokens
                                or args.tiktoken_num_special_tokens != 1000):
        p.error(f"--tiktoken-pattern/--tiktoken-num-special-tokens/--tokenizer-special-tokens are for TikTokenizer, "
                f"not --tokenizer-type {t}")
    if args.split_sentences:
        p.error("--split-sentences is not supported: risk spans are per document (tag sentences with tools/tag_risk.py)")
    return PreprocessOptions(
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model, tokenizer_kwargs=tokenizer_kwargs(args),
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod, risk_key=args.risk_key, default_risk_level=args.default_risk_level,
        harm_tag=args.harm_tag, harm_tag_prob=args.harm_tag_prob, harm_tag_min_level=args.harm_tag_min_level,
        seed=args.seed, empty_documents=args.empty_documents, log_interval=args.log_interval,
        word_cache=not args.no_tokenizer_cache)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="a JSONL file (.jsonl/.json, optionally .gz/.zst) or a glob")
    add_preprocess_args(p)
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx and .risk.bin/.idx")
    g.add_argument("--summary-json", default=None, help="also write the final summary as JSON here")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoding processes")
    g.add_argument("--partitions", type=int, default=1,
                   help="contiguous input shares read in parallel (each with workers/partitions workers)")
    args = p.parse_args(argv)
    return args, options_from_args(p, args)


def main(argv=None) -> int:
    args, opts = get_args(argv)
    try:
        summary = preprocess(args.input, args.output_prefix, opts, workers=args.workers, partitions=args.partitions)
    except (InputError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.summary_json:
        with atomic_output(args.summary_json) as tmp, open(tmp, "w") as f:
            json.dump(summary.to_dict(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
