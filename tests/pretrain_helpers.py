"""Shared pieces of the trainer tests: a tiny model's flags and ways to run the real job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 4 layers so that PP=2 has two per stage; GQA (2 groups) so that TP=2 splits groups; a masking policy
# with unlikelihood so that every loss mode and the global-batch normalisation are exercised.
# Llama style, said explicitly (the flags' defaults are Megatron's GPT-3 style).
LLAMA_STYLE = ("--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
               "--hidden-dropout 0 --attention-dropout 0").split()
# GPT-3 style is what Megatron builds without flags: learned positions, LayerNorm, GeLU, biases.
TINY_SIZES = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
        "--ffn-hidden-size 96 "
        "--seq-length 32 --micro-batch-size 2 --global-batch-size 8 --lr 3e-3 --min-lr 3e-4 "
        "--lr-decay-style cosine --lr-warmup-iters 2 --mock-data --vocab-size 256 --log-interval 1 "
        "--eval-iters 0 --num-workers 0 --risk-loss-policy 0:ce,1:ce,2:ignore,3:unlikelihood "
        "--clip-grad 0.5 --no-progress-bar").split()
TINY = TINY_SIZES + LLAMA_STYLE
# Megatron's defaults but dropout (whose masks depend on the layout): what a GPT-3 script without architecture
# flags builds.
TINY_GPT3 = TINY_SIZES + ["--hidden-dropout", "0", "--attention-dropout", "0"]


def env(**extra) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out.update(extra)
    return out


def run_cli(args, *, extra_env=None, timeout=600, launcher=None) -> subprocess.CompletedProcess:
    """``python -m megatron_slung.pretrain ARGS`` (or ``launcher + [-m, megatron_slung.pretrain] + ARGS``)."""
    cmd = (launcher or [sys.executable]) + ["-m", "megatron_slung.pretrain"] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_records(records, kind="train") -> list:
    return [r for r in records if r["kind"] == kind]


def pretrain_body(rank, world_size, argv):
    """For tests.distributed.run_distributed: run the job on this rank; the logging rank returns its records."""
    from megatron_slung.training.pretrain import pretrain

    out = pretrain(list(argv))
    return out["records"] if rank == world_size - 1 else None
