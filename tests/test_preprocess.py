"""tools/preprocess_data.py: tokens and risk channel, independence from workers/partitions, span
alignment with multi-byte UTF-8 for both tokenizer kinds, harmfulness tags, every kind of bad input."""

import glob
import gzip
import json
import math
import os
import re

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
    descendants,
    hf_tokenizer_dir,
    run_tool,
    sp_model,
    write_jsonl,
    zstd_block_ends,
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


# ---------------------------------------------------------------------------------------------------
# Damaged compressed inputs: refused with the last good line, nothing written


def _read_all(path):
    from megatron_slung.data.corpus import read_chunks

    return b"".join(chunk.data for chunk in read_chunks(str(path), chunk_bytes=1 << 14))


def _good_lines(prefix: bytes) -> int:
    return prefix.count(b"\n")


@pytest.mark.parametrize("checksum", [True, False])
def test_zstd_cut_at_every_block_boundary_is_refused(tmp_path, corpus_file, checksum):
    """A frame cut at a block boundary decodes without any zstd error; the reader must still refuse it."""
    import zstandard

    raw = open(corpus_file, "rb").read()
    frame = zstandard.ZstdCompressor(level=3, write_checksum=checksum).compress(raw)
    ends = zstd_block_ends(frame)
    assert len(ends) >= 3  # several 128 KiB blocks
    cuts = ends[:-1] + ([ends[-1], len(frame) - 2] if checksum else [])  # with a checksum: cut before/inside it
    cuts += [0, 5, ends[0] - 100, ends[0] + 1]  # and a few cuts that are not at a boundary
    for cut in cuts:
        path = tmp_path / "cut.jsonl.zst"
        path.write_bytes(frame[:cut])
        decoded = zstandard.ZstdDecompressor().decompressobj().decompress(frame[:cut]) if cut else b""
        assert raw.startswith(decoded)
        with pytest.raises(InputError, match=f"compressed stream ends early after line {_good_lines(decoded)}\\b") as e:
            _read_all(path)
        assert str(e.value).startswith(f"{path}: ")
    path.write_bytes(frame)
    assert _read_all(path) == raw  # the whole frame reads whole


def test_zstd_several_frames_and_bit_flip(tmp_path, corpus_file):
    import zstandard

    raw = open(corpus_file, "rb").read()
    half = raw.index(b"\n", len(raw) // 2) + 1
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    two = cctx.compress(raw[:half]) + cctx.compress(raw[half:])  # what `cat a.zst b.zst` makes
    path = tmp_path / "two.jsonl.zst"
    path.write_bytes(two)
    assert _read_all(path) == raw  # every frame, not only the first
    path.write_bytes(two[:-1])
    with pytest.raises(InputError, match="ends early"):
        _read_all(path)
    flipped = bytearray(cctx.compress(raw))
    flipped[len(flipped) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match=f"{path}: compressed stream is corrupt after line \\d+"):
        _read_all(path)


def test_gzip_cut_or_bit_flip_is_refused(tmp_path, corpus_file):
    raw = open(corpus_file, "rb").read()
    data = gzip.compress(raw)
    path = tmp_path / "cut.jsonl.gz"
    for cut in (0, 5, 30, len(data) // 3, len(data) // 2, len(data) - 8, len(data) - 1):  # -8: the CRC/size trailer
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match=f"{path}: compressed stream ends early after line \\d+"):
            _read_all(path)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match=f"{path}: compressed stream is corrupt after line \\d+"):
        _read_all(path)
    path.write_bytes(data + data)  # several members: all read
    assert _read_all(path) == raw + raw


def test_truncated_plain_jsonl_last_line_is_an_error(tmp_path, sp_model):
    """A plain file cut inside its last line: that line does not parse (a cut right at a newline is a
    valid file and cannot be told)."""
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two words"})[:-4], encoding="utf-8")
    with pytest.raises(InputError, match="malformed JSON") as err:
        preprocess(str(path), str(tmp_path / "out"), PreprocessOptions(tokenizer_model=sp_model))
    assert err.value.line == 2


def test_damaged_input_stops_every_tool_and_leaves_nothing(tmp_path, sp_model, corpus_file):
    """Cut at a block boundary (.zst) or anywhere (.gz): rc 1, one line naming the file, no output."""
    import zstandard

    raw = open(corpus_file, "rb").read()
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    gz = gzip.compress(raw)
    (tmp_path / "in").mkdir()
    damaged = {"cut.jsonl.zst": frame[: zstd_block_ends(frame)[1]], "cut.jsonl.gz": gz[: len(gz) // 2]}
    for name, data in damaged.items():
        path = tmp_path / "in" / name
        path.write_bytes(data)
        out = tmp_path / "out"
        for tool, args in [("preprocess_data.py", ["--output-prefix", out / "o", "--tokenizer-type", SP,
                                                   "--tokenizer-model", sp_model, "--workers", "2"]),
                           ("tag_risk.py", ["--output", out / "t.jsonl", "--unit", "given"]),
                           ("train_tokenizer.py", ["--output-prefix", out / "spm", "--vocab-size", "300"])]:
            proc = run_tool(tool, "--input", path, *args, check=False)
            assert proc.returncode == 1, (tool, proc.stderr[-2000:])
            assert f"error: {path}: compressed stream ends early after line" in proc.stderr, (tool, proc.stderr)
            assert "Traceback" not in proc.stderr
            assert not out.exists() or os.listdir(out) == [], (tool, os.listdir(out))


# ---------------------------------------------------------------------------------------------------
# Lone surrogates, compressed outputs


def test_lone_surrogate_is_an_error_naming_file_line_and_field(tmp_path, sp_model):
    ok = json.dumps({"text": "emoji \ud83d\ude00 as an escaped pair is fine"})  # json.dumps escapes it: ASCII
    assert "\\ud83d\\ude00" in ok
    cases = [('{"text": "bad \\ud800 here"}', "text", "\\\\ud800"),
             ('{"text": "fine", "meta": {"tags": ["x", "\\uDC01"]}}', "meta.tags[1]", "\\\\udc01")]
    for bad, field, escape in cases:
        path = tmp_path / "s.jsonl"
        path.write_text(ok + "\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(InputError, match=f"field '{re.escape(field)}' holds a lone surrogate escape {escape}") as err:
            preprocess(str(path), str(tmp_path / "out"), PreprocessOptions(tokenizer_model=sp_model), workers=2)
        assert err.value.path == str(path) and err.value.line == 2
        assert os.listdir(tmp_path) == ["s.jsonl"]
    path.write_text(ok + "\n", encoding="utf-8")
    summary = preprocess(str(path), str(tmp_path / "out"), PreprocessOptions(tokenizer_model=sp_model))
    assert summary.records == 1


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_jsonl_writers_compress_as_the_final_name_says(tmp_path, suffix):
    import zstandard

    from megatron_slung.experiment.synthetic import write_jsonl as synthetic_jsonl

    plain, packed = tmp_path / "s.jsonl", tmp_path / f"s.jsonl{suffix}"
    assert synthetic_jsonl(str(plain), n_docs=50) == synthetic_jsonl(str(packed), n_docs=50) == 50
    data = packed.read_bytes()
    if suffix == ".gz":
        assert gzip.decompress(data) == plain.read_bytes()
    else:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == plain.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["s.jsonl", f"s.jsonl{suffix}"]  # no temporary left


# ---------------------------------------------------------------------------------------------------
# kill -9: workers end with the main process; the next run removes what it left


def _wait_until(condition, what, limit=120.0):
    import time

    deadline = time.monotonic() + limit  # a bound against hanging, not a timing assertion
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("partitions", [1, 2])
def test_kill_9_mid_run_then_rerun(tmp_path, sp_model, partitions):
    import signal
    import subprocess
    import sys

    from tests.data_tools_fixtures import ROOT, TOOLS

    words = [f"w{i}" for i in range(3000)]
    rng = np.random.default_rng(0)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:  # ~25 MB: several seconds of work on 2 workers
        for _ in range(25000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 150))}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", str(path), "--output-prefix",
           str(out / "o"), "--tokenizer-type", SP, "--tokenizer-model", sp_model, "--workers", "2",
           "--partitions", str(partitions)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def partials():
        return [f for f in glob.glob(str(out / "**" / "*.partial-*"), recursive=True) + glob.glob(str(out / ".*" / "*.partial-*"))
                if os.path.getsize(f) > 0]

    try:
        _wait_until(lambda: partials() or proc.poll() is not None, "partial files")
        assert proc.poll() is None, "the run ended before it could be killed: make the input bigger"
        children = descendants(proc.pid)
        assert len(children) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_until(lambda: not set(children) & set(descendants(1)), "the workers to exit")
    finally:
        for pid in descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
    left = sorted(os.listdir(out))
    assert left and all(".partial-" in name or ".partitions-" in name for name in left), left
    # No part dataset was finished after the kill (the partitions died with the main process)
    assert not glob.glob(str(out / ".*" / "*.idx")), glob.glob(str(out / ".*" / "*"))
    if partitions > 1:
        with pytest.raises(Exception, match="temporary directory of a preprocessing run"):
            IndexedDataset(os.path.join(out, left[0], "part0_text"))
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"PID {proc.pid}, no longer running" in rerun.stderr
    assert sorted(os.listdir(out)) == sorted(os.path.basename(f) for f in files_of(out / "o"))
    assert load(out / "o").num_documents == 25000


def test_a_dead_worker_or_partition_is_an_error_not_a_hang(tmp_path, sp_model):
    """A worker killed mid-task (out of memory, say) used to leave the main process waiting forever."""
    import subprocess
    import sys

    from tests.data_tools_fixtures import ROOT

    path = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(200)])
    script = f"""
import os, signal
from megatron_slung.data import preprocess as pp
from megatron_slung.data.corpus import ordered_pool_map

def die(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x

try:
    list(ordered_pool_map(die, range(10), 2))
except RuntimeError as e:
    print("pool:", e)
pp._partition_main = lambda *args: os._exit(3)
try:
    pp.preprocess({str(path)!r}, {str(tmp_path / "o")!r}, pp.PreprocessOptions(tokenizer_model={sp_model!r}),
                  workers=2, partitions=2)
except RuntimeError as e:
    print("partition:", e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert "pool: a worker process died before finishing its task" in proc.stdout, proc.stderr[-2000:]
    assert "died with exit code 3 before finishing" in proc.stdout, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
