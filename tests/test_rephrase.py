"""tools/rephrase_risky.py: spans and documents rewritten by a tiny random GPT-2 or narrative templates,
provenance, resuming after a kill (same bytes), refusals, and tools/preprocess_data.py on the output."""

import json
import os
import sys

import pytest

from tests.data_tools_fixtures import run_tool
from tests.safety_fixtures import make_tiny_gpt2, write_jsonl

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.join(REPO, "tools"))
import rephrase_risky  # noqa: E402

RECORDS = [
    {"text": "A calm day in the garden.", "risk_spans": [[0, 25, 1]]},
    {"text": "Hello there. You are an idiot and a moron. Have a nice day.",
     "risk_spans": [[0, 12, 1], [12, 42, 3], [42, 59, 1]]},
    {"text": "No spans here."},
    {"text": "You stupid idiot! Go away, moron.", "risk_spans": [[0, 17, 3], [17, 26, 2], [26, 33, 3]]},
] * 3


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gen") / "gpt2")


def _read(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def _run(*args):
    return rephrase_risky.main([str(a) for a in args])


def test_spans_rewritten_by_the_generator_with_provenance(tmp_path, gpt2):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    assert _run("--input", src, "--output", out, "--generator", gpt2, "--engine", "hf", "--max-new-tokens", "12",
                "--batch-size", "3", "--device", "cpu") == 0
    recs = _read(out)
    assert len(recs) == len(RECORDS)  # every prompt fits, no rewrite came out empty
    for i, (orig, rec) in enumerate(zip(RECORDS, recs)):
        prov = rec["rephrase"]
        assert prov["source_file"] == src and prov["source_line"] == i + 1
        runs = [s for s in orig.get("risk_spans", []) if s[2] >= 3]
        if not runs:
            assert rec == {**orig, "rephrase": {**prov, "status": "unchanged"}}
            continue
        assert prov["status"] == "rephrased" and prov["generator"] == "gpt2" and prov["engine"] == "hf"
        assert [u["span"] for u in prov["units"]] == [s[:2] for s in runs]
        assert all(u["template"] in ("narrative", "educational") for u in prov["units"])
        # untouched text is kept, the rest replaced at the recorded new spans; kept spans shifted there
        text = rec["text"]
        kept = [orig["text"][s:e] for s, e, level in orig["risk_spans"] if level < 3]
        assert [text[s:e] for s, e, level in rec["risk_spans"]] == kept
        assert orig["text"][:runs[0][0]] == text[:prov["units"][0]["new_span"][0]]


def test_resume_after_a_kill_writes_the_same_bytes(tmp_path, gpt2):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    args = ["--input", src, "--generator", gpt2, "--engine", "hf", "--max-new-tokens", "8", "--batch-size", "2",
            "--device", "cpu", "--seed", "7"]
    whole = tmp_path / "whole.jsonl"
    assert _run(*args, "--output", whole) == 0
    part = tmp_path / "part.jsonl"
    # batch size 2: each batch closes after a cycle of 4 records (3 units), so 1 batch leaves 8 records to do
    assert _run(*args, "--output", part, "--max-batches", "1") == 0
    assert not part.exists() and (tmp_path / "part.jsonl.partial").exists()
    state = json.load(open(f"{part}.state.json"))
    assert 0 < state["consumed"] < len(RECORDS) and not state["complete"]
    with open(f"{part}.partial", "ab") as f:  # a batch the kill cut half-way
        f.write(b'{"text": "half a rec')
    assert _run(*args, "--output", part, "--max-batches", "1") == 0
    assert _run(*args, "--output", part) == 0
    assert part.read_bytes() == whole.read_bytes()
    assert json.load(open(f"{part}.state.json"))["complete"]
    assert _run(*args, "--output", part) == 0  # complete: nothing to do
    assert part.read_bytes() == whole.read_bytes()
    # other settings are refused rather than mixed into the same output
    assert _run(*args[:-2], "--seed", "8", "--output", part) == 1
    other = [a if a != "8" else "9" for a in args]
    assert _run(*other, "--output", whole) == 1


def test_documents_too_long_for_the_generator_are_dropped_not_kept(tmp_path):
    gen = make_tiny_gpt2(tmp_path / "short", max_positions=64)
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS[:4])
    out = tmp_path / "out.jsonl"
    summary = tmp_path / "s.json"
    assert _run("--input", src, "--output", out, "--generator", gen, "--engine", "hf", "--max-new-tokens", "40",
                "--unit", "document", "--device", "cpu", "--summary-json", summary) == 0
    s = json.load(open(summary))
    assert s["dropped_too_long"] == 2 and s["unchanged"] == 2
    assert all(r["rephrase"]["status"] == "unchanged" for r in _read(out))


def test_narrative_templates_without_a_model_and_preprocess_takes_the_output(tmp_path, gpt2):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    assert _run("--input", src, "--output", out, "--generator", "none", "--emit", "rephrased") == 0
    recs = _read(out)
    assert len(recs) == 6 and all(r["rephrase"]["status"] == "rephrased" for r in recs)
    assert all("idiot" not in r["text"] and "moron" not in r["text"] for r in recs)
    assert recs[0]["text"].startswith("Hello there. (") and recs[0]["text"].endswith(" Have a nice day.")
    two = recs[1]["rephrase"]["units"]
    assert len(two) == 2 and two[0]["span"] == [0, 17] and two[1]["span"] == [26, 33]
    # the ambiguous span between them is kept, at its new place
    (s, e, level), = recs[1]["risk_spans"]
    assert level == 2 and recs[1]["text"][s:e] == " Go away,"
    run_tool("preprocess_data.py", "--input", out, "--output-prefix", tmp_path / "ds", "--tokenizer-type",
             "HuggingFaceTokenizer", "--tokenizer-model", gpt2, "--append-eod", "--workers", "1")
    assert (tmp_path / "ds_text_document.risk.bin").exists()


def test_bad_input_and_flags_are_refused(tmp_path, gpt2):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "abc", "risk_spans": [[0, 9, 3]]}])
    assert _run("--input", bad, "--output", tmp_path / "o.jsonl", "--generator", "none") == 1
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS[:2])
    assert _run("--input", src, "--output", tmp_path / "o.jsonl.gz", "--generator", "none") == 1
    assert _run("--input", src, "--output", tmp_path / "o.jsonl", "--generator", str(tmp_path / "nope")) == 1
    tpl = tmp_path / "t.txt"
    tpl.write_text("no placeholder")
    assert _run("--input", src, "--output", tmp_path / "o.jsonl", "--generator", gpt2, "--template", tpl) == 1
    with pytest.raises(SystemExit):  # generation flags mean nothing without a generator
        _run("--input", src, "--output", tmp_path / "o.jsonl", "--generator", "none", "--temperature", "0")
