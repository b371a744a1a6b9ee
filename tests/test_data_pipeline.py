"""tools/pipeline.py (datatrove tasks): same bytes as tag_risk.py + preprocess_data.py whatever the tasks and
workers, resume after a killed task, bad input by file:line, blend output, SLURM scripts and array tasks."""

import glob
import gzip
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from megatron_slung.data.engine import plan_shards
from tests.data_tools_fixtures import ROOT, corpus_file, corpus_records, run_tool, sp_model, write_jsonl  # noqa: F401
from tests.test_tagging import tiny_classifier  # noqa: F401

DATASET_FILES = ("_text_document.bin", "_text_document.idx", "_text_document.risk.bin", "_text_document.risk.idx")
TAG = "<|potentially_unsafe|>"


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, corpus_records):  # noqa: F811
    """Three plain files of unequal size and one .gz file (never cut), untagged."""
    d = tmp_path_factory.mktemp("raw")
    recs = [{"id": r["id"], "text": r["text"]} for r in corpus_records]
    write_jsonl(d / "a.jsonl", recs[:150])
    write_jsonl(d / "b.jsonl", recs[150:170])
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[170:230])
    write_jsonl(d / "d.jsonl", recs[230:])
    words = recs[0]["text"].split()
    (d / "toxic.txt").write_text(f"{words[2]}\n{words[5]}\n")
    return d


def tag_flags(raw_dir):
    return ["--unit", "sentence", "--tagger", "lexicon", "--lexicon", f"3:{raw_dir / 'toxic.txt'}", "--tagger", "pii"]


def tok_flags(sp_model):  # noqa: F811
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod",
            "--harm-tag", TAG, "--harm-tag-prob", "0.5"]


def inputs(raw_dir):
    return sorted(glob.glob(str(raw_dir / "*.jsonl*")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, raw_dir, sp_model):  # noqa: F811
    """tools/tag_risk.py on each file, then tools/preprocess_data.py on the tagged files."""
    d = tmp_path_factory.mktemp("ref")
    tagged = d / "tagged"
    tagged.mkdir()
    for path in inputs(raw_dir):
        run_tool("tag_risk.py", "--input", path, "--output", tagged / os.path.basename(path), *tag_flags(raw_dir))
    run_tool("preprocess_data.py", "--input", str(tagged / "*.jsonl*"), "--output-prefix", d / "ref",
             *tok_flags(sp_model), "--workers", "2")
    return str(d / "ref")


def run_pipeline(out, raw_dir, sp_model, *extra, check=True, env=None):  # noqa: F811
    return run_tool("pipeline.py", "--input", str(raw_dir / "*.jsonl*"), "--output-prefix", out,
                    *tag_flags(raw_dir), *tok_flags(sp_model), *extra, check=check, env=env)


def same_dataset(a, b):
    return all(open(a + s, "rb").read() == open(b + s, "rb").read() for s in DATASET_FILES)


def shard_bytes(out):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(f"{out}.pipeline/shards/*document*"))}


def test_plan_cuts_plain_files_at_lines_and_keeps_compressed_whole(raw_dir):
    files = inputs(raw_dir)
    shards = plan_shards(files, 5)
    assert [s.task for s in shards] == sorted(s.task for s in shards)  # input order = task order
    for f in files:
        mine = [s for s in shards if s.path == f]
        if f.endswith(".gz"):
            assert len(mine) == 1 and mine[0].end is None
        data = open(f, "rb").read()
        for s in mine:
            assert s.start == 0 or data[s.start - 1:s.start] == b"\n"
        assert mine[0].start == 0 and mine[-1].end is None  # the shards of a file tile it
        assert all(x.end == y.start for x, y in zip(mine, mine[1:]))
    assert len({s.task for s in shards}) == 5


def test_merge_equals_tag_risk_then_preprocess_whatever_tasks_and_workers(tmp_path, raw_dir, sp_model, reference):  # noqa: F811
    run_pipeline(tmp_path / "t1", raw_dir, sp_model, "--tasks", "1")
    assert same_dataset(str(tmp_path / "t1"), reference)
    run_pipeline(tmp_path / "w1", raw_dir, sp_model, "--tasks", "5", "--workers", "1")
    run_pipeline(tmp_path / "w3", raw_dir, sp_model, "--tasks", "5", "--workers", "3")
    assert same_dataset(str(tmp_path / "w1"), reference) and same_dataset(str(tmp_path / "w3"), reference)
    # each task's own output is the same bytes whatever ran it alongside
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w3") and len(shard_bytes(tmp_path / "w1")) > 5
    summary = json.load(open(tmp_path / "w3.pipeline" / "summary.json"))
    assert summary["records"] == len(open(raw_dir / "a.jsonl").readlines()) + 20 + 60 + len(open(raw_dir / "d.jsonl").readlines())


def test_killed_task_is_redone_and_completed_tasks_are_skipped(tmp_path, raw_dir, sp_model, reference):  # noqa: F811
    out = tmp_path / "k"
    # task 1 dies after its first chunk, with everything the job started (its own session: the test's survives)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pipeline.py"), "--input", str(raw_dir / "*.jsonl*"),
           "--output-prefix", str(out), *tag_flags(raw_dir), *tok_flags(sp_model), "--tasks", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", SLUNG_PIPELINE_TEST_KILL="1:1"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    done = out.parent / "k.pipeline" / "logs" / "tasks" / "completions"
    assert sorted(os.listdir(done)) == ["00000"]
    assert not os.path.exists(f"{out}_text_document.idx")  # no merge, no output
    plan = json.load(open(out.parent / "k.pipeline" / "plan.json"))
    task0 = [p for s in plan["shards"] if s["task"] == 0
             for p in glob.glob(f"{out}.pipeline/shards/s{s['index']:05d}_*")]
    before = {p: os.stat(p).st_mtime_ns for p in task0 + [str(done / "00000")]}
    leftovers = glob.glob(f"{out}.pipeline/shards/*.partial-*")
    assert leftovers  # the killed task's half-written shard, under a temporary name
    run_pipeline(out, raw_dir, sp_model, "--tasks", "3")
    assert {p: os.stat(p).st_mtime_ns for p in before} == before  # task 0 was skipped, not redone
    assert sorted(os.listdir(done)) == ["00000", "00001", "00002"]
    assert not glob.glob(f"{out}.pipeline/shards/*.partial-*")
    assert same_dataset(str(out), reference)
    # a third run has nothing to do and leaves everything as it is
    mtime = os.stat(f"{out}_text_document.idx").st_mtime_ns
    run_pipeline(out, raw_dir, sp_model, "--tasks", "3")
    assert os.stat(f"{out}_text_document.idx").st_mtime_ns == mtime


def test_rerun_with_other_settings_is_refused(tmp_path, raw_dir, sp_model):  # noqa: F811
    out = tmp_path / "s"
    run_pipeline(out, raw_dir, sp_model, "--tasks", "2")
    proc = run_pipeline(out, raw_dir, sp_model, "--tasks", "2", "--seed", "9", check=False)
    assert proc.returncode == 1 and "used other settings (preprocess.seed: was 1234, now 9)" in proc.stderr
    proc = run_pipeline(out, raw_dir, sp_model, "--tasks", "3", check=False)
    assert proc.returncode == 1 and "used other tasks" in proc.stderr


def test_bad_input_is_named_by_file_and_line_in_a_cut_file(tmp_path, sp_model, corpus_records):  # noqa: F811
    recs = [{"text": r["text"]} for r in corpus_records[:200]]
    path = tmp_path / "one.jsonl"
    lines = [json.dumps(r) for r in recs]
    lines[170] = '{"text": "cut off'  # line 171, in the second half: the second task must count lines
    path.write_text("\n".join(lines) + "\n")
    proc = run_tool("pipeline.py", "--input", path, "--output-prefix", tmp_path / "bad", "--tasks", "2",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, check=False)
    assert proc.returncode == 1
    assert f"error: {path}:171: malformed JSON" in proc.stderr
    assert not glob.glob(str(tmp_path / "bad_text_document*"))
    assert not glob.glob(str(tmp_path / "bad.pipeline" / "shards" / "*.partial-*"))


def test_flags_without_their_mode_are_refused(tmp_path, raw_dir, sp_model):  # noqa: F811
    base = ["--input", str(raw_dir / "a.jsonl"), "--output-prefix", tmp_path / "x", *tok_flags(sp_model)]
    proc = run_tool("pipeline.py", *base, "--lexicon", "3:x.txt", check=False)
    assert proc.returncode == 2 and "--lexicon is a tagger flag" in proc.stderr
    proc = run_tool("pipeline.py", *base, "--slurm-partition", "p", check=False)
    assert proc.returncode == 2 and "--slurm-partition is a SLURM flag" in proc.stderr


def test_blend_lists_the_shards_with_token_weights(tmp_path, raw_dir, sp_model, reference):  # noqa: F811
    from megatron_slung.data.indexed_dataset import IndexedDataset

    out = tmp_path / "b"
    run_pipeline(out, raw_dir, sp_model, "--tasks", "3", "--merge", "blend")
    assert not os.path.exists(f"{out}_text_document.bin")
    items = open(f"{out}_text_document.blend").read().split()
    weights, prefixes = [int(w) for w in items[0::2]], items[1::2]
    datasets = [IndexedDataset(p) for p in prefixes]
    assert weights == [ds.num_tokens for ds in datasets]
    ref = IndexedDataset(reference + "_text_document")
    docs = [(ds.get(i).tolist(), ds.get_risk(i).tolist()) for ds in datasets for i in range(len(ds))]
    assert docs == [(ref.get(i).tolist(), ref.get_risk(i).tolist()) for i in range(len(ref))]


def test_hf_classifier_tagger_in_the_engine_equals_tag_risk(tmp_path, raw_dir, sp_model, tiny_classifier):  # noqa: F811
    import numpy as np

    from megatron_slung.data.scorers import build_scorer
    from megatron_slung.data.tagging import split_sentences

    src = raw_dir / "b.jsonl"
    texts = [json.loads(line)["text"] for line in open(src)]
    scores = build_scorer("hf", tiny_classifier)([t[s:e] for t in texts for s, e in split_sentences(t)])
    low, high = np.quantile(scores, [0.3, 0.7])  # thresholds that give a random classifier three levels
    clf = ["--tagger", "classifier", "--scorer", "hf", "--scorer-path", tiny_classifier, "--scorer-batch-size", "7",
           "--scorer-device", "cpu", "--toxic-threshold", str(high), "--ambiguous-threshold", str(low)]
    run_tool("tag_risk.py", "--input", src, "--output", tmp_path / "t.jsonl", *clf)
    run_tool("preprocess_data.py", "--input", tmp_path / "t.jsonl", "--output-prefix", tmp_path / "ref", *tok_flags(sp_model))
    run_tool("pipeline.py", "--input", src, "--output-prefix", tmp_path / "eng", *clf, *tok_flags(sp_model), "--tasks", "2")
    assert same_dataset(str(tmp_path / "eng"), str(tmp_path / "ref"))
    levels = json.load(open(tmp_path / "eng.pipeline" / "summary.json"))["keys"]["text"]["risk_counts"]
    assert set(levels) == {"0", "1", "2", "3"}  # EOD tokens, and the three classifier levels


FAKE_SBATCH = """#!/bin/sh
# records each submitted script and its arguments; prints a job id as sbatch does
n=$(ls "$SBATCH_LOG" | grep -c '[.]sh$')
cp "$(eval echo \\${$#})" "$SBATCH_LOG/job$n.sh"
echo "$@" > "$SBATCH_LOG/job$n.args"
echo "Submitted batch job $((100 + n))"
"""


def test_slurm_scripts_and_array_tasks_run_offline(tmp_path, raw_dir, sp_model, reference):  # noqa: F811
    out = tmp_path / "sl"
    slurm = ["--executor", "slurm", "--tasks", "3", "--workers", "2", "--slurm-partition", "cpu",
             "--slurm-time", "1:00:00", "--slurm-cpus-per-task", "2", "--slurm-sbatch-arg", "account=proj"]
    dry = run_pipeline(out, raw_dir, sp_model, *slurm, "--slurm-dry-run").stdout
    assert "#SBATCH --array=0-2%2" in dry and "#SBATCH --partition=cpu" in dry and "#SBATCH --account=proj" in dry
    assert "#SBATCH --cpus-per-task=2" in dry and "launch_pickled_pipeline" in dry
    assert "#SBATCH --dependency=afterok:" in dry and f"PYTHONPATH={ROOT}" in dry
    # submit with a stand-in sbatch, then run each array task here as SLURM would on a node
    bindir, log = tmp_path / "bin", tmp_path / "sbatch"
    bindir.mkdir()
    log.mkdir()
    (bindir / "sbatch").write_text(FAKE_SBATCH)
    (bindir / "scontrol").write_text("#!/bin/sh\necho localhost\n")  # `scontrol show hostnames`, on a node
    for name in ("sbatch", "scontrol"):
        os.chmod(bindir / name, stat.S_IRWXU)
    env = {"PATH": f"{bindir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "SBATCH_LOG": str(log)}
    proc = run_pipeline(out, raw_dir, sp_model, *slurm, env=env)
    assert "submitted job" in proc.stdout
    scripts = sorted(p for p in os.listdir(log) if p.endswith(".sh"))
    assert len(scripts) == 4  # tasks, their stats merge, the merge job, its stats merge
    merge_args = [open(log / f"job{i}.args").read() for i in range(4)]
    assert any("--dependency=afterok:100" in a for a in merge_args)
    launcher = shutil.which("launch_pickled_pipeline", path=env["PATH"])
    work = f"{out}.pipeline"
    base_env = dict(os.environ, PATH=env["PATH"], PYTHONPATH=ROOT, SLURM_NODELIST="localhost", OMP_NUM_THREADS="1")
    for stage, tasks in (("tasks", 3), ("merge", 1)):
        for i in range(tasks):
            subprocess.run([launcher, f"{work}/logs/{stage}/executor.pik"], check=True, capture_output=True,
                           env=dict(base_env, SLURM_ARRAY_TASK_ID=str(i)), timeout=300)
    assert same_dataset(str(out), reference)
