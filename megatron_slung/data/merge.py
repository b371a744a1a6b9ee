"""Merging indexed datasets (tokens and their risk channels) into one: the code behind
tools/merge_datasets.py and the merge step of tools/pipeline.py."""

from __future__ import annotations

import os
import sys
import time

from megatron_slung.data.indexed_dataset import (
    RISK_SUFFIX,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    bin_path,
    dataset_exists,
    idx_path,
)


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
