#!/usr/bin/env python
"""Convert a local Hugging Face Llama / Mistral / Qwen2 / GPT-2 directory into a megatron-slung checkpoint.

    python tools/convert_from_hf.py --load HF_DIR --save CKPT \\
        --tensor-model-parallel-size T --pipeline-model-parallel-size P

Then continue pretraining it with the selective loss (the SLUNG setup): pass ``--load CKPT --finetune``
to ``python -m megatron_slung.pretrain`` with the same TP/PP and ``--tokenizer-type HuggingFaceTokenizer
--tokenizer-model CKPT/tokenizer``. The checkpoint records the model's architecture (rotary base, norm
epsilon, heads, groups, sizes, tied or not, padded vocabulary, the tokenizer's vocabulary size), so the
trainer takes the model flags you leave out from it and refuses those that contradict it. The weights are
written in DeepSpeed's layout for the chosen TP/PP (no optimizer state: the run starts at iteration 0).
The vocabulary is padded with zero rows to a multiple of --make-vocab-size-divisible-by x T (Megatron's rule);
the HF vocabulary size is recorded (``unpadded_vocab_size``), so an export gives back exactly the HF rows.
Every config.json field and every tensor is used, or the conversion stops naming what it cannot honour
(e.g. sliding-window attention, scaled RoPE). Name mappings: megatron_slung/model/hf_llama.py, hf_gpt2.py.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slung.model import hf_checkpoint  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="local Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--save", required=True, help="checkpoint directory to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                   help="pad the vocabulary to a multiple of this (Megatron's flag; default 1 = only as TP needs)")
    p.add_argument("--ckpt-tag", default="release", help="tag of the written checkpoint (default: release)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer files into CKPT/tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --save")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    start = time.time()
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        hf_checkpoint.check_tag(args.ckpt_tag)
        full, config, hf_vocab = hf_checkpoint.load_hf_directory(args.load, args.make_vocab_size_divisible_by, tp)
        with tempfile.TemporaryDirectory(prefix="slung-tokenizer-") as tmp:
            tokenizer_dir, tokenizer_vocab_size = None, None
            names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
            if not any(os.path.isfile(os.path.join(args.load, n)) for n in names):
                print(f"[convert_from_hf] {args.load} has no tokenizer files; none copied", file=sys.stderr)
            elif not args.no_tokenizer:
                try:
                    tok = AutoTokenizer.from_pretrained(args.load, local_files_only=True)
                    tok.save_pretrained(tmp)
                    tokenizer_dir, tokenizer_vocab_size = tmp, len(tok)  # the trainer's HuggingFaceTokenizer size
                except (OSError, ValueError) as e:
                    print(f"[convert_from_hf] warning: no tokenizer copied ({e})", file=sys.stderr)
            hf_checkpoint.write_checkpoint(args.save, full, config, tp, pp, tag=args.ckpt_tag,
                                           tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
                                           tokenizer_vocab_size=tokenizer_vocab_size,
                                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                           unpadded_vocab_size=hf_vocab)
    except (hf_checkpoint.CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[convert_from_hf] {args.load} -> {args.save} (TP={tp}, PP={pp}, tag {args.ckpt_tag}): "
          f"{config.num_layers} layers, hidden {config.hidden_size}, vocab {hf_vocab} (padded {config.vocab_size}), "
          f"{time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
