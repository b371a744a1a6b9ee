"""``python -m megatron_slung.eval TASK --model PATH [options]``

Tasks: perplexity, probe, zero-shot, generate-toxicity, steer, safe-beam. Each writes
``OUTPUT_DIR/results.json`` and ``OUTPUT_DIR/results.md`` (default OUTPUT_DIR: ``eval-results/TASK``);
the generation tasks also write ``generations.jsonl``. ``TASK --help`` lists a task's options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TASKS = {
    "perplexity": ("megatron_slung.eval.perplexity", "perplexity overall and per risk level"),
    "probe": ("megatron_slung.eval.probe", "toxicity identification with a linear probe on hidden states"),
    "zero-shot": ("megatron_slung.eval.zero_shot", "noisy-channel zero-shot toxicity identification"),
    "generate-toxicity": ("megatron_slung.eval.toxicity", "toxicity of sampled continuations (RealToxicityPrompts)"),
    "steer": ("megatron_slung.eval.steer", "inference-time intervention on attention heads: toxicity drop vs perplexity"),
    "safe-beam": ("megatron_slung.eval.safe_beam", "beam search that drops beams about to emit the harmfulness tag"),
}


def _module(task):
    import importlib

    return importlib.import_module(TASKS[task][0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_slung.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, (_, help_text) in TASKS.items():
        p = sub.add_parser(task, help=help_text, description=help_text)
        p.add_argument("--model", required=True, help="a local Hugging Face model directory or a megatron-slung checkpoint")
        p.add_argument("--output-dir", default=None, help=f"where results go (default eval-results/{task})")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
        p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--seed", type=int, default=1234)
        _module(task).add_arguments(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.output_dir = args.output_dir or os.path.join("eval-results", args.task)
    from megatron_slung.eval import common

    try:
        common.resolve_device(args.device)  # before loading anything: a missing GPU is a one-line error
        common.set_seed(args.seed)
        start = time.time()
        model, tokenizer = common.load_model(args.model, device=args.device, dtype=args.dtype)
        results, rows = _module(args.task).run(args, model, tokenizer)
    except (common.EvalInputError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {"model": args.model, **results, "seed": args.seed, "seconds": round(time.time() - start, 2)}
    paths = common.write_results(args.output_dir, args.task, results, rows,
                                 title=f"{args.task}: {args.model}")
    print(common.markdown_table(rows), end="")
    print(json.dumps({"results": paths["json"], "table": paths["markdown"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
