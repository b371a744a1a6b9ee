#!/usr/bin/env bash
# Multi-node pretraining with the `deepspeed` launcher and a hostfile ("host slots=N" lines; see
# examples/hostfile.example). The launcher reaches the other hosts over passwordless ssh (pdsh by default),
# starts one process per slot and passes RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, which the trainer reads.
#
#   HOSTFILE=/job/hostfile bash examples/pretrain_gpt_deepspeed_hostfile.sh
#   HOSTFILE=examples/hostfile.local DS_LAUNCH_ARGS=--no_ssh_check CONFIG=examples/gpt_tiny.yaml \
#       bash examples/pretrain_gpt_deepspeed_hostfile.sh --train-iters 20        # this machine, 2 processes
#
# Knobs (environment): HOSTFILE (default examples/hostfile.example), MASTER_ADDR (default: the first host),
# MASTER_PORT (default 29500), LAUNCHER (pdsh, openmpi, mvapich, slurm; default pdsh), DS_LAUNCH_ARGS (more
# launcher options: --no_ssh_check for a one-host hostfile; --no_ssh --node_rank N to start the launcher on
# each host yourself instead of over ssh), plus CONFIG, DATA_PATH,
# TOKENIZER_TYPE, TOKENIZER_MODEL, VOCAB_SIZE, SAVE, TP, PP, DS_CONFIG as in pretrain_gpt_single_node.sh.
# Environment variables the workers need (NCCL settings, PYTHONPATH...) go in a .deepspeed_env file
# (NAME=VALUE lines) in the working directory or $HOME; the launcher forwards them. The checkpoint directory
# must be on a file system every host sees.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate

HOSTFILE=${HOSTFILE:-examples/hostfile.example}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
source examples/pretrain_args.sh

# shellcheck disable=SC2086
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --launcher "${LAUNCHER:-pdsh}" ${DS_LAUNCH_ARGS:-} --module megatron_slung.pretrain "${ARGS[@]}" "$@"
