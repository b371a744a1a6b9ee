#!/usr/bin/env python
"""Time per iteration of the trainer against the same model in a plain ``transformers`` training loop, side by side.

    python tools/bench_vs_transformers.py                                   # both variants, default threads
    OMP_NUM_THREADS=1 python tools/bench_vs_transformers.py --json benchmarks/vs_transformers_1thread.json

Two variants of one size (4 layers, hidden 256, 8 heads, sequence 256, micro batch 4, global batch 16,
vocabulary 8192, fp32, one process):

- ``gpt3``:  Megatron's defaults (learned positions, LayerNorm, exact GeLU, biases, dropout 0.1), which is
  ``GPT2LMHeadModel`` with ``activation_function="gelu"``;
- ``llama``: RoPE, RMSNorm, SwiGLU 688, no biases, 4 query groups, dropout 0: ``LlamaForCausalLM``.

The trainer side is the real job (``python -m megatron_slung.pretrain --mock-data``: DeepSpeed engine, the fused
masked loss with the risk policy, AdamW, gradient clipping at 1.0, four micro-batches per step); its time per
iteration is read from its own metrics, leaving out the first logged interval (start-up). The plain loop builds
the Hugging Face model from the same ``GPTConfig`` (``hf_checkpoint.hf_adapter``), and does what such a script
does: four micro-batches of random tokens through ``model(input_ids, labels=...)``, ``loss / 4`` backward,
``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (``foreach``, the default), ``zero_grad``. The two run in turn
(trainer, loop, trainer, loop, ... ``--rounds`` times), so that a change in the machine's load hits both; the
figure is the median over rounds of each side. ``speed-up`` = loop ms / trainer ms: above 1 the trainer is
faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.bench_training import run_job  # noqa: E402

SIZES = ("--num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 --max-position-embeddings 256 "
         "--micro-batch-size 4 --global-batch-size 16 --vocab-size 8192 --lr 1e-4 --mock-data "
         "--eval-iters 0 --num-workers 0 --no-progress-bar --risk-loss-policy masked").split()
VARIANTS = {
    "gpt3": [],  # Megatron's defaults
    "llama": ("--position-embedding-type rope --normalization RMSNorm --swiglu --ffn-hidden-size 688 "
              "--disable-bias-linear --group-query-attention --num-query-groups 4 "
              "--hidden-dropout 0 --attention-dropout 0").split(),
}


def trainer_ms(flags: list, iters: int, log_interval: int) -> float:
    """Mean ms per iteration of the real job over its logged intervals after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "metrics.jsonl")
        cmd = [sys.executable, "-m", "megatron_slung.pretrain", *flags, "--train-iters", str(iters),
               "--log-interval", str(log_interval), "--metrics-jsonl", jsonl]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        _, steady = run_job(cmd, env, jsonl, "the trainer")
    return 1000 * sum(r["iter_time_s"] for r in steady) / len(steady)


def hf_model(flags: list):
    """The Hugging Face model that holds the same architecture as the trainer's flags."""
    import torch

    from megatron_slung.model import hf_checkpoint
    from megatron_slung.model.gpt import GPTModel
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.training.pretrain import gpt_config_from_args

    args = parse_args(flags + ["--train-iters", "1"], world_size=1)
    config = gpt_config_from_args(args, args.vocab_size)
    ours = GPTModel(config)  # its weights, so that both sides start from the same numbers
    model = hf_checkpoint.hf_model_from_state_dict(ours.state_dict(), config, torch.float32)
    # hf_model_from_state_dict returns an eval-mode model for inference; a training loop trains, with dropout.
    return model.train(), args


def loop_ms(flags: list, iters: int, warmup: int) -> float:
    """Mean ms per iteration of a plain transformers training loop, after ``warmup`` iterations."""
    import torch

    model, args = hf_model(flags)
    micro, accum = args.micro_batch_size, args.global_batch_size // args.micro_batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    times = []
    for it in range(warmup + iters):
        start = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, args.vocab_size, (micro, args.seq_length + 1), generator=gen)
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])  # transformers shifts the labels itself
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * sum(times) / len(times)


def _loop_in_subprocess(variant: str, iters: int, warmup: int) -> float:
    # A fresh process per measurement, like the trainer's, so neither side inherits the other's allocator state.
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import tools.bench_vs_transformers as b; "
            f"print(b.loop_ms(b.SIZES + b.VARIANTS[{variant!r}], {iters}, {warmup}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the transformers loop failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--iters", type=int, default=12, help="timed iterations per measurement")
    p.add_argument("--rounds", type=int, default=3, help="trainer/loop alternations per variant")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS", f"default ({os.cpu_count()} cores)")
    results = []
    for variant in args.variants:
        flags = SIZES + VARIANTS[variant]
        ours, theirs = [], []
        for r in range(args.rounds):
            # log interval 4: the first interval (start-up) is left out, the rest averaged
            ours.append(trainer_ms(flags, args.iters + 4, 4))
            theirs.append(_loop_in_subprocess(variant, args.iters, 2))
            print(f"{variant} round {r + 1}: trainer {ours[-1]:.1f} ms/iter, transformers loop {theirs[-1]:.1f} ms/iter",
                  flush=True)
        t, h = statistics.median(ours), statistics.median(theirs)
        results.append({"variant": variant, "trainer_ms_per_iter": t, "transformers_ms_per_iter": h,
                        "speedup": h / t, "trainer_rounds_ms": ours, "transformers_rounds_ms": theirs})
    print(f"\nOMP_NUM_THREADS: {threads}")
    print(f"{'variant':<8} {'trainer ms/it':>14} {'transformers ms/it':>19} {'speed-up':>9}")
    for r in results:
        print(f"{r['variant']:<8} {r['trainer_ms_per_iter']:>14.1f} {r['transformers_ms_per_iter']:>19.1f} {r['speedup']:>8.2f}x")
    if args.json:
        import torch
        import transformers

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "load_average": os.getloadavg()},
                       "omp_num_threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
                       "sizes": SIZES, "variants": {v: VARIANTS[v] for v in args.variants}, "iters": args.iters,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
