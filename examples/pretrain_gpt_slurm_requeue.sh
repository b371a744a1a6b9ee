#!/usr/bin/env bash
# Preemptible multi-node pretraining under SLURM: the job saves and requeues itself before its time runs out,
# and every requeued run resumes from SAVE's `latest`, bit for bit as if never stopped.
#
#   sbatch examples/pretrain_gpt_slurm_requeue.sh                       # the ~1B config, 8 nodes x 8 GPUs
#   sbatch --nodes 2 --time 4:00:00 examples/pretrain_gpt_slurm_requeue.sh --train-iters 20000
#
# How: `--signal=USR1@180` makes SLURM send SIGUSR1 to every task 180 s before the time limit. srun starts
# the trainer directly, one task per GPU (no torchrun agent in between to catch the signal), with
# `--exit-signal-handler --exit-signal SIGUSR1`: each rank finishes its iteration, all agree (one all-reduce),
# a checkpoint of that iteration is saved and the tasks exit 0. The script then compares the iteration of
# `latest` with --train-iters and, when the run is not finished, requeues the job (`scontrol requeue`): the
# same job id, so the same SAVE, and --load SAVE resumes it. A failing run (exit status not 0) is not requeued.
# 180 s must cover one iteration plus one save; raise it for slow file systems.
#
# Knobs (environment): those of examples/pretrain_args.sh (CONFIG, SAVE, TP, PP, DATA_PATH, TOKENIZER_TYPE,
# TOKENIZER_MODEL, VOCAB_SIZE, DS_CONFIG); GPUS_PER_NODE (default 8); EXIT_SIGNAL (default SIGUSR1; use
# SIGTERM when the cluster preempts jobs with SIGTERM and a grace time instead); EXIT_MINS, an optional
# --exit-duration-in-mins backstop (e.g. 5 minutes under the --time limit).
#SBATCH --job-name=slung-gpt-requeue
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=4:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
[ -f .venv/bin/activate ] && source .venv/bin/activate

source examples/pretrain_args.sh
EXIT_SIGNAL=${EXIT_SIGNAL:-SIGUSR1}
ARGS+=(--num-workers 2 --exit-signal-handler --exit-signal "$EXIT_SIGNAL")
if [ -n "${EXIT_MINS:-}" ]; then
    ARGS+=(--exit-duration-in-mins "$EXIT_MINS")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1  # fail fast instead of hanging when a rank dies

echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS ranks, checkpoints in $SAVE"
# The trainer maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to its ranks, the first host is the master.
srun --kill-on-bad-exit=1 python -m megatron_slung.pretrain "${ARGS[@]}" "$@"

# Finished, or stopped early with a checkpoint? `latest` names the checkpoint, args.json holds --train-iters.
if python - "$SAVE" <<'PY'
import json, os, sys
save = sys.argv[1]
tag = open(os.path.join(save, "latest")).read().strip()
iteration = int(tag.split("_")[1])
train_iters = json.load(open(os.path.join(save, tag, "args.json")))["train_iters"]
print(f"[slurm] {save}/latest: iteration {iteration} of {train_iters}")
sys.exit(0 if iteration < train_iters else 1)
PY
then
    echo "[slurm] stopped before the end with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
