"""tools/merge_datasets.py: prefixes and directories, tokens and risk together, mismatched dtypes, atomicity."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_slung.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "merge_datasets.py")
spec = importlib.util.spec_from_file_location("merge_datasets", TOOL)
merge_datasets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge_datasets)


def make(prefix, docs, risks=None, dtype=np.uint16, with_risk=True):
    with IndexedDatasetBuilder(prefix, dtype=dtype, with_risk=with_risk) as b:
        for i, d in enumerate(docs):
            b.add_document(d, None if risks is None else risks[i])


def contents(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))], [ds.get_risk(i).tolist() for i in range(len(ds))], ds


def test_merge_prefixes(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make(a, [[1, 2], [3]], [[1, 3], [2]])
    make(b, [[4, 5, 6]], with_risk=False)
    out = str(tmp_path / "out" / "ab")
    assert merge_datasets.main(["--input", a, b, "--output-prefix", out]) == 0
    tokens, risk, ds = contents(out)
    assert tokens == [[1, 2], [3], [4, 5, 6]] and risk == [[1, 3], [2], [0, 0, 0]]
    assert ds.dtype == np.uint16 and ds.document_indices.tolist() == [0, 1, 2, 3]
    printed = capsys.readouterr().out
    assert "3 documents" in printed and "6 uint16 tokens" in printed
    assert "unlabelled=3, benign=1, ambiguous=1, toxic=1" in printed
    # --no-risk, and no input with risk -> no risk channel
    assert merge_datasets.main(["--input", b, a, "--output-prefix", out + "2", "--no-risk"]) == 0
    assert not contents(out + "2")[2].has_risk and contents(out + "2")[0] == [[4, 5, 6], [1, 2], [3]]


def test_merge_directory_megatron_style(tmp_path):
    shards = tmp_path / "shards"
    make(str(shards / "part_01"), [[7, 8]], [[3, 3]])
    make(str(shards / "part_00"), [[1], [2, 3]], [[1], [0, 2]])
    make(str(shards / "part_02"), [[9]], with_risk=False)
    (shards / "notes.txt").write_text("not a dataset")
    out = str(tmp_path / "merged")
    assert merge_datasets.main(["--input", str(shards), "--output-prefix", out]) == 0
    tokens, risk, _ = contents(out)
    assert tokens == [[1], [2, 3], [7, 8], [9]]  # sorted by name; the .risk files were not taken as datasets
    assert risk == [[1], [0, 2], [3, 3], [0]]


def test_merge_refuses_mismatched_dtypes(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make(a, [[1, 2]])
    make(b, [[3]], dtype=np.int32)
    out = str(tmp_path / "out")
    assert merge_datasets.main(["--input", a, b, "--output-prefix", out]) == 1
    err = capsys.readouterr().err
    assert "different token dtypes" in err and f"{a} (uint16)" in err and f"{b} (int32)" in err
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "a.risk.bin", "a.risk.idx",
                                            "b.bin", "b.idx", "b.risk.bin", "b.risk.idx"]


def test_merge_bad_inputs(tmp_path, capsys):
    a = str(tmp_path / "a")
    make(a, [[1, 2]])
    out = str(tmp_path / "out")
    assert merge_datasets.main(["--input", str(tmp_path / "nope"), "--output-prefix", out]) == 1
    assert "nope: not a directory and no dataset" in capsys.readouterr().err
    assert merge_datasets.main(["--input", a, "--output-prefix", a]) == 1
    assert "an input cannot also be the output" in capsys.readouterr().err
    with open(a + ".risk.bin", "ab") as f:  # a broken input: nothing is written
        f.write(b"\0")
    assert merge_datasets.main(["--input", a, "--output-prefix", out]) == 1
    assert "a.risk.bin: data file is longer" in capsys.readouterr().err
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))
    lonely = tmp_path / "dir"
    lonely.mkdir()
    (lonely / "x.idx").write_bytes(b"")
    assert merge_datasets.main(["--input", str(lonely), "--output-prefix", out]) == 1
    assert "x.bin: missing" in capsys.readouterr().err
    (lonely / "x.idx").unlink()
    assert merge_datasets.main(["--input", str(lonely), "--output-prefix", out]) == 1
    assert "no datasets" in capsys.readouterr().err


def test_merge_is_atomic_when_interrupted(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make(a, [[1, 2]])
    make(b, [[3]])
    calls = []
    original = IndexedDatasetBuilder.add_index

    def add_index_then_fail(self, prefix):
        calls.append(prefix)
        original(self, prefix)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(IndexedDatasetBuilder, "add_index", add_index_then_fail)
    with pytest.raises(KeyboardInterrupt):
        merge_datasets.main(["--input", a, b, "--output-prefix", str(tmp_path / "out")])
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))


def test_command_line(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make(a, [[1, 2]], [[2, 2]])
    make(b, [[3]], [[1]])
    result = subprocess.run([sys.executable, TOOL, "--input", a, b, "--output-prefix", str(tmp_path / "ab")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert contents(str(tmp_path / "ab"))[:2] == ([[1, 2], [3]], [[2, 2], [1]])


def test_builder_removes_what_a_dead_run_left_and_keeps_a_live_ones(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a, out = str(tmp_path / "a"), str(tmp_path / "out")
    make(a, [[1, 2]])
    left = [f"{out}.bin.partial-{dead.pid}", f"{out}.risk.idx.partial-{dead.pid}"]
    live = f"{out}.bin.partial-{os.getppid()}"  # pytest's parent: alive
    for path in left + [live]:
        open(path, "w").write("x")
    capsys.readouterr()
    assert merge_datasets.main(["--input", a, "--output-prefix", out]) == 0
    err = capsys.readouterr().err
    assert f"removed what an earlier run (PID {dead.pid}, no longer running) left: {left[0]}, {left[1]}" in err
    assert not any(os.path.exists(p) for p in left) and os.path.exists(live)


def test_part_datasets_of_a_preprocessing_run_do_not_open(tmp_path, capsys):
    """preprocess --partitions writes complete-looking part datasets into .PREFIX.partitions-PID; a run killed
    there leaves them: no reader may take them for finished data."""
    from megatron_slung.data.indexed_dataset import IndexedDatasetError, partitions_dir

    parts = partitions_dir(str(tmp_path / "corpus"), pid=12345)
    assert os.path.basename(parts) == ".corpus.partitions-12345"
    make(os.path.join(parts, "part0_text"), [[1, 2, 3]])
    with pytest.raises(IndexedDatasetError, match="temporary directory of a preprocessing run"):
        IndexedDataset(os.path.join(parts, "part0_text"))
    assert merge_datasets.main(["--input", parts, "--output-prefix", str(tmp_path / "m")]) == 1
    assert "temporary directory of a preprocessing run" in capsys.readouterr().err
    assert IndexedDataset(os.path.join(parts, "part0_text"), temporary_ok=True).num_tokens == 3
