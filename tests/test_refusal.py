"""tools/make_refusal_data.py: refusal documents from risky spans or prompts, template and generated reasons,
risk spans of the request, seeded output, and the --data-path blend with a refusal ratio."""

import json
import os
import sys

import pytest

from megatron_slung.safety.refusal import blend_weights, parse_blend
from tests.safety_fixtures import make_tiny_gpt2, write_jsonl

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.join(REPO, "tools"))
import make_refusal_data  # noqa: E402

TAGGED = [
    {"text": "A calm day in the garden.", "risk_spans": [[0, 25, 1]]},
    {"text": "Hello there. You are an idiot and a moron. Have a nice day.",
     "risk_spans": [[0, 12, 1], [12, 42, 3], [42, 59, 1]]},
    {"text": "You stupid idiot! Go away, moron.", "risk_spans": [[0, 17, 3], [17, 26, 2], [26, 33, 3]]},
]


def _read(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def test_refusals_from_risky_spans(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", TAGGED * 4)
    out = tmp_path / "ref.jsonl"
    assert make_refusal_data.main(["--input", src, "--output", str(out)]) == 0
    docs = _read(out)
    assert len(docs) == 8  # the calm record has no level-3 span
    for d in docs:
        prov = d["refusal"]
        s, e = prov["request_span"]
        request = d["text"][s:e]
        assert request in ("You are an idiot and a moron.", "You stupid idiot! moron.")
        assert prov["source_line"] % 3 != 1 and prov["template"] in ("refusal", "explain")
        assert [s, e, 3] in d["risk_spans"] and all(lv == 1 for a, b, lv in d["risk_spans"] if [a, b] != [s, e])
        assert d["risk_spans"][0][0] == 0 and d["risk_spans"][-1][1] == len(d["text"])  # the spans tile the text
        assert any(word in d["text"] for word in ("can't help", "won't write"))
    again = tmp_path / "again.jsonl"
    assert make_refusal_data.main(["--input", src, "--output", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()  # seeded
    assert make_refusal_data.main(["--input", src, "--output", str(again), "--seed", "5"]) == 0
    assert again.read_bytes() != out.read_bytes()


def test_every_record_of_a_prompt_file_and_generated_reasons(tmp_path):
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2")
    src = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "Tell me why you are such an idiot"}] * 5)
    out = tmp_path / "ref.jsonl"
    summary = tmp_path / "s.json"
    assert make_refusal_data.main(["--input", src, "--output", str(out), "--select", "all", "--generator", gpt2,
                                   "--engine", "hf", "--device", "cpu", "--max-new-tokens", "8",
                                   "--summary-json", str(summary)]) == 0
    docs = _read(out)
    s = json.load(open(summary))
    assert len(docs) == 5 and s["generated_reasons"] + s["template_reasons"] == 5 and s["generated_reasons"] > 0
    assert {d["refusal"]["reason"] for d in docs} <= {"generator", "template"}
    assert all(d["refusal"]["level"] == 3 for d in docs)


def test_blend_weights():
    assert blend_weights(parse_blend(["0.9", "a", "0.1", "b"]), "r", 0.05) == ["0.855000", "a", "0.095000", "b",
                                                                              "0.050000", "r"]
    assert blend_weights(parse_blend(["a"]), "r", 0.2) == ["0.800000", "a", "0.200000", "r"]
    with pytest.raises(ValueError, match="--ratio"):
        blend_weights([(1.0, "a")], "r", 1.0)
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_blend(["0.5", "a", "b"])


def test_blend_file_and_refusals(tmp_path):
    blend = tmp_path / "blend.txt"
    assert make_refusal_data.main(["--ratio", "0.1", "--base-data-path", "0.75", "c", "0.25", "t",
                                   "--refusal-prefix", "ref", "--blend-file", str(blend)]) == 0
    assert blend.read_text().split() == ["0.675000", "c", "0.225000", "t", "0.100000", "ref"]
    with pytest.raises(SystemExit):
        make_refusal_data.main(["--ratio", "0.1", "--blend-file", str(blend)])  # the other blend flags missing
    src = write_jsonl(tmp_path / "in.jsonl", TAGGED)
    tpl = tmp_path / "t.txt"
    tpl.write_text("no placeholders")
    assert make_refusal_data.main(["--input", src, "--output", str(tmp_path / "o.jsonl"), "--template", str(tpl)]) == 1
    assert not (tmp_path / "o.jsonl").exists()
