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
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.indexed_dataset import (  # noqa: E402
    RISK_SUFFIX,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    bin_path,
    dataset_exists,
    idx_path,
)
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


def prefixes_in_directory(directory: str) -> list[str]:
    """The dataset prefixes in ``directory`` (sorted), leaving out risk channels of datasets found there."""
    names = sorted(os.listdir(directory))
    stems = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, name)):
            stems.setdefault(stem, set()).add(ext)
    prefixes = []
    for stem, exts in sorted(stems.items()):
        if stem.endswith(RISK_SUFFIX) and stem[: -len(RISK_SUFFIX)] in stems:
            continue  # the risk channel of another dataset here
        if exts != {".bin", ".idx"}:
            missing = ".bin" if ".idx" in exts else ".idx"
            raise IndexedDatasetError(f"{os.path.join(directory, stem)}{missing}: missing (its {exts.pop()} is in {directory})")
        prefixes.append(os.path.join(directory, stem))
    if not prefixes:
        raise IndexedDatasetError(f"{directory}: no datasets (PREFIX.bin + PREFIX.idx) in this directory")
    return prefixes


def resolve_inputs(inputs: list[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            prefixes += prefixes_in_directory(item)
        elif dataset_exists(item):
            prefixes.append(item)
        else:
            raise IndexedDatasetError(f"{item}: not a directory and no dataset ({bin_path(item)} + {idx_path(item)})")
    return prefixes


def merge(prefixes: list[str], output_prefix: str, with_risk: bool | None = None, progress: bool = True) -> dict:
    """Merge ``prefixes`` into ``output_prefix``; returns a summary. ``with_risk=None``: when any input has risk."""
    out = os.path.abspath(output_prefix)
    for p in prefixes:
        if os.path.abspath(p) == out:
            raise IndexedDatasetError(f"{p}: an input cannot also be the output")
    datasets = [IndexedDataset(p) for p in prefixes]  # opening checks every file
    dtypes = {str(ds.dtype) for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{ds.prefix} ({ds.dtype})" for ds in datasets)
        raise IndexedDatasetError(f"inputs have different token dtypes and cannot be merged: {listing}")
    if with_risk is None:
        with_risk = any(ds.has_risk for ds in datasets)
    total_tokens = sum(ds.num_tokens for ds in datasets)
    dtype = datasets[0].dtype
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_tokens * dtype.itemsize, unit="B", unit_scale=True, desc="merge", file=sys.stderr)
    start = time.time()
    with IndexedDatasetBuilder(output_prefix, dtype=dtype, with_risk=with_risk) as builder:
        for ds in datasets:
            builder.add_index(ds.prefix)
            if bar is not None:
                bar.update(ds.num_tokens * dtype.itemsize)
    if bar is not None:
        bar.close()
    return {
        "inputs": len(datasets), "documents": builder.num_documents, "sequences": builder.num_sequences,
        "tokens": builder.num_tokens, "dtype": str(dtype), "risk": with_risk,
        "risk_counts": {int(level): int(n) for level, n in enumerate(builder.risk_counts) if n} if with_risk else {},
        "seconds": time.time() - start,
    }


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
