"""Preemption and time limits with the real trainer: a signal sent to one rank stops every rank after the same
iteration, with a checkpoint of it and exit status 0, and the resumed run continues bit for bit;
--exit-duration-in-mins; and the load/save switches end to end (--ckpt-step, --keep-last-checkpoints,
--no-save-optim / --no-save-rng then --no-load-optim / --no-load-rng)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed import free_port
from tests.pretrain_helpers import ROOT, TINY, env, read_jsonl, run_cli, train_records


def _entries(save_dir) -> list:
    """What a save directory holds, without the recovery scripts DeepSpeed copies into it."""
    return sorted(n for n in os.listdir(save_dir) if not n.endswith(".py"))


def _losses(path) -> dict:
    return {r["iteration"]: r["loss"] for r in train_records(read_jsonl(path))}


def _start_ranks(args, world_size, logs):
    """``world_size`` trainer processes started the way srun or torchrun leave them (RANK, WORLD_SIZE...)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                     WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
        out = open(os.path.join(logs, f"rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_slung.pretrain"] + [str(a) for a in args],
                                      cwd=ROOT, env=env(**extra), stdout=out, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, timeout=900):
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def _run_ranks(args, world_size, logs):
    os.makedirs(logs, exist_ok=True)
    codes = _wait(_start_ranks(args, world_size, logs))
    text = [open(os.path.join(logs, f"rank{r}.log")).read() for r in range(world_size)]
    assert codes == [0] * world_size, "\n".join(t[-3000:] for t in text)
    return text


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_after_saving_and_the_resume_is_exact(tmp_path):
    """SIGUSR1 reaches rank 0 only (as when one node is preempted first): both ranks finish the iteration, agree,
    save it, exit 0; resuming gives the uninterrupted run's losses exactly (dropout on: the RNG is restored)."""
    common = TINY + ["--train-iters", "60", "--hidden-dropout", "0.1", "--zero-stage", "1"]
    save = tmp_path / "ckpt"
    metrics = tmp_path / "interrupted.jsonl"
    logs = tmp_path / "interrupted"
    os.makedirs(logs)
    procs = _start_ranks(common + ["--save", save, "--exit-signal-handler", "--exit-signal", "SIGUSR1",
                                   "--metrics-jsonl", metrics], 2, logs)
    try:  # signal once training is under way (the logging rank has written iteration 2)
        while not (metrics.exists() and len(train_records(read_jsonl(metrics))) >= 2):
            assert all(p.poll() is None for p in procs), "a rank ended before the signal was sent"
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGUSR1)
    finally:
        codes = _wait(procs)
    text = [open(logs / f"rank{r}.log").read() for r in range(2)]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
    stopped = max(_losses(metrics))
    assert 2 <= stopped < 60
    assert f"exiting at iteration {stopped} (SIGUSR1 received (--exit-signal-handler))" in text[1]
    assert (save / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert _entries(save) == [f"iter_{stopped:07d}", "latest"]

    end = stopped + 2  # the resumed run and the reference stop two iterations later (--exit-interval)
    _run_ranks(common + ["--load", save, "--save", save, "--exit-interval", end, "--metrics-jsonl", metrics], 2,
               tmp_path / "resumed")
    _run_ranks(common + ["--exit-interval", end, "--metrics-jsonl", tmp_path / "straight.jsonl"], 2,
               tmp_path / "straight")
    resumed, straight = _losses(metrics), _losses(tmp_path / "straight.jsonl")
    assert sorted(resumed) == sorted(straight) == list(range(1, end + 1))
    assert resumed == straight  # bit for bit, the interrupted iterations and the resumed ones


@pytest.mark.slow
def test_time_limit_and_the_load_save_switches_end_to_end(tmp_path):
    common = TINY + ["--train-iters", "4", "--zero-stage", "1"]
    ref = tmp_path / "ref.jsonl"
    # keep the last 2 of the checkpoints saved every iteration
    save = tmp_path / "ckpt"
    proc = run_cli(common + ["--save", save, "--save-interval", "1", "--keep-last-checkpoints", "2",
                             "--metrics-jsonl", ref])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _entries(save) == ["iter_0000003", "iter_0000004", "latest"]
    assert "deleted older checkpoints iter_0000001 (--save-retain-interval / --keep-last-checkpoints)" in proc.stdout
    # --ckpt-step: iteration 3 instead of `latest`, and iteration 4 is redone exactly
    proc = run_cli(common + ["--load", save, "--ckpt-step", "3", "--metrics-jsonl", tmp_path / "step.jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter_0000003 at iteration 3" in proc.stdout
    assert _losses(tmp_path / "step.jsonl") == {4: _losses(ref)[4]}
    # --finetune: the weights of iteration 4, then iteration 0 with a fresh schedule and data position
    proc = run_cli(common + ["--load", save, "--finetune", "--metrics-jsonl", tmp_path / "tune.jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded the weights of" in proc.stdout and "training from iteration 0 to 4" in proc.stdout
    tuned = {r["iteration"]: r for r in train_records(read_jsonl(tmp_path / "tune.jsonl"))}
    reference = {r["iteration"]: r for r in train_records(read_jsonl(ref))}
    assert sorted(tuned) == [1, 2, 3, 4] and tuned[1]["lr"] == reference[1]["lr"]
    assert tuned[1]["loss"] < reference[1]["loss"] - 0.05  # trained weights on the first batch again

    # --exit-duration-in-mins: past the limit after the first iteration; saved without optimizer or RNG state
    bare = tmp_path / "bare"
    proc = run_cli(common + ["--save", bare, "--exit-duration-in-mins", "0.001", "--no-save-optim", "--no-save-rng"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exiting at iteration 1 (" in proc.stdout and "(--exit-duration-in-mins 0.001)" in proc.stdout
    assert (bare / "latest").read_text().strip() == "iter_0000001"
    files = os.listdir(bare / "iter_0000001")
    assert not [f for f in files if "optim_states" in f or f.startswith("rng_state")], files
    model_states = torch.load(bare / "iter_0000001" / "mp_rank_00_model_states.pt", weights_only=False)
    assert model_states["optimizer"] is None and model_states["module"]
    # loading it as it is: refused, naming the flags (Megatron stops too)
    proc = run_cli(common + ["--load", bare])
    assert proc.returncode == 2 and "saved without its optimizer state (--no-save-optim); pass --no-load-optim" in proc.stderr
    # with them: the weights and the data position of iteration 1, a fresh optimizer and LR schedule (Megatron)
    proc = run_cli(common + ["--load", bare, "--no-load-optim", "--no-load-rng", "--metrics-jsonl", tmp_path / "b.jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--no-load-optim: the optimizer state and the LR schedule start afresh; iteration 1" in proc.stdout
    resumed = {r["iteration"]: r for r in train_records(read_jsonl(tmp_path / "b.jsonl"))}
    reference = {r["iteration"]: r for r in train_records(read_jsonl(ref))}
    assert sorted(resumed) == [2, 3, 4]
    assert resumed[2]["loss"] == reference[2]["loss"]  # the same weights on the same batch
    assert resumed[2]["lr"] == reference[1]["lr"]  # the schedule's first step again


def test_the_slurm_example_requeues_a_run_that_stopped_early_and_not_a_finished_one(tmp_path):
    """examples/pretrain_gpt_slurm_requeue.sh with stand-ins for srun (runs the task here) and scontrol (records
    its arguments): stopped by the time limit -> `scontrol requeue JOB`; the requeued run resumes and finishes ->
    no requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for f in ("srun", "scontrol"):
        os.chmod(bin_dir / f, 0o755)
    save = tmp_path / "run"
    job_env = env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_NTASKS="1",
                  SLURM_SUBMIT_DIR=ROOT, CONFIG="examples/gpt_tiny.yaml", SAVE=str(save), VOCAB_SIZE="256",
                  MASTER_ADDR="127.0.0.1")
    flags = ["--train-iters", "2", "--lr-warmup-iters", "1", "--num-workers", "0", "--eval-iters", "0", "--log-interval", "1",
             "--no-progress-bar"]

    def job(**extra):
        proc = subprocess.run(["bash", "examples/pretrain_gpt_slurm_requeue.sh"] + flags, cwd=ROOT,
                              env={**job_env, "MASTER_PORT": str(free_port()), **extra}, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout

    out = job(EXIT_MINS="0.001")  # past its time limit after the first iteration
    assert "exiting at iteration 1" in out and "[slurm] " + str(save) + "/latest: iteration 1 of 2" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"
    out = job()  # the requeued job: resumes from `latest` and finishes
    assert "at iteration 1" in out and "latest: iteration 2 of 2" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"  # not requeued again


def test_sigterm_to_the_whole_process_group_spares_the_data_loader_workers(tmp_path):
    """SLURM signals every process of a task. PyTorch's DataLoader workers die of SIGTERM, which made the trainer
    fail ("DataLoader worker ... is killed by signal") instead of saving; they now ignore the exit signal."""
    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = TINY + ["--train-iters", "60", "--num-workers", "2", "--save", save, "--exit-signal-handler",
                   "--metrics-jsonl", metrics]  # the last --num-workers wins
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_slung.pretrain"] + [str(a) for a in args], cwd=ROOT,
                            env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not (metrics.exists() and len(train_records(read_jsonl(metrics))) >= 2):
            assert proc.poll() is None, open(tmp_path / "log").read()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its two workers
    finally:
        code = _wait([proc])[0]
    text = open(tmp_path / "log").read()
    assert code == 0, text[-3000:]
    stopped = max(_losses(metrics))
    assert f"exiting at iteration {stopped} (SIGTERM received (--exit-signal-handler))" in text
    assert (save / "latest").read_text().strip() == f"iter_{stopped:07d}"
