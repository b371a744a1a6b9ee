#!/usr/bin/env python
"""Benchmark the masked cross-entropy: forward+backward time and peak memory, side by side on the same inputs.

    python tools/bench_masked_ce.py --device cpu --tokens 4096 --vocab 32000 --dtype fp32 --policy masked \\
        --json benchmarks/masked_ce_cpu.json

Implementations (each measured in a fresh subprocess, so allocator state and peak memory don't leak between
them): torch_eager (log_softmax + gather + masking), torch_compile (the same under torch.compile, when it
compiles), liger (Liger-Kernel's cross-entropy, GPU, when installed; masked levels passed as ignore_index),
fused (megatron_slung's masked_cross_entropy), fused_inplace (the same, gradient written into the logits),
fused_linear (fused_linear_masked_cross_entropy from hidden [N, H] and weight [V, H]) next to
torch_eager_linear (hidden @ weight.T, then torch_eager) and liger_fused_linear (GPU, when installed).

Time: median of --repeats forward+backward runs after --warmup runs (CUDA events on the GPU).
Threads: each worker inherits OMP_NUM_THREADS (torch's default when it is not set: one per core);
``--threads 1,2`` runs every implementation at each of those counts instead. The table and the JSON
(``threads`` per result; ``threads`` and the workers' ``omp_num_threads`` in the report) say what was used.
Peak memory: the extra memory above the inputs during forward+backward, gradients included. On the GPU
torch.cuda.max_memory_allocated. On the CPU (which has no allocator statistics) a second fresh process per
implementation warms up on 8 tokens, then runs forward+backward once at full size while a helper thread
samples the resident set (/proc/self/statm) every 0.5 ms: peak minus the resident set before the run.
(Resetting the kernel's peak counter through /proc/self/clear_refs was tried first and dropped: on the
machine measured, writing it changed the memory behaviour it was meant to measure.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CE_IMPLS = ["torch_eager", "torch_compile", "liger", "fused", "fused_inplace"]
LINEAR_IMPLS = ["torch_eager_linear", "fused_linear", "liger_fused_linear"]


# ------------------------------------------------------------------------------------------ inputs
def make_inputs(args, vocab):
    g = torch.Generator().manual_seed(0)
    n = args.tokens
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.05] = -100
    risk = torch.multinomial(torch.tensor([0.1, 0.6, 0.2, 0.1]), n, replacement=True, generator=g).to(torch.uint8)
    return labels.to(args.device), risk.to(args.device)


def make_logits(args, vocab):
    g = torch.Generator(device=args.device).manual_seed(1)
    x = torch.randn(args.tokens, vocab, generator=g, device=args.device, dtype=torch.float32) * 2.0
    return x.to(DTYPES[args.dtype])


# ------------------------------------------------------------------------------------------ losses
def eager_loss(logits, labels, risk, policy, label_smoothing=0.0, z_loss=0.0, unlikelihood_eps=1e-9):
    """The plain torch way: log_softmax + gather + masking (float32 math)."""
    from megatron_slung.loss.policy import LossMode

    modes, weights = policy.mode_tensor(logits.device).long(), policy.weight_tensor(logits.device)
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)
    valid = labels != -100
    logp_t = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    mode, weight = modes[risk.long()], weights[risk.long()]
    loss = -logp_t
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean(dim=-1)
    if (mode == int(LossMode.UNLIKELIHOOD)).any():
        ul = -torch.log(torch.clamp(-torch.expm1(logp_t), min=unlikelihood_eps))
        loss = torch.where(mode == int(LossMode.UNLIKELIHOOD), ul, loss)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, dim=-1) ** 2
    carries = valid & (mode != int(LossMode.IGNORE))
    return (loss * weight * carries).sum()


def build_impl(name, args, policy, labels, risk):
    """Returns f(tensors) -> scalar loss, where tensors is (logits,) or (hidden, weight)."""
    from megatron_slung.loss import fused_linear_masked_cross_entropy, masked_cross_entropy

    if name == "torch_eager":
        return lambda x: eager_loss(x, labels, risk, policy)
    if name == "torch_compile":
        compiled = torch.compile(eager_loss, dynamic=True)
        return lambda x: compiled(x, labels, risk, policy)
    if name in ("fused", "fused_inplace") or name.startswith("fused_v"):
        if name.startswith("fused_v"):
            from megatron_slung.loss.backends import KernelBackend
            KernelBackend.variant = int(name[len("fused_v"):])
        inplace = name == "fused_inplace"
        return lambda x: masked_cross_entropy(x, labels, risk, policy, inplace_grad=inplace).loss_sum
    if name in ("liger", "liger_fused_linear"):
        liger_labels = _liger_labels(policy, labels, risk)
        if name == "liger":
            from liger_kernel.transformers.functional import liger_cross_entropy
            return lambda x: liger_cross_entropy(x, liger_labels, ignore_index=-100, reduction="sum")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return lambda h, w: liger_fused_linear_cross_entropy(h, w, liger_labels, ignore_index=-100, reduction="sum")
    if name == "torch_eager_linear":
        return lambda h, w: eager_loss(h @ w.t(), labels, risk, policy)
    if name == "fused_linear":
        return lambda h, w: fused_linear_masked_cross_entropy(h, w, labels, risk, policy).loss_sum
    raise ValueError(f"unknown impl {name!r}")


def _liger_labels(policy, labels, risk):
    """Liger has plain CE only: a policy of ce@1 / ignore becomes ignore_index on the ignored levels."""
    from megatron_slung.loss.policy import LossMode

    modes = set(policy.modes)
    if LossMode.UNLIKELIHOOD in modes or any(w != 1.0 for m, w in zip(policy.modes, policy.weights)
                                             if m == LossMode.CE):
        raise RuntimeError("Liger-Kernel has no unlikelihood or per-token weights; policy not expressible")
    ignored = policy.mode_tensor(labels.device)[risk.long()] == int(LossMode.IGNORE)
    return torch.where(ignored, torch.full_like(labels, -100), labels)


# ------------------------------------------------------------------------------------------ measuring
class RssSampler(threading.Thread):
    """Samples this process's resident set every `interval` seconds; .peak is the largest, in bytes."""

    def __init__(self, interval=0.0005):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, 0, True
        self.page = os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def stop(self):
        self.running = False
        self.join()
        self.peak = max(self.peak, self.rss())


def _setup(name, args, vocab, tokens):
    """Inputs and the loss function of one implementation at `tokens` tokens; returns (fn, fresh)."""
    from megatron_slung.loss import LossPolicy

    torch.manual_seed(0)
    sized = argparse.Namespace(**dict(vars(args), tokens=tokens))
    labels, risk = make_inputs(sized, vocab)
    fn = build_impl(name, sized, LossPolicy.parse(args.policy), labels, risk)
    if name in LINEAR_IMPLS:
        g = torch.Generator(device=args.device).manual_seed(2)
        hidden = torch.randn(tokens, args.hidden, generator=g, device=args.device).to(DTYPES[args.dtype])
        weight = (torch.randn(vocab, args.hidden, generator=g, device=args.device) / args.hidden ** 0.5).to(
            DTYPES[args.dtype])
        return fn, lambda: (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))
    base = make_logits(sized, vocab)
    return fn, lambda: (base.clone().requires_grad_(True),)


def measure(name, args, vocab):
    """Time one implementation (and, on the GPU, its peak memory): {"fwd_bwd_ms", "peak_mem_mb", ...}."""
    cuda = args.device == "cuda"
    fn, fresh = _setup(name, args, vocab, args.tokens)
    times, peaks = [], []
    for i in range(args.warmup + args.repeats):
        tensors = fresh()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*tensors).backward()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        else:
            t0 = time.perf_counter()
            fn(*tensors).backward()
            elapsed = (time.perf_counter() - t0) * 1e3
        del tensors
        if i >= args.warmup:
            times.append(elapsed)
    result = {"impl": name, "fwd_bwd_ms": statistics.median(times), "times_ms": times}
    if cuda:
        result["peak_mem_mb"] = max(peaks[args.warmup:])
    if name not in LINEAR_IMPLS:
        logits_bytes = args.tokens * vocab * torch.empty((), dtype=DTYPES[args.dtype]).element_size()
        result["logits_mb"] = logits_bytes / 2**20
        # bytes that must move: read the logits once, write the gradient once
        result["gb_per_s"] = 2 * logits_bytes / (result["fwd_bwd_ms"] * 1e-3) / 1e9
    else:
        result["hidden"] = args.hidden
    return result


def measure_cpu_memory(name, args, vocab):
    """Peak resident memory above the inputs during the first full-size forward+backward of a fresh process.

    A run on 8 tokens first loads libraries, starts thread pools and compiles (torch.compile is dynamic);
    the full-size run is then the first to need its buffers, so memory that a later run would reuse from
    the allocator's free lists is still counted.
    """
    fn_small, fresh_small = _setup(name, args, vocab, min(8, args.tokens))
    fn_small(*fresh_small()).backward()
    fn, fresh = _setup(name, args, vocab, args.tokens)
    tensors = fresh()
    gc.collect()
    sampler = RssSampler()
    before = sampler.rss()
    sampler.start()
    fn(*tensors).backward()
    sampler.stop()
    return {"peak_mem_mb": (sampler.peak - before) / 2**20}


def copy_bandwidth(args):
    """Device-to-device copy of a large buffer: (bytes read + bytes written) / time, median of 10."""
    x = torch.randn(2**30 // 4 * 2, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * x.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------ tp simulation
def _tp_rank(rank, world, args_dict, vocab, out_dir):
    """One rank of a gloo tensor-parallel group on the CPU: time the vocab-parallel loss on its shard."""
    import torch.distributed as dist

    from megatron_slung.loss import LossPolicy, masked_cross_entropy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args_dict["port"]))
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    args = argparse.Namespace(**args_dict)
    labels, risk = make_inputs(args, vocab)
    shard = vocab // world
    base = make_logits(args, vocab)[:, rank * shard:(rank + 1) * shard].contiguous()
    policy = LossPolicy.parse(args.policy)
    times = []
    for i in range(args.warmup + args.repeats):
        x = base.clone().requires_grad_(True)
        dist.barrier()
        t0 = time.perf_counter()
        masked_cross_entropy(x, labels, risk, policy, tp_group=dist.group.WORLD).loss_sum.backward()
        elapsed = (time.perf_counter() - t0) * 1e3
        if i >= args.warmup:
            times.append(elapsed)
        del x
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(times, f)
    dist.destroy_process_group()


def measure_tp(args, vocab):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_tp_rank, args=(args.tp_size, dict(vars(args), port=port), vocab, out_dir),
                           nprocs=args.tp_size, start_method="spawn")
        per_rank = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(args.tp_size)]
    # a step of the group takes as long as its slowest rank
    times = [max(ts) for ts in zip(*per_rank)]
    return {"impl": f"fused_tp{args.tp_size}", "fwd_bwd_ms": statistics.median(times), "peak_mem_mb": float("nan"),
            "note": f"{args.tp_size} gloo ranks on this machine, each V/{args.tp_size} columns; time of the slowest"}


# ------------------------------------------------------------------------------------------ driver
def run_worker(args):
    vocab = args.worker_vocab
    if args.worker == "tp":
        result = measure_tp(args, vocab)
    elif args.worker_memory:
        result = measure_cpu_memory(args.worker, args, vocab)
    else:
        result = measure(args.worker, args, vocab)
    result["threads"] = torch.get_num_threads()
    with open(args.worker_json, "w") as f:
        json.dump(result, f)


def run_in_subprocess(name, args, vocab, memory=False, threads=None):
    """One worker process; ``threads`` sets its OMP_NUM_THREADS (None: inherit this process's environment)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-json", path,
           "--worker-vocab", str(vocab)] + (["--worker-memory"] if memory else []) + args.passthrough
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            return {"impl": name, "skipped": reason[:300]}
        with open(path) as f:
            result = json.load(f)
        result["wall_s"] = round(time.time() - t0, 1)
        return result
    finally:
        os.unlink(path)


def machine_description(device):
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}"


def print_table(report):
    rows = [r for r in report["results"]]
    print(f"\n{report['device']}: N={report['tokens']} V={report['vocab']} {report['dtype']} policy={report['policy']}")
    omp = report.get("omp_num_threads")
    print(f"threads: {', '.join(map(str, report['threads']))} (OMP_NUM_THREADS {omp or 'not set'})")
    if report.get("copy_gb_per_s"):
        print(f"device copy bandwidth: {report['copy_gb_per_s']:.0f} GB/s (read + write)")
    print(f"{'impl':<20} {'threads':>7} {'fwd+bwd ms':>11} {'speedup':>8} {'extra peak MB':>14} {'mem ratio':>10} "
          f"{'GB/s':>7}")
    for r in rows:
        threads = str(r.get("threads", "-"))
        if "skipped" in r:
            print(f"{r['impl']:<20} {threads:>7} skipped: {r['skipped']}")
            continue
        # the baseline at the same thread count
        ref = next((b for b in rows if b["impl"] == ("torch_eager_linear" if r["impl"] in LINEAR_IMPLS else
                                                      "torch_eager") and "skipped" not in b
                    and b.get("threads") == r.get("threads")), None)
        speed = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if ref else "-"
        mem = f"{r['peak_mem_mb'] / ref['peak_mem_mb']:.3f}" if ref and ref["peak_mem_mb"] > 0 else "-"
        gbs = f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else "-"
        print(f"{r['impl']:<20} {threads:>7} {r['fwd_bwd_ms']:>11.2f} {speed:>8} {r['peak_mem_mb']:>14.1f} {mem:>10} "
              f"{gbs:>7}")
    print("speedup and mem ratio: against torch_eager (torch_eager_linear for the *_linear rows) at the same "
          "thread count")


def plot(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib, or the 'eval' extra)") from None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    by_impl = {}
    for entry in report["sweep"]:
        for r in entry["results"]:
            if "skipped" not in r:
                label = r["impl"] if len(report["threads"]) == 1 else f"{r['impl']} ({r.get('threads')} threads)"
                by_impl.setdefault(label, []).append((entry["vocab"], r["fwd_bwd_ms"], r["peak_mem_mb"]))
    for impl, pts in by_impl.items():
        v, t, m = zip(*sorted(pts))
        ax_t.plot(v, t, marker="o", label=impl)
        ax_m.plot(v, m, marker="o", label=impl)
    ax_t.set(xlabel="vocabulary size", ylabel="forward+backward (ms)", title="time")
    ax_m.set(xlabel="vocabulary size", ylabel="extra peak memory (MB)", title="memory")
    ax_t.legend()
    fig.suptitle(f"{report['device']}: N={report['tokens']} {report['dtype']} policy={report['policy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--policy", default="masked")
    p.add_argument("--tp-sim", action="store_true", help="also time the vocab-parallel loss on --tp-size gloo ranks (CPU)")
    p.add_argument("--tp-size", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="also sweep the vocabulary size and draw time and memory against it")
    p.add_argument("--plot-vocabs", help="comma-separated vocabulary sizes for --plot (default V/8,V/4,V/2,V)")
    p.add_argument("--impls", default=",".join(CE_IMPLS + LINEAR_IMPLS), help="comma-separated subset")
    p.add_argument("--variants", default="", help="CUDA kernel variants to time too, e.g. 1,2,3,4,5")
    p.add_argument("--hidden", type=int, help="hidden size for the *_linear impls (default 4096 cuda, 256 cpu)")
    p.add_argument("--threads", help="comma-separated thread counts to run each impl at (OMP_NUM_THREADS of "
                   "the workers), e.g. 1,2; default: inherit the environment")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", help=argparse.SUPPRESS)
    p.add_argument("--worker-vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hidden is None:
        args.hidden = 4096 if args.device == "cuda" else 256
    if args.worker:
        return run_worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    if args.tp_sim and args.device != "cpu":
        raise SystemExit("--tp-sim runs gloo ranks on the CPU; use --device cpu")
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.passthrough += ["--hidden", str(args.hidden)]

    impls = [i for i in args.impls.split(",") if i]
    impls += [f"fused_v{v}" for v in args.variants.split(",") if v]
    if args.device == "cpu":
        impls = [i for i in impls if not i.startswith("liger")]

    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [None]

    def one_size(vocab):
        results = []
        for threads in thread_counts:
            for name in impls:
                at = f", {threads} threads" if threads else ""
                print(f"[bench] {name} (V={vocab}{at}) ...", flush=True)
                result = run_in_subprocess(name, args, vocab, threads=threads)
                if args.device == "cpu" and "skipped" not in result and name != "tp":  # memory: another process
                    memory = run_in_subprocess(name, args, vocab, memory=True, threads=threads)
                    result["peak_mem_mb"] = memory.get("peak_mem_mb", float("nan"))
                result.setdefault("threads", threads)
                results.append(result)
        if args.tp_sim:
            print(f"[bench] fused on {args.tp_size} gloo ranks (V={vocab}) ...", flush=True)
            results.append(run_in_subprocess("tp", args, vocab))
        return results

    report = {
        "device": machine_description(args.device),
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "policy": args.policy,
        "hidden": args.hidden,
        "repeats": args.repeats,
        "threads": thread_counts if args.threads else [torch.get_num_threads()],
        "omp_num_threads": args.threads or os.environ.get("OMP_NUM_THREADS"),  # what the workers ran with
        "memory_method": ("torch.cuda.max_memory_allocated above the inputs" if args.device == "cuda" else
                          "resident set sampled every 0.5 ms during the first full-size run of a fresh process "
                          "(after an 8-token warm-up), peak minus the resident set before it"),
    }
    if args.device == "cuda":
        report["copy_gb_per_s"] = copy_bandwidth(args)
    report["results"] = one_size(args.vocab)
    print_table(report)
    if args.plot:
        vocabs = ([int(v) for v in args.plot_vocabs.split(",")] if args.plot_vocabs else
                  [args.vocab // 8, args.vocab // 4, args.vocab // 2])
        report["sweep"] = [{"vocab": v, "results": one_size(v)} for v in vocabs if v != args.vocab]
        report["sweep"].append({"vocab": args.vocab, "results": report["results"]})
        report["sweep"].sort(key=lambda e: e["vocab"])
        plot(report, args.plot)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
