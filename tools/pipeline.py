#!/usr/bin/env python
"""Raw JSONL -> risk tagging -> tokens + risk channel, in N resumable tasks on datatrove (local or SLURM).

    python tools/pipeline.py --input 'raw/*.jsonl' --output-prefix runs/data/corpus \\
        --tagger lexicon --lexicon 3:toxic.txt --unit sentence \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model runs/tok/spm.model \\
        --append-eod --harm-tag '<|potentially_unsafe|>' --tasks 8 --workers 2

writes ``runs/data/corpus_text_document.bin/.idx`` and ``.risk.bin/.idx``, equal byte for byte to
tools/tag_risk.py then tools/preprocess_data.py with the same flags, whatever ``--tasks`` and ``--workers``.
Its state is in ``runs/data/corpus.pipeline/``; rerunning the command after a crash redoes only the
tasks that did not finish. ``--executor slurm`` submits the tasks as a job array and the merge as a job
after it (``--slurm-dry-run`` prints the two sbatch scripts instead). The tagger flags are
tools/tag_risk.py's, the tokenizer and risk flags tools/preprocess_data.py's; without ``--tagger`` the
input's own ``--risk-key`` spans are used, as preprocess_data.py does. See docs/data_tools.md.
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

import preprocess_data  # noqa: E402  tools/preprocess_data.py: the tokenizer and risk flags
import tag_risk  # noqa: E402  tools/tag_risk.py: the tagger flags and config

from megatron_slung.data.corpus import InputError  # noqa: E402
from megatron_slung.data.indexed_dataset import IndexedDatasetError, dataset_exists  # noqa: E402
from megatron_slung.data.preprocess import Encoder, output_prefix_for  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL files or globs (.jsonl/.json, .gz/.zst)")
    p.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx (+ .risk.*); its state goes to {prefix}.pipeline/")
    p.add_argument("--merge", choices=("merge", "blend"), default="merge",
                   help="merge: one dataset; blend: keep the shard datasets and write {prefix}_{key}_document.blend, "
                        "their --data-path blend (token counts as weights)")
    preprocess_data.add_preprocess_args(p)
    tag_risk.add_tagger_args(p)
    g = p.add_argument_group("tasks and executor")
    g.add_argument("--tasks", type=int, default=1, help="shards of the input, one datatrove task each")
    g.add_argument("--workers", type=int, default=1,
                   help="tasks run at once (local: processes; slurm: array jobs at once, -1 = no limit)")
    g.add_argument("--executor", choices=("local", "slurm"), default="local")
    g = p.add_argument_group("SLURM (--executor slurm)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-time", default="24:00:00", help="time limit of each task's job")
    g.add_argument("--slurm-cpus-per-task", type=int, default=1)
    g.add_argument("--slurm-mem-per-cpu-gb", type=int, default=2)
    g.add_argument("--slurm-gpus-per-task", type=int, default=0, help="for --scorer hf on GPUs")
    g.add_argument("--slurm-qos", default=None)
    g.add_argument("--slurm-job-name", default="slung_data")
    g.add_argument("--slurm-env-command", default=None,
                   help="shell line run before each task (default: activate this Python's venv, PYTHONPATH=this checkout)")
    g.add_argument("--slurm-sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra #SBATCH --KEY=VALUE line; repeatable")
    g.add_argument("--slurm-dry-run", action="store_true", help="print the two sbatch scripts; submit nothing")
    args = p.parse_args(argv)
    opts = preprocess_data.options_from_args(p, args)
    if args.tasks < 1:
        p.error(f"--tasks must be >= 1, got {args.tasks}")
    if args.workers < 1 and not (args.executor == "slurm" and args.workers == -1):
        p.error(f"--workers must be >= 1 (or -1 with --executor slurm), got {args.workers}")
    if args.executor == "slurm" and not args.slurm_partition:
        p.error("--executor slurm needs --slurm-partition")
    if args.executor == "local":
        defaults = p.parse_args(["--input", "x", "--output-prefix", "x", "--tokenizer-type", args.tokenizer_type,
                                 "--tokenizer-model", "x"])
        changed = [k for k in vars(args) if k.startswith("slurm_") and getattr(args, k) != getattr(defaults, k)]
        if changed:
            p.error(f"--{changed[0].replace('_', '-')} is a SLURM flag: add --executor slurm")
    if not args.tagger:
        defaults = p.parse_args(["--input", "x", "--output-prefix", "x", "--tokenizer-type", args.tokenizer_type,
                                 "--tokenizer-model", "x"])
        tag_only = argparse.ArgumentParser()
        tag_risk.add_tagger_args(tag_only)
        changed = [a.dest for a in tag_only._actions if a.dest != "help" and getattr(args, a.dest) != getattr(defaults, a.dest)]
        if changed:
            p.error(f"--{changed[0].replace('_', '-')} is a tagger flag: add --tagger (lexicon, classifier or pii)")
    sbatch = {}
    for item in args.slurm_sbatch_arg:
        key, eq, value = item.partition("=")
        if not key or key.startswith("-"):
            p.error(f"--slurm-sbatch-arg {item!r}: give KEY=VALUE (or KEY), without the leading --")
        sbatch[key] = value if eq else ""
    args.sbatch_args = sbatch
    return args, opts


def settings_of(args, opts, tag_config) -> dict:
    """Everything a task's bytes depend on (compared on reruns; log_interval is not one of them)."""
    pre = dataclasses.asdict(opts)
    pre.pop("log_interval")
    used = [opts.tokenizer_model] + [v for v in opts.tokenizer_kwargs.values() if isinstance(v, str) and os.path.exists(v)]
    if tag_config:
        used += [spec.partition(":")[2] for spec in tag_config["lexicon"]] + list(tag_config["pii_names"])
        used += [tag_config["scorer_path"]] if tag_config["scorer_path"] else []
    return {"preprocess": pre, "tag": tag_config, "merge": args.merge,
            "files": {path: file_stamp(path) for path in used if path}}


def file_stamp(path: str):
    """(size, mtime) of a file, or of each file of a directory: a changed tokenizer, word list or model
    between a run and its resumption is refused rather than mixed into one dataset."""
    if os.path.isdir(path):
        return {name: file_stamp(os.path.join(path, name)) for name in sorted(os.listdir(path))}
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def main(argv=None) -> int:
    args, opts = get_args(argv)
    from megatron_slung.data import engine

    try:
        engine.require_datatrove()
        opts.check()
        tag_config = None
        if args.tagger:
            config = tag_risk.config_from_args(args)
            config.check()
            tag_config = dataclasses.asdict(config)
        Encoder(opts)  # fails early on a bad tokenizer or harm tag
        work_dir = engine.work_dir_for(args.output_prefix)
        plan = engine.make_plan(args.input, args.tasks, settings_of(args, opts, tag_config))
        engine.write_or_check_plan(work_dir, plan)
    except (InputError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pipeline = engine.build_pipeline(work_dir, opts, tag_config)
    merge_step = engine.MergeShards(work_dir, args.output_prefix, opts.json_keys, args.merge)
    finals = [output_prefix_for(os.path.abspath(args.output_prefix), key) for key in opts.json_keys]
    done = all(dataset_exists(f) if args.merge == "merge" else os.path.exists(f + ".blend") for f in finals)
    marker = engine.completion_marker(work_dir, 0, "merge")
    if os.path.exists(marker) and not done:  # the outputs were removed since: merge again
        os.remove(marker)
    n_shards, n_tasks = len(plan["shards"]), len({s["task"] for s in plan["shards"]})
    print(f"[pipeline] {len(plan['inputs'])} input file(s), {n_shards} shard(s) over {n_tasks} of {args.tasks} "
          f"task(s), {args.workers} at once, {args.executor} executor; state in {work_dir}", file=sys.stderr, flush=True)
    if args.executor == "slurm":
        return _slurm(args, work_dir, pipeline, merge_step)
    main_exec, merge_exec = engine.local_executors(work_dir, pipeline, merge_step, args.tasks, args.workers)
    start = time.perf_counter()
    try:
        merge_exec.run()  # runs the tasks first (datatrove's depends=), skipping completed ones
    except (InputError, FileNotFoundError, ValueError, IndexedDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = engine.total_summary(work_dir, plan, opts.json_keys)
    summary.seconds = time.perf_counter() - start
    summary.outputs = finals if args.merge == "merge" else []
    print(summary.format())
    if args.merge == "blend":
        for f in finals:
            print(f"wrote {f}.blend (train with: --data-path $(cat {f}.blend))")
    return 0


def _slurm(args, work_dir, pipeline, merge_step) -> int:
    from megatron_slung.data import engine

    main_exec, merge_exec = engine.slurm_executors(
        work_dir, pipeline, merge_step, args.tasks, args.workers, partition=args.slurm_partition,
        time_limit=args.slurm_time, cpus_per_task=args.slurm_cpus_per_task, mem_per_cpu_gb=args.slurm_mem_per_cpu_gb,
        gpus_per_task=args.slurm_gpus_per_task, job_name=args.slurm_job_name, qos=args.slurm_qos,
        env_command=args.slurm_env_command, sbatch_args=args.sbatch_args)
    if args.slurm_dry_run:
        for name, text in engine.slurm_scripts(main_exec, merge_exec):
            print(f"# ---- {name}\n{text}")
        return 0
    merge_exec.run()  # submits the task array, then the merge with --dependency=afterok
    print(f"submitted job {main_exec.job_id} ({args.tasks} tasks) and merge job {merge_exec.job_id}; "
          f"rerun this command after a failure to resubmit the unfinished tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
