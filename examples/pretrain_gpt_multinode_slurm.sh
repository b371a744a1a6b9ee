#!/usr/bin/env bash
# Multi-node pretraining under SLURM: sbatch starts one task per node, srun runs torchrun on each node, and the
# torchrun agents meet at a c10d rendezvous on the first node. 8 nodes x 8 GPUs by default (the ~1B config).
#
#   sbatch examples/pretrain_gpt_multinode_slurm.sh
#   sbatch --nodes 2 examples/pretrain_gpt_multinode_slurm.sh --train-iters 1000    # extra flags win
#   DATA_PATH="0.9 data/clean_text_document 0.1 data/toxic_text_document" TOKENIZER_MODEL=data/tok.model \
#       sbatch examples/pretrain_gpt_multinode_slurm.sh --risk-loss-policy masked
#
# Knobs (environment, exported to the job): CONFIG, DATA_PATH, TOKENIZER_TYPE, TOKENIZER_MODEL, VOCAB_SIZE,
# SAVE, TP, PP, DS_CONFIG as in pretrain_gpt_single_node.sh; GPUS_PER_NODE (default 8); MASTER_PORT.
# The checkpoint directory must be on a file system every node sees. A requeued or resubmitted job resumes
# from SAVE's `latest`.
#
# Without torchrun, `srun --ntasks-per-node 8 --gpus-per-task 1 python -m megatron_slung.pretrain ...` works
# too: the trainer maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to its ranks and takes the first host
# of the job as the master.
#SBATCH --job-name=slung-gpt
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
[ -f .venv/bin/activate ] && source .venv/bin/activate

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}
source examples/pretrain_args.sh
ARGS+=(--num-workers 2)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1  # fail fast instead of hanging when a rank dies

echo "[slurm] $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous at $MASTER_ADDR:$MASTER_PORT, checkpoints in $SAVE"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
        --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
        -m megatron_slung.pretrain "${ARGS[@]}" "$@"
