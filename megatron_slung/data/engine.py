"""Risk tagging and tokenisation as steps of a datatrove pipeline: the engine behind tools/pipeline.py.

One run goes raw JSONL -> (tagged in memory) -> one dataset per *shard* -> one merged dataset (or a
``--data-path`` blend file). Everything it keeps lives in ``{output_prefix}.pipeline/``:

    plan.json              the shards (input byte ranges), which task reads each, and every setting
    logs/tasks/            datatrove's logging dir of the N tasks: completions/NNNNN markers, stats, logs
    logs/merge/            the same for the one merge task
    shards/sNNNNN_{key}_document.bin/.idx (+ .risk.*)   one dataset per shard

Why the output never depends on workers, nodes or reruns:

- The plan is computed once from the input files (names, sizes) and ``--tasks``: whole files, and plain
  files larger than their share cut at line boundaries. A shard keeps its file number and line numbers
  (a task counts the newlines before its cut), so harmfulness-tag draws and error messages are those of
  tools/preprocess_data.py.
- A task turns each of its shards into its own dataset with the same code as tools/tag_risk.py
  (``ChunkTagger.tag_records``) and tools/preprocess_data.py (``Encoder.encode_records``), in one process.
- The merge concatenates the shard datasets in plan order (input order): the result equals
  tools/preprocess_data.py's output on the same input and flags, byte for byte.

Resuming: datatrove writes ``completions/NNNNN`` only after task NNNNN finished every shard, and skips
tasks that have one. Shard datasets are written under temporary names and renamed when complete; a task
killed mid-way has no marker and is redone whole on the next run. The merge runs only when every task
has its marker. A rerun whose inputs or settings differ from plan.json is refused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

from megatron_slung.data.corpus import (
    Chunk,
    Progress,
    atomic_output,
    expand_inputs,
    is_compressed,
    iter_records,
    read_chunks,
)

try:
    from datatrove.pipeline.base import PipelineStep
except ImportError as e:  # the module stays importable for the error message; building steps fails clearly
    _DATATROVE_ERROR = e

    class PipelineStep:  # type: ignore[no-redef]
        def __init__(self):
            require_datatrove()
else:
    _DATATROVE_ERROR = None

# "RANK:N": task RANK kills its whole process group (SIGKILL) after N chunks. For tests only: run the
# command in its own session (setsid), as a batch job is.
KILL_ENV = "SLUNG_PIPELINE_TEST_KILL"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir, os.path.pardir))


def require_datatrove() -> None:
    if _DATATROVE_ERROR is not None:
        raise ImportError("tools/pipeline.py needs datatrove: pip install datatrove "
                          "(or pip install -e '.[pipeline]')") from _DATATROVE_ERROR


def load_tool(name: str):
    """tools/NAME.py as module NAME (tools/tag_risk.py holds the tagger flags and config: one copy)."""
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Shard:
    """Bytes [start, end) of input file ``file_index`` (end None: to the end), read by task ``task``."""

    index: int
    task: int
    file_index: int
    path: str
    start: int = 0
    end: int | None = None


def plan_shards(files: list[str], tasks: int) -> list[Shard]:
    """Cut ``files`` into shards for ``tasks`` tasks of about equal bytes, in input order.

    Task t gets the bytes from t * total / tasks on; a plain file is cut at the first line start at or
    after such a point (compressed files are never cut). Only sizes and one ``readline`` per cut are read.
    """
    sizes = [os.path.getsize(p) for p in files]
    target = max(1, -(-sum(sizes) // tasks))
    shards: list[Shard] = []
    done = 0
    for i, (path, size) in enumerate(zip(files, sizes)):
        if is_compressed(path) or size == 0:
            shards.append(Shard(len(shards), min(done // target, tasks - 1), i, path))
            done += size
            continue
        start = 0
        with open(path, "rb") as f:
            while start < size:
                task = min(done // target, tasks - 1)
                cut = size if task == tasks - 1 else start + (task + 1) * target - done
                if cut < size:
                    f.seek(cut - 1)
                    cut = cut - 1 + len(f.readline())  # just after the newline ending the line at cut - 1
                shards.append(Shard(len(shards), task, i, path, start, None if cut >= size else cut))
                done += min(cut, size) - start
                start = cut
    return shards


def count_lines(path: str, end: int) -> int:
    """Newlines in the first ``end`` bytes of ``path`` (a shard's first line is this + 1)."""
    n = 0
    with open(path, "rb") as f:
        while end > 0:
            block = f.read(min(end, 16 << 20))
            if not block:
                break
            n += block.count(b"\n")
            end -= len(block)
    return n


def work_dir_for(output_prefix: str) -> str:
    return os.path.abspath(output_prefix) + ".pipeline"


def shard_prefix(work_dir: str, index: int, key: str) -> str:
    return os.path.join(work_dir, "shards", f"s{index:05d}_{key}_document")


def make_plan(inputs, tasks: int, settings: dict) -> dict:
    files = [os.path.abspath(p) for p in expand_inputs(inputs)]
    plan = {"version": 1, "tasks": tasks,
            "inputs": [{"path": p, "size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in files],
            "settings": settings, "shards": [dataclasses.asdict(s) for s in plan_shards(files, tasks)]}
    return json.loads(json.dumps(plan))  # as read back from plan.json (tuples become lists)


def write_or_check_plan(work_dir: str, plan: dict) -> bool:
    """Write ``plan.json``, or check it equals the one an earlier run wrote; True when it was new."""
    path = os.path.join(work_dir, "plan.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for what in ("version", "tasks", "inputs", "settings", "shards"):
            if old.get(what) != plan[what]:
                raise ValueError(f"{path}: an earlier run of this --output-prefix used other {what} "
                                 f"({_first_difference(old.get(what), plan[what])}); rerun it as it was, or "
                                 f"remove {work_dir} to start over")
        return False
    os.makedirs(work_dir, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(plan, f, indent=1)
    return True


def _first_difference(old, new, where="") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _first_difference(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where or 'value'}: was {old!r}, now {new!r}"


def load_plan(work_dir: str) -> dict:
    with open(os.path.join(work_dir, "plan.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------
# The steps. What flows between them: corpus.Chunk (raw lines), Tagged (parsed, tagged records), and
# ShardBegin / ShardEnd around each shard's items.


@dataclass
class ShardBegin:
    shard: Shard


@dataclass
class ShardEnd:
    shard: Shard


@dataclass
class Tagged:
    file_index: int
    path: str
    records: list  # (line_no, record) pairs with the risk field set
    nbytes: int


class ReadShards(PipelineStep):
    """Yields the chunks of this task's shards (from plan.json), each shard between ShardBegin/ShardEnd."""

    name = "read shards"
    type = "Reader"

    def __init__(self, work_dir: str, chunk_bytes: int = 1 << 20):
        super().__init__()
        self.work_dir = work_dir
        self.chunk_bytes = chunk_bytes

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        plan = load_plan(self.work_dir)
        if plan["tasks"] != world_size:
            raise ValueError(f"{self.work_dir}/plan.json is for {plan['tasks']} tasks, this executor runs {world_size}")
        kill_rank, _, kill_after = os.environ.get(KILL_ENV, "").partition(":")
        kill_after = int(kill_after) if kill_rank == str(rank) else None
        sent = 0
        for s in plan["shards"]:
            if s["task"] != rank:
                continue
            shard = Shard(**s)
            first_line = 1 + (count_lines(shard.path, shard.start) if shard.start else 0)
            yield ShardBegin(shard)
            for chunk in read_chunks(shard.path, shard.file_index, self.chunk_bytes, shard.start, shard.end,
                                     first_line):
                if kill_after is not None and sent >= kill_after:
                    os.killpg(os.getpgrp(), signal.SIGKILL)  # the test hook: the job is killed (scancel, node lost)
                self.stat_update("chunks")
                self.stat_update("bytes", value=len(chunk.data))
                yield chunk
                sent += 1
            yield ShardEnd(shard)


class TagRisk(PipelineStep):
    """tools/tag_risk.py's taggers (lexicon, classifier, pii; every flag of it) over each chunk."""

    name = "risk tagging"
    type = "Tagger"

    def __init__(self, tag_config: dict):
        super().__init__()
        self.tag_config = tag_config  # TagConfig's fields: plain data, picklable for any executor

    def run(self, data, rank: int = 0, world_size: int = 1):
        tag_risk = load_tool("tag_risk")
        config = tag_risk.TagConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.tag_config.items()})
        tagger = tag_risk.ChunkTagger(config)
        if "torch" in sys.modules:  # an HF scorer on the CPU: one thread per task, as tag_risk.py per worker
            sys.modules["torch"].set_num_threads(1)
        for item in data:
            if isinstance(item, Chunk):
                with self.track_time("chunk"):
                    pairs, chars = tagger.tag_records(item.path, iter_records(item))
                self.stat_update("documents", value=len(pairs))
                item = Tagged(item.file_index, item.path, pairs, len(item.data))
            yield item


class Tokenize(PipelineStep):
    """tools/preprocess_data.py's encoder: one dataset (tokens + risk channel) per shard and key."""

    name = "tokenize with risk channel"
    type = "Tokenizer"

    def __init__(self, work_dir: str, opts):
        super().__init__()
        self.work_dir = work_dir
        self.opts = opts  # a preprocess.PreprocessOptions

    def run(self, data, rank: int = 0, world_size: int = 1):
        from megatron_slung.data.indexed_dataset import IndexedDatasetBuilder
        from megatron_slung.data.preprocess import Encoder, KeyStats, Summary, add_encoded_chunk

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        encoder = Encoder(self.opts)
        vocab_size = encoder.tokenizer.vocab_size
        builders, summary, progress = {}, None, None
        try:
            for item in data:
                if isinstance(item, ShardBegin):
                    summary = Summary(keys={k: KeyStats() for k in self.opts.json_keys})
                    progress = Progress(self.opts.log_interval, what=f"documents [task {rank}, shard {item.shard.index}]")
                    start = time.perf_counter()
                    builders = {key: IndexedDatasetBuilder(shard_prefix(self.work_dir, item.shard.index, key),
                                                           vocab_size=vocab_size, with_risk=True)
                                for key in self.opts.json_keys}
                elif isinstance(item, ShardEnd):
                    for key, builder in builders.items():
                        summary.keys[key].risk_counts = builder.risk_counts.tolist()
                        builder.finalize()
                    builders = {}
                    summary.seconds = time.perf_counter() - start
                    path = os.path.join(self.work_dir, "shards", f"s{item.shard.index:05d}.summary.json")
                    with atomic_output(path) as tmp, open(tmp, "w") as f:
                        json.dump(dataclasses.asdict(summary), f)
                else:
                    with self.track_time("chunk"):
                        if isinstance(item, Chunk):
                            result = encoder.encode_chunk(item)
                        else:
                            result = encoder.encode_records(item.path, item.file_index, item.records, item.nbytes)
                    progress.update(result["records"], result["nbytes"], add_encoded_chunk(summary, builders, result))
                    self.stat_update("documents", value=result["records"])
        except BaseException:
            for builder in builders.values():
                builder.abort()
            raise
        return
        yield  # a generator (datatrove drains the last step)


class MergeShards(PipelineStep):
    """After every task: the shard datasets, in plan order, into ``{output_prefix}_{key}_document``
    (``mode="merge"``), or a ``--data-path`` blend file ``{output_prefix}_{key}_document.blend``
    listing them with their token counts as weights (``mode="blend"``)."""

    name = "merge shards"
    type = "Writer"

    def __init__(self, work_dir: str, output_prefix: str, json_keys, mode: str = "merge"):
        super().__init__()
        if mode not in ("merge", "blend"):
            raise ValueError(f"--merge {mode!r}: use merge or blend")
        self.work_dir = work_dir
        self.output_prefix = os.path.abspath(output_prefix)
        self.json_keys = tuple(json_keys)
        self.mode = mode

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from megatron_slung.data.indexed_dataset import IndexedDataset
        from megatron_slung.data.merge import merge
        from megatron_slung.data.preprocess import output_prefix_for

        if data:
            for _ in data:
                pass
        plan = load_plan(self.work_dir)
        missing = [t for t in range(plan["tasks"]) if not os.path.exists(completion_marker(self.work_dir, t))]
        if missing:
            raise RuntimeError(f"{self.work_dir}: tasks {missing[:10]} have no completion marker; not merging "
                               "(rerun the same command to redo them)")
        shards = plan["shards"]
        for key in self.json_keys:
            prefixes = [shard_prefix(self.work_dir, s["index"], key) for s in shards]
            final = output_prefix_for(self.output_prefix, key)
            if self.mode == "merge":
                merge(prefixes, final, with_risk=True, progress=False)
            else:
                pairs = [(IndexedDataset(p).num_tokens, p) for p in prefixes]
                with atomic_output(final + ".blend") as tmp, open(tmp, "w") as f:
                    f.write("".join(f"{n} {p}\n" for n, p in pairs if n))
        summary = total_summary(self.work_dir, plan, self.json_keys)
        summary.outputs = [output_prefix_for(self.output_prefix, key) for key in self.json_keys]
        with atomic_output(os.path.join(self.work_dir, "summary.json")) as tmp, open(tmp, "w") as f:
            json.dump(summary.to_dict(), f, indent=1)
        return
        yield


def completion_marker(work_dir: str, rank: int, stage: str = "tasks") -> str:
    return os.path.join(work_dir, "logs", stage, "completions", f"{rank:05d}")


def total_summary(work_dir: str, plan: dict, json_keys):
    from megatron_slung.data.preprocess import KeyStats, Summary

    total = Summary(keys={k: KeyStats() for k in json_keys})
    seconds = []
    for s in plan["shards"]:
        with open(os.path.join(work_dir, "shards", f"s{s['index']:05d}.summary.json")) as f:
            d = json.load(f)
        part = Summary(records=d["records"], input_bytes=d["input_bytes"], empty_where=d["empty_where"],
                       keys={k: KeyStats(**v) for k, v in d["keys"].items()})
        total.add(part)
        seconds.append(d["seconds"])
    total.seconds = sum(seconds)  # shard time summed over tasks (CPU-seconds of encoding, not wall time)
    return total


# ---------------------------------------------------------------------------------------------------
# Executors


def build_pipeline(work_dir: str, opts, tag_config: dict | None, chunk_bytes: int = 1 << 20) -> list:
    steps = [ReadShards(work_dir, chunk_bytes)]
    if tag_config is not None:
        steps.append(TagRisk(tag_config))
    steps.append(Tokenize(work_dir, opts))
    return steps


def local_executors(work_dir, pipeline, merge_step, tasks: int, workers: int):
    from multiprocessing import get_all_start_methods as mp_start_methods

    from datatrove.executor import LocalPipelineExecutor

    # fork where there is one (as preprocess_data.py's pools): no re-import per task, and the tasks are children
    # of this process (their CPU time is accounted to it). No CUDA is initialised here before the fork.
    start = "fork" if "fork" in mp_start_methods() else "spawn"
    main = LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=os.path.join(work_dir, "logs", "tasks"),
                                 start_method=start)
    merge = LocalPipelineExecutor([merge_step], tasks=1, workers=1, logging_dir=os.path.join(work_dir, "logs", "merge"),
                                  depends=main)
    return main, merge


def slurm_executors(work_dir, pipeline, merge_step, tasks: int, workers: int, *, partition: str, time_limit: str,
                    cpus_per_task: int = 1, mem_per_cpu_gb: int = 2, gpus_per_task: int = 0, job_name: str = "slung_data",
                    qos: str | None = None, env_command: str | None = None, sbatch_args: dict | None = None):
    """Two SLURM jobs: an array of ``tasks`` (at most ``workers`` at once), then the merge (afterok)."""
    from datatrove.executor import SlurmPipelineExecutor

    if env_command is None:  # the same Python environment and checkout on the compute nodes
        activate = os.path.join(sys.prefix, "bin", "activate")
        env_command = (f"source {activate}; " if os.path.exists(activate) else "") + f"export PYTHONPATH={ROOT}:$PYTHONPATH"
    common = dict(partition=partition, time=time_limit, qos=qos or "", env_command=env_command,
                  sbatch_args=sbatch_args or {}, mail_user=None)
    main = SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers, cpus_per_task=cpus_per_task,
                                 mem_per_cpu_gb=mem_per_cpu_gb, gpus_per_task=gpus_per_task, job_name=job_name,
                                 logging_dir=os.path.join(work_dir, "logs", "tasks"),
                                 slurm_logs_folder=os.path.join(work_dir, "logs", "slurm"), **common)
    merge = SlurmPipelineExecutor([merge_step], tasks=1, workers=1, cpus_per_task=1, mem_per_cpu_gb=mem_per_cpu_gb,
                                  job_name=f"{job_name}_merge", depends=main,
                                  logging_dir=os.path.join(work_dir, "logs", "merge"),
                                  slurm_logs_folder=os.path.join(work_dir, "logs", "slurm"), **common)
    return main, merge


def slurm_scripts(main, merge) -> list[tuple[str, str]]:
    """The sbatch scripts ``run()`` would submit (the task array, then the merge), without submitting."""
    out = []
    for name, ex in (("tasks", main), ("merge", merge)):
        todo = max(1, len(ex.get_incomplete_ranks()))
        sbatch = ex.get_sbatch_args(min(todo, ex.max_array_size))
        if ex is merge:
            sbatch["dependency"] = "afterok:<the tasks' job id>"
        run = f"srun -l -n {ex.nodes_per_task} launch_pickled_pipeline {ex.logging_dir.resolve_paths('executor.pik')}"
        out.append((name, ex.get_launch_file_contents(sbatch, run)))
    return out
