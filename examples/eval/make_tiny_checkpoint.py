#!/usr/bin/env python
"""Write a tiny, untrained megatron-slung checkpoint to try the evaluation commands on.

    python examples/eval/make_tiny_checkpoint.py --tokenizer-model runs/tiny/spm.model --save runs/tiny/ckpt

The model (2 layers, hidden 64, GQA) has random weights, so its scores mean nothing; use a trained
checkpoint (or any local HF Llama directory) for real numbers. The checkpoint records the tokenizer, so
``tools/convert_to_hf.py`` and ``python -m megatron_slung.eval --model CKPT`` find it.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_slung.model import hf_checkpoint  # noqa: E402
from megatron_slung.model.gpt import GPTConfig, GPTModel  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model (from tools/train_tokenizer.py)")
    p.add_argument("--save", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=args.tokenizer_model).get_piece_size()
    tp = args.tensor_model_parallel_size
    cfg = GPTConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                    vocab_size=-(-vocab // (8 * tp)) * 8 * tp, max_position_embeddings=256, init_seed=args.seed)
    hf_checkpoint.write_checkpoint(args.save, GPTModel(cfg).state_dict(), cfg, tp, args.pipeline_model_parallel_size,
                                   tokenizer={"type": "SentencePieceTokenizer",
                                              "model": os.path.abspath(args.tokenizer_model)},
                                   overwrite=True)
    print(f"wrote {args.save} ({cfg.num_parameters() / 1e6:.2f}M parameters, vocab {cfg.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
