#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py (tokens/s, MB/s) on a generated corpus, optionally side by side
with Megatron-LM's tools/preprocess_data.py (same SentencePiece model, same worker counts).

    python tools/bench_preprocess.py --size-mb 100 --workers 1 2 --json runs/bench_preprocess.json
    python tools/bench_preprocess.py --megatron-dir /path/to/Megatron-LM [--megatron-pythonpath DIR]
    python tools/bench_preprocess.py --size-mb 500 --engine --work-dir /tmp/bench_engine   # tools/pipeline.py too

The corpus (~``--size-mb`` of seeded synthetic JSONL, with sentence-level ``risk_spans``) and a 32k BPE
SentencePiece model trained on it (tools/train_tokenizer.py) are cached under ``--work-dir``. Ours runs
with its full workload (risk channel, harmfulness tags at 5%, end-of-document tokens); Megatron-LM with
``--append-eod``. Time is measured from each tool's "start of processing" log line (ours:
``[preprocess] ...``; Megatron-LM's: ``Time to startup: ...``) to its exit, so imports and tokenizer
loading are not counted; the wall time of the whole command is reported too. When both ran, the tokens
they wrote are compared (ours with its tag tokens removed must equal Megatron-LM's). ``--engine`` also
runs tools/pipeline.py (datatrove tasks, as many as workers, from scratch each time; marker ``[pipeline]``)
on the same corpus and flags, checks its merged dataset is byte-equal to tools/preprocess_data.py's, and
reports its time as a ratio to preprocess_data.py's (the engine's overhead).

Megatron-LM is not part of this project: point ``--megatron-dir`` at a checkout you have; its imports
must work in the Python given by ``--megatron-python`` (with ``--megatron-pythonpath`` prepended to
PYTHONPATH if it needs shims).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir))
sys.path.insert(0, ROOT)

from megatron_slung.data.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_slung.experiment.synthetic import write_jsonl  # noqa: E402

TAG = "<|potentially_unsafe|>"


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "platform": platform.platform()}


def prepare(args) -> tuple[str, str]:
    os.makedirs(args.work_dir, exist_ok=True)
    corpus = os.path.join(args.work_dir, f"corpus_{args.size_mb}mb_seed{args.seed}.jsonl")
    if not os.path.exists(corpus):
        print(f"[bench] generating {corpus} (~{args.size_mb} MB)", file=sys.stderr, flush=True)
        n = write_jsonl(corpus, target_bytes=int(args.size_mb * 1e6), seed=args.seed, risk_spans=True)  # atomic
        print(f"[bench] {n} documents", file=sys.stderr, flush=True)
    model = args.tokenizer_model
    if model is None:
        prefix = os.path.join(args.work_dir, f"spm_bpe{args.vocab_size}_{args.size_mb}mb_seed{args.seed}")
        model = prefix + ".model"
        if not os.path.exists(model):
            print(f"[bench] training the tokenizer {model}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus,
                            "--output-prefix", prefix, "--vocab-size", str(args.vocab_size),
                            "--max-sentences", "300000"], check=True)
    return corpus, model


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu(root: int) -> float:
    """CPU seconds used so far by process ``root`` and all its descendants (Linux /proc)."""
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0)
        todo += [child for child, par in parent.items() if par == pid]
    return total / os.sysconf("SC_CLK_TCK")


def timed(cmd, marker: str, env=None, cwd=None) -> dict:
    """Run ``cmd``; seconds from the first output line containing ``marker`` to the exit, wall time, and the
    CPU time of the whole process tree: in all, and after the marker (the processing itself)."""
    cpu0 = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    marked = [None]
    cpu_at_marker = [0.0]
    lines = []

    def read():
        for line in proc.stdout:
            if marked[0] is None and marker in line:
                marked[0] = time.perf_counter()
                cpu_at_marker[0] = _tree_cpu(proc.pid)
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    rc = proc.wait()
    end = time.perf_counter()
    reader.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({rc}):\n{''.join(lines[-30:])}")
    if marked[0] is None:
        raise RuntimeError(f"no line with {marker!r} in the output of {cmd[1]}")
    cpu = _children_cpu() - cpu0
    return {"seconds": end - marked[0], "wall_s": end - start, "cpu_s": cpu,
            "processing_cpu_s": cpu - cpu_at_marker[0], "log_tail": "".join(lines[-4:])}


def run_ours(args, corpus, model, workers, out):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus, "--output-prefix", out,
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--workers", str(workers),
           "--append-eod", "--harm-tag", TAG, "--harm-tag-prob", "0.05", "--log-interval", "1000000"]
    return timed(cmd, "[preprocess]", env=dict(os.environ, OMP_NUM_THREADS="1"))


def run_engine(args, corpus, model, workers, out):
    """tools/pipeline.py (datatrove) with --tasks = --workers = ``workers``, from scratch (no completed tasks)."""
    shutil.rmtree(out + ".pipeline", ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pipeline.py"), "--input", corpus, "--output-prefix", out,
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--tasks", str(workers),
           "--workers", str(workers), "--append-eod", "--harm-tag", TAG, "--harm-tag-prob", "0.05",
           "--log-interval", "1000000"]
    return timed(cmd, "[pipeline]", env=dict(os.environ, OMP_NUM_THREADS="1"))


def same_files(a: str, b: str) -> bool:
    import filecmp

    return all(filecmp.cmp(f"{a}_text_document{s}", f"{b}_text_document{s}", shallow=False)
               for s in (".bin", ".idx", ".risk.bin", ".risk.idx"))


def run_megatron(args, corpus, model, workers, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.megatron_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.megatron_pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [args.megatron_python, os.path.join(args.megatron_dir, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
           "--workers", str(workers), "--append-eod", "--log-interval", "1000000"]
    return timed(cmd, "Time to startup", env=env, cwd=args.megatron_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-mb", type=float, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the best is reported)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "bench_preprocess"))
    p.add_argument("--tokenizer-model", default=None, help="default: a BPE model trained on the corpus")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--megatron-dir", default=None, help="a Megatron-LM checkout to compare with")
    p.add_argument("--megatron-python", default=sys.executable)
    p.add_argument("--megatron-pythonpath", default=None, help="prepended to PYTHONPATH for Megatron-LM")
    p.add_argument("--engine", action="store_true",
                   help="also run tools/pipeline.py (datatrove) with as many tasks as workers, and report its overhead")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    corpus, model = prepare(args)
    size = os.path.getsize(corpus)
    tools = [("megatron_slung", run_ours)] + ([("pipeline", run_engine)] if args.engine else []) \
        + ([("Megatron-LM", run_megatron)] if args.megatron_dir else [])
    results = []
    for workers in args.workers:
        for _ in range(args.repeats):
            for name, fn in tools:  # interleaved, so a change in machine load hits both
                out = os.path.join(args.work_dir, f"out_{name}_w{workers}")
                load_before = os.getloadavg()[0]
                r = fn(args, corpus, model, workers, out)
                ds = IndexedDataset(f"{out}_text_document")
                r.update(tool=name, workers=workers, tokens=int(ds.num_tokens), documents=int(ds.num_documents),
                         mb_per_s=size / r["seconds"] / 1e6, tokens_per_s=ds.num_tokens / r["seconds"],
                         load_before=load_before, load_after=os.getloadavg()[0], output=out)
                print(f"[bench] {name} workers={workers}: {r['seconds']:.1f}s, {r['mb_per_s']:.2f} MB/s, "
                      f"{r['tokens_per_s']:.0f} tokens/s (load {load_before:.1f} -> {r['load_after']:.1f})",
                      file=sys.stderr, flush=True)
                results.append(r)

    best = {}
    for r in results:
        key = (r["tool"], r["workers"])
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = r
    identical = None
    if args.megatron_dir:
        identical = True
        tag_id = __import__("sentencepiece").SentencePieceProcessor(model_file=model).piece_to_id(TAG)
        for workers in args.workers:
            ours = IndexedDataset(best[("megatron_slung", workers)]["output"] + "_text_document")
            theirs = IndexedDataset(best[("Megatron-LM", workers)]["output"] + "_text_document")
            a = np.asarray(ours.read(0, ours.num_tokens))
            identical &= bool(np.array_equal(a[a != tag_id], np.asarray(theirs.read(0, theirs.num_tokens))))

    engine_identical = None
    if args.engine:  # the merged dataset must be preprocess_data.py's, byte for byte
        engine_identical = all(same_files(best[("pipeline", w)]["output"], best[("megatron_slung", w)]["output"])
                               for w in args.workers)

    rows = []
    order = {"megatron_slung": 0, "pipeline": 1, "Megatron-LM": 2}
    for (tool, workers), r in sorted(best.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
        ref = best.get(("Megatron-LM", workers))
        own = best.get(("megatron_slung", workers))
        rows.append({"tool": tool, "workers": workers, "seconds": round(r["seconds"], 2), "wall_s": round(r["wall_s"], 2),
                     "cpu_s": round(r["cpu_s"], 1), "processing_cpu_s": round(r["processing_cpu_s"], 1),
                     "mb_per_cpu_s": round(size / 1e6 / max(r["processing_cpu_s"], 1e-9), 3),
                     "mb_per_s": round(r["mb_per_s"], 3), "tokens_per_s": round(r["tokens_per_s"]),
                     "tokens": r["tokens"], "documents": r["documents"],
                     "speedup_vs_megatron": round(ref["seconds"] / r["seconds"], 2) if ref else None,
                     "time_vs_preprocess_data": round(r["seconds"] / own["seconds"], 3),
                     "load_before": round(r["load_before"], 2), "load_after": round(r["load_after"], 2)})
    print(f"\ncorpus: {corpus} ({size / 1e6:.1f} MB), tokenizer: {model}")
    print(f"machine: {machine_info()['cpu']}, {os.cpu_count()} cores")
    print("| tool | workers (= tasks) | seconds | MB/s | tokens/s | time vs preprocess_data.py | vs Megatron-LM "
          "| processing CPU s (MB per CPU s) | wall s / CPU s of the command | load before/after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['speedup_vs_megatron']:.2f}x" if r["speedup_vs_megatron"] else "-"
        print(f"| {r['tool']} | {r['workers']} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | {r['tokens_per_s']} | "
              f"{r['time_vs_preprocess_data']:.3f} | {ratio} | {r['processing_cpu_s']:.1f} ({r['mb_per_cpu_s']:.2f}) | {r['wall_s']:.1f} / {r['cpu_s']:.1f} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    if identical is not None:
        print(f"tokens identical to Megatron-LM's (tags removed): {'yes' if identical else 'NO'}")
    if engine_identical is not None:
        print(f"tools/pipeline.py's dataset byte-equal to tools/preprocess_data.py's: {'yes' if engine_identical else 'NO'}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "corpus": {"path": corpus, "bytes": size, "seed": args.seed},
                       "tokenizer": model, "results": rows, "tokens_identical_to_megatron": identical,
                       "pipeline_identical_to_preprocess_data": engine_identical,
                       "all_runs": [{k: v for k, v in r.items() if k != "log_tail"} for r in results]}, f, indent=1)
    return 0 if identical in (None, True) and engine_identical in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
