"""tools/preprocess_data.py: tokens and risk channel, independence from workers/partitions, span
alignment with multi-byte UTF-8 for both tokenizer kinds, harmfulness tags, every kind of bad input."""

import glob
import gzip
import json
import math
import os

import numpy as np
import pytest

from megatron_slung.data.corpus import InputError
from megatron_slung.data.indexed_dataset import IndexedDataset
from megatron_slung.data.preprocess import PreprocessOptions, plan_partitions, preprocess
from megatron_slung.data.risk_spans import char_levels, token_levels_reference
from megatron_slung.data.tokenizers import build_tokenizer
from tests.data_tools_fixtures import (  # noqa: F401  (fixtures)
    MULTIBYTE_TEXTS,
    corpus_file,
    corpus_records,
    hf_tokenizer_dir,
    run_tool,
    sp_model,
    write_jsonl,
)

SP = "SentencePieceTokenizer"
HF = "HuggingFaceTokenizer"
TAG = "<|potentially_unsafe|>"
FLAGGED = ("zorblax", "vexmorg", "gnashtooth")


def tagged_records(records):
    """Records with spans: each sentence containing a flagged word is level 3, the others level 1,
    plus an exact level-4 span on the first multi-byte word of each multi-byte text."""
    from megatron_slung.data.tagging import split_sentences

    out = []
    for r in records:
        text = r["text"]
        spans = []
        for s, e in split_sentences(text):
            spans.append([s, e, 3 if any(w in text[s:e].lower() for w in FLAGGED) else 1])
        r = dict(r, risk_spans=spans)
        out.append(r)
    return out


def mixed_records():
    """Hand-made spans over multi-byte words, with uncovered characters and nested levels."""
    recs = []
    for i, text in enumerate(t for t in MULTIBYTE_TEXTS if len(t) > 3):
        n = len(text)
        recs.append({"text": text, "risk_spans": [[n // 4, n // 2, 3], [n // 2, n // 2 + 2, 4], [0, 1, 2]]})
    recs.append({"text": "ok 😀bad😀 ok 東京x🤖", "risk_spans": [[3, 8, 3], [12, 16, 4]]})
    return recs


def load(prefix, key="text"):
    return IndexedDataset(f"{prefix}_{key}_document")


def files_of(prefix, key="text"):
    base = f"{prefix}_{key}_document"
    return [base + ext for ext in (".bin", ".idx", ".risk.bin", ".risk.idx")]


def expected_levels(tok, text, spans, default=0):
    """Independent expectation: the tokenizer's offsets (tested in test_tokenizers) + the plain loop."""
    ids, offsets = tok.tokenize_with_offsets(text)
    return ids, token_levels_reference(char_levels(spans, len(text), default), np.array(offsets).reshape(-1, 2))


@pytest.mark.parametrize("kind", [SP, HF])
def test_tokens_and_risk_match_independent_computation(tmp_path, kind, sp_model, hf_tokenizer_dir, corpus_records):
    model = sp_model if kind == SP else hf_tokenizer_dir
    recs = tagged_records(corpus_records[:60]) + mixed_records() + [{"text": "no spans here"}]
    path = write_jsonl(tmp_path / "in.jsonl", recs)
    opts = PreprocessOptions(tokenizer_type=kind, tokenizer_model=model, append_eod=True, default_risk_level=1)
    summary = preprocess(path, str(tmp_path / "out"), opts, workers=2)
    ds = load(tmp_path / "out")
    tok = build_tokenizer(kind, model)
    assert ds.num_documents == len(recs) == summary.keys["text"].documents
    assert ds.has_risk and ds.dtype == np.uint16
    for i, r in enumerate(recs):
        ids, levels = expected_levels(tok, r["text"], r.get("risk_spans", []), default=1)
        assert ds[i].tolist() == ids + [tok.eod]
        assert ds.get_risk(i).tolist() == levels.tolist() + [0]  # the EOD token is level 0
    # The summary's per-level counts are what was written.
    counts = np.bincount(ds.read_risk(0, ds.num_tokens), minlength=256)
    assert summary.keys["text"].risk_counts == counts.tolist()
    assert summary.keys["text"].tokens == ds.num_tokens


@pytest.mark.parametrize("kind", [SP, HF])
def test_span_alignment_multibyte(tmp_path, kind, sp_model, hf_tokenizer_dir):
    """A risky span over emoji/CJK marks exactly the tokens that hold its characters."""
    model = sp_model if kind == SP else hf_tokenizer_dir
    text = "fine 😀bad😀 fine 東京risk東京 fine"
    a, b = text.index("😀bad"), text.index("😀 fine") + 1
    c, d = text.index("東京risk"), text.index("risk東京") + 6
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": text, "risk_spans": [[a, b, 3], [c, d, 5]]}])
    preprocess(path, str(tmp_path / "o"), PreprocessOptions(tokenizer_type=kind, tokenizer_model=model))
    ds = load(tmp_path / "o")
    tok = build_tokenizer(kind, model)
    ids, offsets = tok.tokenize_with_offsets(text)
    risk = ds.get_risk(0).tolist()
    assert ds[0].tolist() == ids
    for (s, e), level in zip(offsets, risk):
        if e == s:  # covers no character: takes the one at its position
            e = s + 1
        touches3, touches5 = s < b and e > a, s < d and e > c
        assert level == (3 if touches3 else 5 if touches5 else 0), (text[s:e], level)
    # the level-3 tokens decode to the span (plus at most the space glued before it)
    risky = tok.detokenize([t for t, lv in zip(ids, risk) if lv == 3])
    assert risky.strip() == text[a:b]


def test_identical_whatever_workers_and_partitions(tmp_path, sp_model, corpus_records):
    recs = tagged_records(corpus_records)
    paths = [write_jsonl(tmp_path / f"part{i}.jsonl", recs[i::3]) for i in range(3)]
    opts = PreprocessOptions(tokenizer_model=sp_model, append_eod=True, harm_tag=TAG, harm_tag_prob=0.5,
                             chunk_bytes=8192)
    outputs = {}
    for workers, partitions in [(1, 1), (4, 1), (4, 2), (3, 3)]:
        prefix = str(tmp_path / f"w{workers}p{partitions}")
        summary = preprocess(str(tmp_path / "part*.jsonl"), prefix, opts, workers=workers, partitions=partitions)
        outputs[(workers, partitions)] = [open(f, "rb").read() for f in files_of(prefix)]
        assert summary.records == len(recs)
        assert summary.keys["text"].tags_inserted > 0
    reference = outputs[(1, 1)]
    for key, data in outputs.items():
        assert data == reference, key
    assert not glob.glob(str(tmp_path / ".*partitions*"))  # partition temporaries are gone
    # The CLI agrees with the API (default chunk size: proves chunking does not matter either).
    run_tool("preprocess_data.py", "--input", str(tmp_path / "part*.jsonl"), "--output-prefix", tmp_path / "cli",
             "--tokenizer-type", SP, "--tokenizer-model", sp_model, "--append-eod", "--harm-tag", TAG,
             "--harm-tag-prob", "0.5", "--workers", "2")
    assert [open(f, "rb").read() for f in files_of(tmp_path / "cli")] == reference


def test_partition_plan_cuts_at_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": "x" * (i % 7)}) + "\n" for i in range(100)]
    path.write_text("".join(lines))
    shares = plan_partitions([str(path)], 3)
    assert len(shares) == 3
    data = path.read_bytes()
    pos, line = 0, 1
    for share in shares:
        for seg in share:
            assert seg.start == pos and seg.first_line == line
            assert seg.end == len(data) or data[seg.end - 1 : seg.end] == b"\n"
            line += data[seg.start : seg.end].count(b"\n")
            pos = seg.end
    assert pos == len(data)


def test_harm_tag_rate_is_binomial(tmp_path, sp_model):
    n, p = 1500, 0.1
    recs = [{"text": f"doc {i}: calm words then zorblax vexmorg and calm again.", "risk_spans": [[0, 8, 1], [24, 40, 3]]}
            for i in range(n)]
    path = write_jsonl(tmp_path / "in.jsonl", recs)
    opts = PreprocessOptions(tokenizer_model=sp_model, harm_tag=TAG, harm_tag_prob=p, harm_tag_min_level=3, seed=5)
    summary = preprocess(path, str(tmp_path / "o"), opts, workers=2)
    ds = load(tmp_path / "o")
    tag = build_tokenizer(SP, sp_model).token_to_id(TAG)
    tags = 0
    for i in range(ds.num_documents):
        ids, risk = ds[i], ds.get_risk(i)
        where = np.flatnonzero(ids == tag)
        assert len(where) <= 1
        for w in where:
            assert risk[w] == 0 and risk[w + 1] >= 3 and (w == 0 or risk[w - 1] < 3)
        tags += len(where)
    assert tags == summary.keys["text"].tags_inserted
    assert abs(tags - n * p) < 4 * math.sqrt(n * p * (1 - p)), tags
    # another seed tags other documents
    other = preprocess(path, str(tmp_path / "o2"), PreprocessOptions(tokenizer_model=sp_model, harm_tag=TAG,
                                                                     harm_tag_prob=p, seed=6))
    assert open(files_of(tmp_path / "o")[0], "rb").read() != open(files_of(tmp_path / "o2")[0], "rb").read()
    assert other.keys["text"].tags_inserted > 0


def test_compressed_inputs_and_several_keys(tmp_path, sp_model, corpus_records):
    import zstandard

    recs = [{"text": r["text"], "title": r["text"][:30], "risk_spans": {"title": [[0, 5, 3]]}}
            for r in corpus_records[:40]]
    plain = write_jsonl(tmp_path / "in.jsonl", recs)
    raw = open(plain, "rb").read()
    with gzip.open(tmp_path / "in.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    results = []
    for name in ("in.jsonl", "in.jsonl.gz", "in.jsonl.zst"):
        prefix = tmp_path / name.replace(".", "_")
        preprocess(str(tmp_path / name), str(prefix), PreprocessOptions(tokenizer_model=sp_model, json_keys=("text", "title")))
        results.append([open(f, "rb").read() for key in ("text", "title") for f in files_of(prefix, key)])
    assert results[0] == results[1] == results[2]
    title = load(tmp_path / "in_jsonl", "title")
    text = load(tmp_path / "in_jsonl", "text")
    assert title.get_risk(0)[0] == 3 and set(text.get_risk(0).tolist()) == {0}  # spans given per key


def _bad_cases():
    good = json.dumps({"text": "fine text"})
    return {
        "malformed JSON": ([good, '{"text": "oops"', good], 2, "malformed JSON"),
        "not an object": ([good, "[1, 2]"], 2, "expected a JSON object"),
        "missing key": ([good, good, json.dumps({"body": "x"}), "{broken"], 3, "missing key 'text'"),  # first wins
        "not a string": ([json.dumps({"text": 5})], 1, "expected a string"),
        "span out of range": ([good, json.dumps({"text": "abc", "risk_spans": [[0, 4, 3]]})], 2, "out of range"),
        "overlapping spans": ([json.dumps({"text": "abcdef", "risk_spans": [[0, 4, 3], [2, 6, 1]]})], 1,
                              "overlap with different levels"),
        "bad level": ([json.dumps({"text": "abc", "risk_spans": [[0, 1, 300]]})], 1, "outside 0..255"),
        "bad span shape": ([json.dumps({"text": "abc", "risk_spans": [[0, 1]]})], 1, "not \\[start, end, level\\]"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_names_file_and_line_and_leaves_nothing(tmp_path, sp_model, case):
    lines, line_no, message = _bad_cases()[case]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        preprocess(str(path), str(tmp_path / "out"), PreprocessOptions(tokenizer_model=sp_model), workers=2)
    assert err.value.path == str(path) and err.value.line == line_no
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # no output, no temporary file


def test_bad_input_cli_invalid_utf8_and_partitions(tmp_path, sp_model):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine"}).encode()
    path.write_bytes(b"\n".join([good] * 50 + [b'{"text": "caf\xe9"}'] + [good] * 50) + b"\n")
    for extra in ([], ["--workers", "2", "--partitions", "2"]):
        proc = run_tool("preprocess_data.py", "--input", path, "--output-prefix", tmp_path / "out", "--tokenizer-type", SP,
                        "--tokenizer-model", sp_model, *extra, check=False)
        assert proc.returncode == 1
        assert f"{path}:51: invalid UTF-8" in proc.stderr
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_empty_documents_skip_or_error(tmp_path, sp_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two"}, {"text": ""}])
    proc = run_tool("preprocess_data.py", "--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type", SP,
                    "--tokenizer-model", sp_model, "--append-eod")
    assert "empty documents skipped: 2" in proc.stdout
    assert f"{path}:2" in proc.stdout and f"{path}:4" in proc.stdout
    ds = load(tmp_path / "o")
    assert ds.num_documents == 2
    with pytest.raises(InputError, match="empty document") as err:
        preprocess(path, str(tmp_path / "e"), PreprocessOptions(tokenizer_model=sp_model, empty_documents="error"))
    assert err.value.line == 2
    assert not any(os.path.exists(f) for f in files_of(tmp_path / "e"))


def test_summary_and_flags(tmp_path, sp_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "plain words"},
                                               {"text": "calm zorblax", "risk_spans": [[0, 12, 3]]}])
    proc = run_tool("preprocess_data.py", "--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type", SP,
                    "--tokenizer-model", sp_model, "--default-risk-level", "2", "--summary-json", tmp_path / "s.json",
                    "--log-interval", "1")
    assert "processed" in proc.stderr and "docs/s" in proc.stderr and "MB/s" in proc.stderr
    assert "tokens per risk level" in proc.stdout and "3 toxic" in proc.stdout
    summary = json.load(open(tmp_path / "s.json"))
    assert summary["records"] == 2 and set(summary["keys"]["text"]["risk_counts"]) == {"2", "3"}
    ds = load(tmp_path / "o")
    assert set(ds.get_risk(0).tolist()) == {2} and set(ds.get_risk(1).tolist()) == {3}
    bad = run_tool("preprocess_data.py", "--input", path, "--output-prefix", tmp_path / "x", "--tokenizer-type", SP,
                   "--tokenizer-model", sp_model, "--harm-tag", "<|no-such-tag|>", check=False)
    assert bad.returncode == 1 and "not a token" in bad.stderr


def _square(x):
    return x * x


def test_ordered_pool_map_keeps_order_and_stops_its_workers():
    import contextlib
    import multiprocessing as mp

    from megatron_slung.data.corpus import ordered_pool_map

    assert list(ordered_pool_map(_square, range(50), 3)) == [x * x for x in range(50)]  # > the in-flight window
    with pytest.raises(RuntimeError):
        with contextlib.closing(ordered_pool_map(_square, range(50), 2)) as results:
            for value in results:
                if value > 10:
                    raise RuntimeError("consumer failed")
    assert mp.active_children() == []  # the pool was terminated, not left to the garbage collector
