"""Shared fixtures for the data-tool tests: tiny tokenizers trained on the spot, small corpora.

Import the fixtures into a test module (``from tests.data_tools_fixtures import sp_model, ...``).
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_slung.experiment.synthetic import SyntheticCorpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")

# Text every tokenizer test leans on: accents (2-byte), CJK (3-byte), emoji (4-byte), odd spacing.
MULTIBYTE_TEXTS = [
    "Zürich café naïve — crème brûlée.",
    "東京は日本の首都です。 Tokyo is big!",
    "emoji 😀 and 🤖 robots 🚀🚀 here",
    "  two  spaces, a\ttab and a\nnewline ",
    "mixed: señor 데이터 Москва αβγ 😀x😀",
    "",
    "a",
]


def run_tool(name, *args, check=True, env=None):
    """Run tools/<name> in a subprocess; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus_records():
    """~300 synthetic documents plus the multi-byte texts."""
    docs = [d for d in SyntheticCorpus(seed=7, vocab_words=3000).documents(300)]
    docs += [{"id": 1000 + i, "text": t} for i, t in enumerate(MULTIBYTE_TEXTS) if t]
    return docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_records):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_records)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, corpus_file):
    """A small BPE SentencePiece model trained by tools/train_tokenizer.py."""
    prefix = tmp_path_factory.mktemp("spm") / "bpe"
    run_tool("train_tokenizer.py", "--input", corpus_file, "--output-prefix", prefix, "--vocab-size", 1200)
    return f"{prefix}.model"


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, corpus_records):
    """A small byte-level BPE Hugging Face tokenizer (tokenizer.json + config), saved to a directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>", "<|pad|>", "<|potentially_unsafe|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([r["text"] for r in corpus_records], trainer)
    path = tmp_path_factory.mktemp("hf") / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(path)
    return str(path)


def zstd_block_ends(frame: bytes) -> list[int]:
    """The offsets right after each block of a one-frame .zst (the frame format, RFC 8878 section 3.1.1)."""
    import zstandard

    pos = zstandard.frame_header_size(frame)
    ends = []
    while True:
        header = int.from_bytes(frame[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        ends.append(pos)
        if last:
            return ends


def descendants(pid: int) -> list[int]:
    """The PIDs of every live (non-zombie) descendant of ``pid``, from /proc (Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
