"""Megatron-LM's own example scripts, flag for flag (tests/megatron_example_flags/), shrunk: only sizes, lengths,
intervals and paths change, and the flags this CPU cannot honour are dropped, each with its reason below. Each
trains a few iterations on 2 gloo processes, saves at the end as Megatron does, and the model it saved has the
parameter count Megatron's formula (megatron/training/theoretical_memory_usage.py) gives for those flags."""

import json
import os
import shlex

import pytest

from tests.data_tools_fixtures import run_tool, write_jsonl
from tests.distributed import run_distributed
from tests.pretrain_helpers import pretrain_body, train_records

HERE = os.path.dirname(os.path.abspath(__file__))

# Dropped on this CPU (the reason each one is refused is in docs/training.md, "Megatron-LM flags"):
CPU_DROPS = {
    "--fp16": "DeepSpeed has no fp16 training on the CPU",
    "--fp8-format": "FP8 needs Transformer Engine and a GPU", "--fp8-amax-history-len": "FP8",
    "--fp8-amax-compute-algo": "FP8", "--fp8-param-gather": "FP8",
    "--attention-backend fused": "SDPA's cuDNN / memory-efficient kernels do not run on a CPU",
    "--profile": "nsys profiling needs a GPU", "--profile-step-start": "with --profile",
    "--profile-step-end": "with --profile",
    "--ckpt-format torch_dist": "Megatron's distributed checkpoint format is not implemented (torch is)",
    # DeepSpeed's bf16 ZeRO-1 optimizer reduces after the backward (nothing to overlap); refused, not ignored
    "--overlap-grad-reduce": "DeepSpeed's bf16 ZeRO-1 has no overlapped reduction",
    "--overlap-param-gather": "only ZeRO-3 prefetches parameters",
}
# Megatron-LM HEAD itself refuses the GPT-3 script as written: --global-batch-size with --step-batch-size-schedule
# ("Cannot specify both"), and no --tokenizer-type ("tokenizer_type None is not supported"); as in Megatron here.
GPT3_FIXES = {"--global-batch-size": None, "+": ["--tokenizer-type", "GPT2BPETokenizer"]}


def example_flags(script: str) -> list:
    """The script's flags, one [flag, value...] per line, as shipped in tests/megatron_example_flags/."""
    with open(os.path.join(HERE, "megatron_example_flags", script + ".txt"), encoding="utf-8") as f:
        return [shlex.split(line) for line in f if line.strip() and not line.startswith("#")]


def shrink(script: str, sizes: dict, paths: dict) -> list:
    """The script's argv with ``sizes`` (flag -> new values, None: dropped) and ``paths`` ($NAME -> path)
    applied, and the CPU drops removed."""
    argv = []
    for tokens in example_flags(script):
        flag = tokens[0]
        if flag in CPU_DROPS or " ".join(tokens) in CPU_DROPS:
            continue
        if flag in sizes:
            if sizes[flag] is None:
                continue
            tokens = [flag] + [str(v) for v in sizes[flag]]
        argv += [paths.get(t, t) for t in tokens]
    return argv + [str(v) for v in sizes.get("+", [])]


def megatron_num_parameters(a: dict) -> int:
    """Megatron's compute_weight_and_optimizer_memory for a dense GPT: weights without linear biases or a learned
    position table (the formula leaves both out)."""
    h, heads, layers = a["hidden_size"], a["num_attention_heads"], a["num_layers"]
    groups = a["num_query_groups"] if a["group_query_attention"] else heads
    kv = a["kv_channels"] or h // heads
    norm_size = 1 if a["normalization"] == "RMSNorm" else 2
    attention = 2 * h * h * ((1 + groups / heads) * (kv * heads / h))
    mlp = 2 * h * a["ffn_hidden_size"] * (3 / 2 if a["swiglu"] else 1)
    layer = attention + mlp + 2 * h * norm_size
    embedding = h * a["padded_vocab_size"] * (2 if a["untie_embeddings_and_output_weights"] else 1)
    return int(layers * layer + norm_size * h + embedding)


def _check_saved_model(save_dir: str, iterations: int) -> None:
    from megatron_slung.model.hf_checkpoint import read_checkpoint

    with open(os.path.join(save_dir, "latest")) as f:
        assert f.read().strip() == f"iter_{iterations:07d}"  # saved at the end, as Megatron does
    state, config, _ = read_checkpoint(save_dir)
    with open(os.path.join(save_dir, f"iter_{iterations:07d}", "args.json")) as f:
        args = json.load(f)
    linear_biases = {k: v.numel() for k, v in state.items() if k.endswith(".bias") and "linear_" in k}
    positions = {k: v.numel() for k, v in state.items() if "position_embeddings" in k}
    weights = sum(v.numel() for k, v in state.items() if k not in linear_biases and k not in positions)
    assert weights == megatron_num_parameters(args)
    h, heads, layers = args["hidden_size"], args["num_attention_heads"], args["num_layers"]
    groups = args["num_query_groups"] if args["group_query_attention"] else heads
    kv = args["kv_channels"] or h // heads
    ffn = args["ffn_hidden_size"] * (2 if args["swiglu"] else 1)
    expected_biases = layers * ((heads + 2 * groups) * kv + h + ffn + h) if args["add_bias_linear"] else 0
    assert sum(linear_biases.values()) == expected_biases
    learned = args["position_embedding_type"] == "learned_absolute"
    assert sum(positions.values()) == (args["max_position_embeddings"] * h if learned else 0)


@pytest.fixture(scope="module")
def gpt2_corpus(tmp_path_factory):
    """GPT-2 BPE files and a dataset preprocessed with them (enough documents for the script's 949,50,1 split)."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2_corpus")
    texts = [f"document {i}: the quick brown fox number {i * 7 % 13} jumps over {i % 5} lazy dogs." for i in range(1200)]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=320, min_frequency=2, special_tokens=[])
    tok.save_model(str(out))
    vocab = json.loads((out / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    files = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(out / "vocab.json"),
             "--merge-file", str(out / "merges.txt")]
    data = write_jsonl(out / "docs.jsonl", [{"text": t} for t in texts])
    run_tool("preprocess_data.py", "--input", data, "--output-prefix", out / "gpt2", "--append-eod", *files)
    return {"$VOCAB_FILE": str(out / "vocab.json"), "$MERGE_FILE": str(out / "merges.txt"),
            "$DATA_PATH": str(out / "gpt2_text_document")}


@pytest.mark.slow
@pytest.mark.distributed
def test_megatrons_gpt3_175b_example_runs_flag_for_flag(tmp_path, gpt2_corpus):
    sizes = {
        "--num-layers": [4], "--hidden-size": [64], "--num-attention-heads": [4], "--seq-length": [32],
        "--max-position-embeddings": [32],
        "--step-batch-size-schedule": ["0:2 64:4"],  # 16 then 320..1536: here 2, then 4 from 64 tokens on
        "--train-iters": [4], "--lr-decay-iters": [4],
        "--tensor-model-parallel-size": [1], "--pipeline-model-parallel-size": [2],
        "--log-interval": [1], "--save-interval": [2], "--eval-interval": [2], "--eval-iters": [1],
        **GPT3_FIXES,
    }
    paths = {**gpt2_corpus, "$CHECKPOINT_PATH": str(tmp_path / "ckpt"), "$TENSORBOARD_LOGS_PATH": str(tmp_path / "tb")}
    argv = shrink("train_gpt3_175b_distributed", sizes, paths)
    records = run_distributed(pretrain_body, 2, args=(argv,), timeout=900)[-1]
    train = train_records(records)
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert [r["consumed_samples"] for r in train] == [2, 6, 10, 14]  # batch 2, then 4 from 64 tokens = 2 samples on
    assert all(r["loss"] == r["loss"] for r in train)
    _check_saved_model(str(tmp_path / "ckpt"), 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_megatrons_llama3_8b_example_runs_flag_for_flag(tmp_path):
    sizes = {
        "--num-layers": [2], "--hidden-size": [64], "--ffn-hidden-size": [224], "--num-attention-heads": [4],
        "--num-query-groups": [2], "--kv-channels": [16], "--seq-length": [32], "--max-position-embeddings": [32],
        "--global-batch-size": [8], "--train-samples": [32], "--lr-decay-samples": [30], "--lr-warmup-samples": [8],
        "--vocab-size": [512], "--eval-iters": [1], "--eval-interval": [2], "--save-interval": [2],
    }
    paths = {"$CHECKPOINT_PATH": str(tmp_path / "ckpt"), "$TENSORBOARD_LOGS_PATH": str(tmp_path / "tb"),
             "$DATA_CACHE_PATH": str(tmp_path / "cache")}
    argv = shrink("train_llama3_8b_h100_fp8", sizes, paths)
    assert "--use-distributed-optimizer" in argv and "--bf16" in argv and "--cross-entropy-loss-fusion" in argv
    records = run_distributed(pretrain_body, 2, args=(argv,), timeout=900)[-1]
    train = train_records(records)
    assert [r["iteration"] for r in train] == [1, 2, 3, 4] and train[-1]["consumed_samples"] == 32
    assert all("throughput_tflops_per_gpu" in r for r in train)  # --log-throughput
    _check_saved_model(str(tmp_path / "ckpt"), 4)
