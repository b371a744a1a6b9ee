#!/usr/bin/env python
"""Training throughput of ``python -m megatron_slung.pretrain`` at several process counts / layouts, side by side.

    python tools/bench_training.py                                  # 1 process, DP=2, TP=2, PP=2 on this machine
    python tools/bench_training.py --layouts 1 dp2 --iters 60 --json runs/bench_training.json

Each layout runs the real job with torchrun on mock data (same model, same global batch), and its tokens/s is
read from the job's own metrics (the intervals after the first one, which holds start-up costs). The CPU
cores are split evenly between the processes (OMP_NUM_THREADS = cores / processes). Prints a table with the
ratio to the first layout; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {  # name -> (processes, extra flags)
    "1": (1, []),
    "dp2": (2, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp4": (4, []),
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}

MODEL = ("--num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention --num-query-groups 4 "
         "--ffn-hidden-size 688 --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
         "--hidden-dropout 0 --attention-dropout 0 "
         "--seq-length 256 --micro-batch-size 4 --global-batch-size 16 --lr 1e-3 --mock-data --vocab-size 8192 "
         "--eval-iters 0 --num-workers 0 --no-progress-bar --risk-loss-policy masked").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(cmd: list, env: dict, jsonl: str, what: str) -> tuple:
    """Run the trainer command ``cmd`` (writing ``--metrics-jsonl jsonl``); (all train records, the steady
    ones: those after the first logged interval, which holds start-up costs). SystemExit with its output
    when it fails."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(jsonl) as f:
        records = [json.loads(line) for line in f if '"train"' in line]
    return records, records[1:] or records


def run_layout(name: str, iters: int, log_interval: int, extra: list, threads: int | None = None) -> dict:
    procs, flags = LAYOUTS[name]
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // procs)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "metrics.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "megatron_slung.pretrain",
               *MODEL, "--train-iters", str(iters), "--log-interval", str(log_interval), "--metrics-jsonl", jsonl,
               *flags, *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        records, steady = run_job(cmd, env, jsonl, f"layout {name}")
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    return {"layout": name, "processes": procs, "threads_per_process": threads, "tokens_per_s": tokens_per_s,
            "ms_per_iter": sum(r["iter_time_s"] for r in steady) / len(steady) * 1000,
            "tflops_per_device": sum(r["tflops_per_device"] for r in steady) / len(steady),
            "final_loss": records[-1]["loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["1", "dp2", "tp2", "pp2"], choices=sorted(LAYOUTS))
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--threads-per-process", type=int, default=None,
                   help="OMP threads of each process (default: the CPU cores / processes)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("extra", nargs="*", help="more trainer flags (after --)")
    args = p.parse_args(argv)
    results = []
    for name in args.layouts:
        print(f"running {name} ...", flush=True)
        results.append(run_layout(name, args.iters, args.log_interval, args.extra, args.threads_per_process))
    base = results[0]["tokens_per_s"]
    print(f"\n{'layout':<8} {'procs':>5} {'threads':>7} {'tokens/s':>10} {'ms/iter':>9} {'TFLOP/s/dev':>12} {'vs ' + results[0]['layout']:>8}")
    for r in results:
        print(f"{r['layout']:<8} {r['processes']:>5} {r['threads_per_process']:>7} {r['tokens_per_s']:>10.0f} {r['ms_per_iter']:>9.1f} "
              f"{r['tflops_per_device']:>12.4f} {r['tokens_per_s'] / base:>7.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "processor": platform.processor()},
                       "model_flags": MODEL, "iters": args.iters, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
