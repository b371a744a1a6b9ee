#!/usr/bin/env bash
# Pretrain on one machine with torchrun: one process per GPU (or NPROC processes on the CPU).
#
#   bash examples/pretrain_gpt_single_node.sh                       # ~1B config, mock data, all local GPUs
#   NPROC=2 CONFIG=examples/gpt_tiny.yaml bash examples/pretrain_gpt_single_node.sh --train-iters 20
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=data/tok.model bash examples/pretrain_gpt_single_node.sh
#
# Knobs (environment): CONFIG (flags file, default examples/gpt_1b.yaml), NPROC (default: the GPU count, or 2
# without GPUs), DATA_PATH (a preprocessed prefix or "0.7 A 0.3 B"; default: --mock-data), TOKENIZER_TYPE
# (default SentencePieceTokenizer), TOKENIZER_MODEL, VOCAB_SIZE (mock data, default 32000), SAVE (checkpoint
# dir, default runs/<config name>; resumed from when it holds a checkpoint), TP, PP, DS_CONFIG (a DeepSpeed
# JSON, e.g. examples/ds_config_zero2.json). Extra arguments go to the trainer and win over the config file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate

if [ -z "${NPROC:-}" ]; then
    NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
source examples/pretrain_args.sh

exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m megatron_slung.pretrain "${ARGS[@]}" "$@"
