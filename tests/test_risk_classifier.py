"""tools/train_risk_classifier.py: label kinds, the linear / fastText / HF backends, report.json, and
tools/tag_risk.py --scorer-path DIR --score-thresholds."""

import json
import os
import sys

import numpy as np
import pytest

from megatron_slung.data.corpus import InputError
from megatron_slung.safety import classifier as C
from tests.safety_fixtures import labelled_records, make_tiny_bert, write_jsonl

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
TOOLS = os.path.join(REPO, "tools")
sys.path.insert(0, TOOLS)
import tag_risk  # noqa: E402
import train_risk_classifier  # noqa: E402


def _train(tmp_path, records, *extra, name="clf"):
    data = write_jsonl(tmp_path / f"{name}.jsonl", records)
    out = str(tmp_path / name)
    assert train_risk_classifier.main(["--input", data, "--output", out, "--hash-bits", "14", *extra]) == 0
    return data, out


@pytest.mark.parametrize("values, kind", [([0, 1, True, 0.0], "binary"), ([0, 3, 5, 1], "score"),
                                          ([0, 0.25, 1, 0.5], "probability")])
def test_label_kind_is_detected(tmp_path, values, kind):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "t", "label": v} for v in values])
    assert C.scan_labels([path], "label")["label_type"] == kind


def test_mixed_and_invalid_labels_are_refused_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "t", "label": v} for v in (0, 4, 1, 0.3)])
    with pytest.raises(InputError, match=r"l\.jsonl:4: label 'label' is 0\.3 \(a probability\) but .*l\.jsonl:2 has 4"):
        C.scan_labels([path], "label")
    for bad, msg in [(2.5, "neither 0/1"), (-1, "neither"), (6, "neither"), ("x", "expected a number"),
                     (None, "expected a number")]:
        path = write_jsonl(tmp_path / "b.jsonl", [{"text": "t", "label": 0}, {"text": "t", "label": bad}])
        with pytest.raises(InputError, match=rf"b\.jsonl:2: .*{msg}"):
            C.scan_labels([path], "label")
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "t", "label": 1}, {"text": "t"}])
    with pytest.raises(InputError, match=r"m\.jsonl:2: missing label key 'label'"):
        C.scan_labels([path], "label")
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "t", "label": 0.5}])
    with pytest.raises(InputError, match=r"f\.jsonl:1: .*--label-type binary needs 0 or 1"):
        C.scan_labels([path], "label", "binary")


def test_linear_model_applies_sklearns_weights_exactly():
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import SGDClassifier

    recs = labelled_records(300)
    feats = {"hash_bits": 12, "ngram_range": [1, 2], "analyzer": "word"}
    vec = HashingVectorizer(**C.vectorizer_kwargs(feats))
    texts = [r["text"] for r in recs]
    for labels in ([r["label"] for r in recs], [int(r["label"] >= 3) for r in recs]):
        clf = SGDClassifier(loss="log_loss", random_state=0).fit(vec.transform(texts), labels)
        ours = C.LinearModel(feats, clf.coef_, clf.intercept_).probabilities(texts)
        assert np.allclose(ours, clf.predict_proba(vec.transform(texts)), atol=1e-6)


@pytest.mark.parametrize("kind", ["score", "binary", "probability"])
def test_train_linear_writes_model_manifest_and_report(tmp_path, kind):
    _, out = _train(tmp_path, labelled_records(1500, kind=kind), "--epochs", "3")
    manifest = json.load(open(os.path.join(out, C.MANIFEST)))
    assert manifest["kind"] == "linear" and manifest["label_type"] == kind
    report = json.load(open(os.path.join(out, "report.json")))
    n = report["heldout_records"]
    assert 100 < n < 200  # --holdout 0.1 of 1500
    assert report["auroc"] > 0.85 and report["f1"] > 0.7
    assert np.array(report["confusion_0_5"]["matrix"]).shape == (6, 6)
    assert np.array(report["confusion_0_5"]["matrix"]).sum() == n
    assert sum(b["count"] for b in report["reliability"]) == n and 0 <= report["ece"] <= 1
    clf = C.load_classifier(out)
    scores = clf.scores(["idiot moron stupid hate kill", "lovely garden coffee book"])
    assert 0 <= scores[1] < scores[0] <= 5
    if kind == "score":
        assert set(report["auroc_by_cut"]) == {">=1", ">=2", ">=3", ">=4", ">=5"}


def test_training_is_seeded_and_the_holdout_is_the_same_whatever_the_batch_size(tmp_path):
    recs = labelled_records(800)
    _, a = _train(tmp_path, recs, "--batch-size", "64", name="a")
    _, b = _train(tmp_path, recs, "--batch-size", "64", name="b")
    _, c = _train(tmp_path, recs, "--batch-size", "500", name="c")
    ra, rb, rc = (json.load(open(os.path.join(d, "report.json"))) for d in (a, b, c))
    assert ra["auroc"] == rb["auroc"] and ra["confusion_0_5"] == rb["confusion_0_5"]
    assert ra["heldout_records"] == rc["heldout_records"]


def test_a_failed_run_leaves_no_model_directory(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 7}])
    out = tmp_path / "clf"
    assert train_risk_classifier.main(["--input", data, "--output", str(out)]) == 1
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    data = write_jsonl(tmp_path / "ok.jsonl", labelled_records(50))
    assert train_risk_classifier.main(["--input", data, "--output", str(out)]) == 1  # not a classifier dir
    assert (out / "notes.txt").read_text() == "mine"


def test_fasttext_backend(tmp_path):
    pytest.importorskip("fasttext", reason="fastText is optional (pip install fasttext-numpy2)")
    _, out = _train(tmp_path, labelled_records(1500), "--backend", "fasttext", "--epochs", "10")
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["kind"] == "fasttext" and report["auroc"] > 0.85
    data = write_jsonl(tmp_path / "p.jsonl", labelled_records(100, kind="probability"))
    assert train_risk_classifier.main(["--input", data, "--output", str(tmp_path / "p"), "--backend", "fasttext"]) == 1


def test_hf_encoder_fine_tuning(tmp_path):
    base = make_tiny_bert(tmp_path / "bert")
    _, out = _train(tmp_path, labelled_records(400), "--hf-model", base, "--epochs", "2", "--hf-lr", "3e-3",
                    "--hf-batch-size", "32", "--max-length", "32")
    manifest = json.load(open(os.path.join(out, C.MANIFEST)))
    assert manifest["kind"] == "hf" and os.path.isfile(os.path.join(out, "config.json"))
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["auroc"] > 0.8  # bad words vs good words: learnable in two epochs
    clf = C.load_classifier(out)
    assert clf.probabilities(["idiot"]).shape == (1, 6)


def test_tag_risk_maps_the_0_5_score_with_thresholds(tmp_path):
    recs = labelled_records(600)
    data, out = _train(tmp_path, recs)
    tagged = tmp_path / "tagged.jsonl"
    assert tag_risk.main(["--input", data, "--output", str(tagged), "--unit", "document", "--tagger", "classifier",
                          "--scorer-path", out, "--score-thresholds", "2,3,4", "--workers", "2"]) == 0
    scores = C.load_classifier(out).scores([r["text"] for r in recs])
    got = [json.loads(x)["risk_spans"][0][2] for x in open(tagged)]
    want = [1 + sum(s >= t for t in (2, 3, 4)) for s in scores]
    assert got == want and {1, 2, 3, 4} <= set(got)
    # the thresholds are required, checked, and only for such a directory
    base = ["--input", data, "--output", str(tmp_path / "x.jsonl"), "--unit", "document", "--tagger", "classifier"]
    assert tag_risk.main(base + ["--scorer-path", out]) == 1
    assert tag_risk.main(base + ["--scorer-path", out, "--score-thresholds", "3,2"]) == 1
    assert tag_risk.main(base + ["--scorer-path", out, "--score-thresholds", "2,3", "--toxic-threshold", "0.5"]) == 1
    assert tag_risk.main(base + ["--score-thresholds", "3"]) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_risk_classifier_scorer_gives_the_unsafe_probability(tmp_path):
    from megatron_slung.data.scorers import build_scorer, score_texts

    _, out = _train(tmp_path, labelled_records(600))
    score = build_scorer("risk-classifier", out)
    texts = ["idiot moron kill", "lovely book"]
    p = score_texts(score, texts)
    clf = C.load_classifier(out)
    assert np.allclose(p, clf.probabilities(texts)[:, 3:].sum(axis=1)) and p[0] > p[1]
