#!/usr/bin/env python
"""Merge indexed datasets (tokens and their risk channels) into one.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document   # Megatron style: a directory

A directory input stands for every dataset in it (``X.bin`` + ``X.idx``; ``X.risk.*`` files are X's risk
channel), in sorted order. The output has a risk channel when any input has one (inputs without one add
level 0). All inputs must share one token dtype. The output is written under temporary names and appears
only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.indexed_dataset import IndexedDatasetError  # noqa: E402
from megatron_slung.data.merge import merge, resolve_inputs  # noqa: E402
from megatron_slung.data.risk import level_name  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", nargs="+", required=True, metavar="PREFIX_OR_DIR",
                       help="dataset prefixes (PREFIX.bin/.idx) or directories holding them, merged in the order given")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    group.add_argument("--no-risk", action="store_true", help="write no risk channel even when inputs have one")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        prefixes = resolve_inputs(args.input)
        summary = merge(prefixes, args.output_prefix, with_risk=False if args.no_risk else None)
    except IndexedDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {summary['inputs']} datasets into {args.output_prefix}: {summary['documents']} documents, "
          f"{summary['sequences']} sequences, {summary['tokens']} {summary['dtype']} tokens "
          f"in {summary['seconds']:.1f}s")
    if summary["risk"]:
        levels = ", ".join(f"{level_name(k)}={n}" for k, n in summary["risk_counts"].items())
        print(f"risk channel: tokens per level: {levels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
