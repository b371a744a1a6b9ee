"""Smoke test of tools/bench_masked_ce.py: it runs, prints a table and writes the JSON the issue specifies."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tool_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_masked_ce.py"), "--device", "cpu", "--tokens", "64",
           "--vocab", "300", "--dtype", "fp32", "--policy", "masked", "--impls", "torch_eager,fused,fused_linear",
           "--hidden", "16", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fwd+bwd ms" in proc.stdout
    assert "threads: 1 (OMP_NUM_THREADS 1)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["tokens"] == 64 and report["vocab"] == 300 and report["dtype"] == "fp32"
    assert report["threads"] == [1] and report["omp_num_threads"] == "1"
    assert all(r["threads"] == 1 for r in report["results"])
    assert isinstance(report["device"], str)
    impls = {r["impl"]: r for r in report["results"]}
    assert set(impls) == {"torch_eager", "fused", "fused_linear"}
    for r in impls.values():
        assert r["fwd_bwd_ms"] > 0 and isinstance(r["peak_mem_mb"], float)


def test_bench_tool_runs_each_thread_count(tmp_path):
    """--threads 1,2: every implementation at each count, compared with eager at the same count."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_masked_ce.py"), "--device", "cpu", "--tokens", "32",
           "--vocab", "200", "--impls", "torch_eager,fused", "--threads", "1,2", "--repeats", "1", "--warmup", "0",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["threads"] == [1, 2]
    assert sorted((r["impl"], r["threads"]) for r in report["results"]) == [
        ("fused", 1), ("fused", 2), ("torch_eager", 1), ("torch_eager", 2)]
    assert "threads: 1, 2" in proc.stdout
