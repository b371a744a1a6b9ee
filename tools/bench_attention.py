"""Document-level attention (--reset-attention-mask): the per-document fast path against the dense mask.

For each mean document length, B samples of S tokens are cut into documents (lengths drawn uniformly in
[1, 2 x mean - 1]); q, k, v [B, heads, S, d] are random. Timed, forward + backward, median of the repeats:

    dense      SDPA with the dense boolean mask [B, 1, S, S] (the reference; what a dataloader mask gives)
    fast       megatron_slung.model.attention.core_attention: one causal SDPA per document
    causal     plain causal SDPA over the whole sample (no documents: what the fast path cannot beat
               when a sample holds one document)

    python tools/bench_attention.py --json benchmarks/attention_cpu.json
    OMP_NUM_THREADS=1 python tools/bench_attention.py --json benchmarks/attention_cpu_threads_1.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slung.model.attention import core_attention  # noqa: E402


def document_ids_for(batch: int, seq: int, mean: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq:
            n = int(torch.randint(1, 2 * mean, (1,), generator=gen))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def time_it(fn, q, k, v, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):  # the first run warms up
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        fn().sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--doc-lengths", default="64,256,1024,2048", help="mean document lengths, comma-separated")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(a.batch, a.heads, a.seq, a.head_dim, generator=gen, dtype=dtype).requires_grad_()
               for _ in range(3))
    rows = []
    print(f"B={a.batch} heads={a.heads} S={a.seq} d={a.head_dim} {a.dtype}, threads={torch.get_num_threads()}")
    print(f"{'mean doc':>9} {'docs/sample':>11} {'dense ms':>9} {'fast ms':>9} {'causal ms':>9} {'dense/fast':>10}")
    for mean in (int(x) for x in a.doc_lengths.split(",")):
        doc = document_ids_for(a.batch, a.seq, mean, gen)
        docs = float((doc.max(dim=1).values + 1).float().mean())
        dense = time_it(lambda: core_attention(q, k, v, doc_ids=doc, dense_documents=True), q, k, v, a.repeats)
        fast = time_it(lambda: core_attention(q, k, v, doc_ids=doc), q, k, v, a.repeats)
        causal = time_it(lambda: core_attention(q, k, v), q, k, v, a.repeats)
        rows.append(dict(mean_doc_length=mean, docs_per_sample=docs, dense_ms=dense, fast_ms=fast, causal_ms=causal,
                         dense_over_fast=dense / fast))
        print(f"{mean:>9} {docs:>11.1f} {dense:>9.1f} {fast:>9.1f} {causal:>9.1f} {dense / fast:>9.2f}x")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(dict(config=vars(a), torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
