#!/usr/bin/env python
"""Rewrite the risky documents or spans of tagged JSONL with a local generator; resumable, seeded.

    # spans at level >= 3 rewritten by a local HF causal LM (vLLM when installed and a GPU is present):
    python tools/rephrase_risky.py --input tagged.jsonl --output rephrased.jsonl --generator path/to/lm
    # no model: each risky span replaced by a narrative template (a redaction saying what was there)
    python tools/rephrase_risky.py --input tagged.jsonl --output rephrased.jsonl --generator none

The output is JSONL that tools/preprocess_data.py takes as is (text, shifted risk_spans, and a `rephrase`
field with the provenance: source file and line, original and new spans, template, generator). It is
appended batch by batch; a rerun after a kill continues where it stopped and writes the same bytes.
See megatron_slung/safety/rephrase.py and docs/safety_data.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.corpus import InputError  # noqa: E402
from megatron_slung.safety.generator import ENGINES, GenerationConfig  # noqa: E402
from megatron_slung.safety.rephrase import UNITS, RephraseConfig, rephrase  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="tagged JSONL files or globs (with --risk-key spans)")
    p.add_argument("--output", required=True, help="output .jsonl (OUT.partial and OUT.state.json while running)")
    p.add_argument("--generator", required=True, metavar="DIR|none",
                   help="a local HF causal-LM directory, or none: replace units by narrative templates")
    p.add_argument("--engine", choices=ENGINES, default=None, help="auto (default): vLLM when installed and a GPU is present")
    p.add_argument("--unit", choices=UNITS, default="span", help="rewrite each risky span, or the whole document")
    p.add_argument("--min-level", type=int, default=3, help="risk level at or above which text is rewritten")
    p.add_argument("--template", action="append", default=[], metavar="FILE",
                   help="prompt template ({text}), or narrative template with --generator none ({level_name}, "
                        "{level}, {words}); repeatable; default: megatron_slung/safety/templates/rephrase|narrative")
    p.add_argument("--text-key", default="text")
    p.add_argument("--risk-key", default="risk_spans")
    p.add_argument("--emit", choices=("all", "rephrased"), default="all", help="write every record, or only rewritten ones")
    p.add_argument("--batch-size", type=int, default=16, help="units generated together")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256")
    p.add_argument("--temperature", type=float, default=None, help="default 0.7; 0: greedy")
    p.add_argument("--top-p", type=float, default=None, help="default 0.9")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="hf engine: cuda or cpu (default: cuda when available)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (a rerun continues)")
    p.add_argument("--summary-json", default=None, help="write the counts here")
    args = p.parse_args(argv)
    gen_flags = {"--engine": args.engine, "--max-new-tokens": args.max_new_tokens, "--temperature": args.temperature,
                 "--top-p": args.top_p, "--device": args.device}
    if args.generator == "none" and any(v is not None for v in gen_flags.values()):
        p.error(f"{', '.join(k for k, v in gen_flags.items() if v is not None)}: set how a generator samples; "
                "--generator none runs no model")
    defaults = GenerationConfig()
    args.engine = args.engine or "auto"
    args.max_new_tokens = defaults.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    args.temperature = defaults.temperature if args.temperature is None else args.temperature
    args.top_p = defaults.top_p if args.top_p is None else args.top_p
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           batch_size=args.batch_size)
    cfg = RephraseConfig(inputs=args.input, output=args.output, generator=args.generator, engine=args.engine,
                         unit=args.unit, min_level=args.min_level, text_key=args.text_key, risk_key=args.risk_key,
                         templates=tuple(args.template), emit=args.emit, seed=args.seed, gen=gen,
                         max_batches=args.max_batches, device=args.device)
    try:
        summary = rephrase(cfg, log=lambda m: print(m, flush=True))
    except (InputError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    print(f"{summary.get('records', 0):,} records: {summary.get('rephrased', 0):,} rephrased "
          f"({summary.get('units', 0):,} units), {summary.get('unchanged', 0):,} unchanged, "
          f"{summary.get('dropped_too_long', 0)} dropped (prompt too long), {summary.get('dropped_empty', 0)} dropped "
          f"(empty rewrite)" + ("" if summary.get("complete", True) else "; not finished") + f"; {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
