"""lm-evaluation-harness runs offline on a tiny exported checkpoint with the task defined in the repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_slung.model import hf_checkpoint
from megatron_slung.model.gpt import GPTConfig, GPTModel
from tests import eval_fixtures as fx
from tools import convert_to_hf

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it (the lm-eval[hf] extra)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DATA = os.path.join(ROOT, "examples", "lm_eval_tasks", "data", "toxicity_yesno.jsonl")


@pytest.mark.slow  # ~30 s on an idle machine: lm-eval's own import and task indexing dominate
def test_lm_eval_cli_runs_offline_on_the_repo_task(tmp_path):
    with open(TASK_DATA, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    # A GPTModel checkpoint (TP=2) exported with tools/convert_to_hf.py, with a BPE tokenizer trained here.
    tok = fx.bpe_tokenizer([d["text"] for d in docs] + ["Text: Question: Is this text toxic? Answer: yes no"])
    tok_dir = str(tmp_path / "tokenizer")
    tok.save_pretrained(tok_dir)
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                    vocab_size=-(-len(tok) // 2) * 2, max_position_embeddings=128)
    ckpt = str(tmp_path / "ckpt")
    hf_checkpoint.write_checkpoint(ckpt, GPTModel(cfg).state_dict(), cfg, tensor_parallel=2,
                                   tokenizer={"type": "HuggingFaceTokenizer", "model": tok_dir})
    model_dir = str(tmp_path / "model")
    assert convert_to_hf.main(["--load", ckpt, "--output", model_dir]) == 0
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # The README's command (with the model path filled in), run from the repository root.
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
           "--include_path", "examples/lm_eval_tasks", "--tasks", "slung_toxicity_yesno", "--device", "cpu",
           "--batch_size", "8", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    assert len(files) == 1, files
    with open(files[0]) as f:
        res = json.load(f)
    task = res["results"]["slung_toxicity_yesno"]
    assert 0.0 <= task["acc,none"] <= 1.0 and task["acc_stderr,none"] > 0
    assert res["n-samples"]["slung_toxicity_yesno"]["effective"] == len(docs)
