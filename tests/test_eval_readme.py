"""The README's Evaluation commands run exactly as written (in a scratch folder beside the repo's files)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(section: str = "## Evaluation") -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow  # about 1.5 minutes: nine fresh Python processes
def test_readme_evaluation_commands(tmp_path):
    for name in ("examples", "tools"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLUNG_NO_PROGRESS": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false"}
    commands = readme_commands()
    assert len(commands) >= 10
    for cmd in commands:
        if cmd.startswith("HF_DATASETS_OFFLINE=1"):  # lm_eval: run by tests/test_eval_lm_harness.py
            continue
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    for task in ("perplexity", "probe", "zero-shot", "generate-toxicity", "steer", "safe-beam"):
        with open(tmp_path / "eval-results" / task / "results.json") as f:
            assert json.load(f)["task"] == task
    assert os.path.isfile(tmp_path / "runs/tiny/ckpt-tp2-pp2/latest")
