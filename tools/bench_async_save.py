#!/usr/bin/env python
"""Seconds a checkpoint save stops the training loop: synchronous save vs ``--async-save``.

    python tools/bench_async_save.py                               # ~110M-parameter GPT, fp32 + Adam: 1.3 GB
    python tools/bench_async_save.py --iters 9 --save-interval 3 --json benchmarks/async_save.json

Runs the real job (``python -m megatron_slung.pretrain``, one process, mock data) twice with the same flags,
once without and once with ``--async-save``, saving every ``--save-interval`` iterations into a temporary
directory (``--save-dir`` to choose the disk). The stall of each save is read from the job's own lines: the
synchronous ``saved checkpoint ... (X s)`` and the asynchronous ``training stopped X s to copy it to host
memory`` (the copy, plus any wait for the previous save). Also reported: how long each background write took,
the iteration times while a background write was under way and while none was (the writer shares the CPU
cores with training), the checkpoint's size, and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# GPT-2-small shaped (Megatron's GPT-3 defaults: learned positions, LayerNorm, GeLU, biases), tied embeddings:
# 12 x 7.1M + 32000 x 768 = ~110M parameters; fp32 weights + Adam moments = ~1.3 GB of checkpoint.
MODEL = ("--num-layers 12 --hidden-size 768 --num-attention-heads 12 --ffn-hidden-size 3072 --vocab-size 32000 "
         "--seq-length 64 --micro-batch-size 1 --global-batch-size 1 --lr 1e-4 --mock-data --eval-iters 0 "
         "--num-workers 0 --no-progress-bar --log-interval 1 --hidden-dropout 0 --attention-dropout 0").split()

SYNC_RE = re.compile(r"^saved checkpoint (\S+) \(([\d.]+) s\)$")
STALL_RE = re.compile(r"^checkpoint of iteration (\d+): training stopped ([\d.]+) s to copy it to host memory")
WRITTEN_RE = re.compile(r"^saved checkpoint (\S+) \(written in the background in ([\d.]+) s\)")


def _size_gb(path: str) -> float:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total / 1e9


def run(mode: str, args, save_root: str) -> dict:
    save = os.path.join(save_root, mode)
    jsonl = os.path.join(save_root, f"{mode}.jsonl")
    cmd = [sys.executable, "-m", "megatron_slung.pretrain", *MODEL, "--train-iters", str(args.iters),
           "--save-interval", str(args.save_interval), "--save", save, "--metrics-jsonl", jsonl, *args.extra]
    if mode == "async":
        cmd.append("--async-save")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    stalls, written = [], []
    for line in proc.stdout.splitlines():
        if mode == "sync" and (m := SYNC_RE.match(line)):
            stalls.append(float(m.group(2)))
        elif (m := STALL_RE.match(line)):
            stalls.append(float(m.group(2)))
        elif (m := WRITTEN_RE.match(line)):
            written.append(float(m.group(2)))
    with open(jsonl) as f:
        records = [json.loads(line) for line in f if '"train"' in line]
    # the iteration after each save (while a background write is under way, with --async-save)
    writing = [it + 1 for it in range(args.save_interval, args.iters, args.save_interval)]
    times = {r["iteration"]: r["iter_time_s"] for r in records if r["iteration"] > 1}  # 1: start-up costs
    during = [t for it, t in times.items() if it in writing]
    others = [t for it, t in times.items() if it not in writing]
    size = _size_gb(os.path.join(save, sorted(n for n in os.listdir(save) if n.startswith("iter_"))[-1]))
    shutil.rmtree(save, ignore_errors=True)
    return {"mode": mode, "stall_s": stalls, "background_write_s": written, "checkpoint_gb": round(size, 3),
            "iter_s_after_save": during, "iter_s_other": others, "wall_s": round(wall, 1)}


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--save-interval", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the job (default: torch's)")
    p.add_argument("--save-dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"],
                   help="which runs, in this order")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("extra", nargs="*", help="more trainer flags (after --)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(dir=args.save_dir) as tmp:
        for mode in args.modes:
            print(f"running {mode} ...", flush=True)
            results.append(run(mode, args, tmp))
    load_after = os.getloadavg()
    print(f"\ncheckpoint {results[0]['checkpoint_gb']:.2f} GB; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after, {os.cpu_count()} CPUs")
    print(f"{'mode':<6} {'stall per save (s)':<28} {'mean':>6} {'background write (s)':<24} "
          f"{'s/iter after save':>18} {'s/iter other':>13}")
    for r in results:
        stalls = " ".join(f"{s:.2f}" for s in r["stall_s"])
        written = " ".join(f"{s:.1f}" for s in r["background_write_s"]) or "-"
        print(f"{r['mode']:<6} {stalls:<28} {_mean(r['stall_s']):>6.2f} {written:<24} "
              f"{_mean(r['iter_s_after_save']):>18.2f} {_mean(r['iter_s_other']):>13.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "load_average_before": load_before, "load_average_after": load_after},
                       "model_flags": MODEL, "iters": args.iters, "save_interval": args.save_interval,
                       "extra": args.extra, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
