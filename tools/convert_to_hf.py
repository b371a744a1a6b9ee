#!/usr/bin/env python
"""Convert a megatron-slung checkpoint (any TP/PP) into a Hugging Face directory: LlamaForCausalLM,
Qwen2ForCausalLM or GPT2LMHeadModel, whichever holds its architecture (any other is refused, naming why).

    python tools/convert_to_hf.py --load CKPT --output HF_DIR [--tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model spm.model] [--dtype bfloat16] [--ckpt-tag TAG] [--overwrite]

The output (config.json, model.safetensors, tokenizer files) loads with
``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)``, no custom code. The tokenizer defaults to
the one the checkpoint records. Only the real vocabulary is exported (HF ``vocab_size`` = the tokenizer's,
or the checkpoint's recorded unpadded size): the padding rows are left out, so sampling never emits an
id that decodes to nothing. A checkpoint that records neither needs ``--vocab-size N``. Every tensor
of the checkpoint is exported, or the conversion stops naming it. Name mappings: megatron_slung/model/hf_llama.py,
hf_gpt2.py.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slung.model import hf_checkpoint  # noqa: E402

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (with 'latest') or a tag directory")
    p.add_argument("--output", required=True, help="Hugging Face directory to write")
    p.add_argument("--ckpt-tag", default=None, help="tag to convert (default: the one in 'latest')")
    p.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"], default=None)
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or HF tokenizer directory "
                   "(default: the checkpoint's own)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the real vocabulary size (rows beyond it are padding and are left out); needed only when "
                        "the checkpoint records neither it nor a tokenizer")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype of the export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output")
    args = p.parse_args(argv)
    import torch

    start = time.time()
    try:
        full, config, meta = hf_checkpoint.read_checkpoint(args.load, args.ckpt_tag)
        kind, model = hf_checkpoint.resolve_tokenizer(args.load, meta)
        kind, model = args.tokenizer_type or kind, args.tokenizer_model or model
        if not model:
            print("[convert_to_hf] warning: no tokenizer given or recorded; writing the model only", file=sys.stderr)
        hf_checkpoint.save_hf_directory(args.output, full, config, kind, model,
                                        dtype=getattr(torch, DTYPES[args.dtype]), overwrite=args.overwrite,
                                        meta=meta, vocab_size=args.vocab_size, where=args.load)
    except (hf_checkpoint.CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.output, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    print(f"[convert_to_hf] {args.load} -> {args.output}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"vocab {vocab} (of {config.vocab_size} rows with padding), {args.dtype}, {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
