"""Risk tagging: sentence splitting, lexicon / classifier / PII taggers, scorers, and tools/tag_risk.py."""

import importlib.util
import json
import os

import numpy as np
import pytest

from megatron_slung.data.scorers import build_scorer
from megatron_slung.data.tagging import (
    ClassifierTagger,
    LexiconTagger,
    PIITagger,
    RiskTagger,
    merge_spans,
    split_sentences,
)
from tests.data_tools_fixtures import TOOLS, corpus_file, corpus_records, run_tool, sp_model, write_jsonl  # noqa: F401


def length_scorer(texts):
    """A deterministic stand-in classifier for tests: long sentences score high."""
    return [min(1.0, len(t) / 100.0) ** 3 for t in texts]


def sentences(text):
    return [text[s:e] for s, e in split_sentences(text)]


def test_split_sentences():
    assert sentences("Hello there. How are you? Fine!") == ["Hello there.", " How are you?", " Fine!"]
    assert sentences("One.\n\nTwo") == ["One.", "\n\nTwo"]  # whitespace goes with the next sentence
    assert sentences("No end") == ["No end"]
    assert sentences('He said "stop." Then left.') == ['He said "stop."', " Then left."]
    assert sentences("v1.2 is out... really?! yes") == ["v1.2 is out...", " really?!", " yes"]
    assert sentences("東京です。大阪です。") == ["東京です。", "大阪です。"]  # no space needed after 。
    assert sentences("line one\nline two\n") == ["line one", "\nline two\n"]  # trailing whitespace joins
    assert sentences("   ") == ["   "]
    assert split_sentences("") == []
    for text in ["a. b. c.", " lead. trail ", "x\n\n\ny. z", "😀. 😀!"]:
        spans = split_sentences(text)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # they tile the text
        assert all(text[s:e].strip() for s, e in spans)


def test_lexicon_whole_word_case_insensitive(tmp_path):
    (tmp_path / "tox.txt").write_text("# toxic words\nzorblax\nbad  phrase\n\n")
    (tmp_path / "amb.txt").write_text("meh\n")
    lex = LexiconTagger.from_files([f"3:{tmp_path}/tox.txt", f"2:{tmp_path}/amb.txt"], default_level=1)
    assert lex.levels(["a ZORBLAX here", "zorblaxes are fine", "meh, zorblax!", "meh", "a BAD\nphrase", "nothing",
                       "xmeh"]) == [3, 1, 3, 2, 3, 1, 1]
    assert lex.find("Zorblax and meh") == [(0, 7, 3), (12, 15, 2)]
    with pytest.raises(ValueError, match="LEVEL:PATH"):
        LexiconTagger.from_files(["toxic.txt"])


def test_classifier_thresholds():
    scores = [0.0, 1e-4, 2e-4, 0.5, 0.99, 0.991, 1.0]
    tagger = ClassifierTagger(lambda texts: scores[: len(texts)])
    assert tagger.levels(["x"] * 7) == [1, 1, 2, 2, 2, 3, 3]  # SLUNG: > 0.99 → 3, > 1e-4 → 2, else 1
    assert ClassifierTagger(lambda t: scores, 0.5, 0.1).levels(["x"] * 7) == [1, 1, 1, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="outside"):
        ClassifierTagger(lambda t: [1.5]).levels(["x"])
    with pytest.raises(ValueError, match="returned 2 scores for 1"):
        ClassifierTagger(lambda t: [0.1, 0.2]).levels(["x"])
    with pytest.raises(ValueError):
        ClassifierTagger(length_scorer, 0.1, 0.5)


def test_pii_tagger():
    text = "Mail jane.doe+x@mail.example.org or call +1 (555) 123-4567 / 020 7946 0958. Ada Lovelace met Ada."
    pii = PIITagger(level=4, names=["Ada Lovelace", "Ada"])
    found = {text[s:e] for s, e, level in pii.spans(text)}
    assert found == {"jane.doe+x@mail.example.org", "+1 (555) 123-4567", "020 7946 0958", "Ada Lovelace", "Ada"}
    assert all(level == 4 for _, _, level in pii.spans(text))
    quiet = "In 2024 it cost 12.50 or 1,000,000 units; see v1.2.3 and ada@home (no TLD). Adam is not Ada's?"
    assert {quiet[s:e] for s, e, _ in pii.spans(quiet)} == {"Ada"}  # Ada's: whole word before the apostrophe


def test_merge_spans_takes_the_highest_level():
    assert merge_spans(10, [[(0, 5, 1), (5, 10, 1)]]) == [[0, 10, 1]]
    assert merge_spans(10, [[(0, 6, 1), (6, 10, 3)], [(4, 8, 4)]]) == [[0, 4, 1], [4, 8, 4], [8, 10, 3]]
    assert merge_spans(10, [[(2, 4, 2)], [(3, 6, 1)]]) == [[2, 4, 2], [4, 6, 1]]  # uncovered stays uncovered
    assert merge_spans(0, []) == []


def test_risk_tagger_units():
    lex = LexiconTagger({3: ["zorblax"]})
    pii = PIITagger(names=["Bob"])
    text = "Fine words. Bob says zorblax. Calm again."
    tagger = RiskTagger("sentence", [lex], [pii])
    assert tagger.tag([text]) == [[[0, 11, 1], [11, 12, 3], [12, 15, 4], [15, 29, 3], [29, 41, 1]]]
    assert RiskTagger("document", [lex]).tag([text, "calm"]) == [[[0, 41, 3]], [[0, 4, 1]]]
    # given spans are kept; PII is added on top
    assert RiskTagger("given", [], [pii]).tag([text], [[(0, 5, 2)]]) == [[[0, 5, 2], [12, 15, 4]]]
    with pytest.raises(ValueError, match="given"):
        RiskTagger("given", [lex])


def test_tag_risk_tool_identical_output_and_atomic(tmp_path, corpus_file):
    (tmp_path / "tox.txt").write_text("zorblax\nvexmorg\ngnashtooth\n")
    (tmp_path / "names.txt").write_text("Ada Lovelace\n")
    common = ["--input", corpus_file, "--tagger", "lexicon", "--lexicon", f"3:{tmp_path}/tox.txt", "--tagger", "pii",
              "--pii-names", tmp_path / "names.txt", "--tagger", "classifier", "--scorer", "tests.test_tagging:length_scorer"]
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}.jsonl"
        proc = run_tool("tag_risk.py", *common, "--output", out, "--workers", workers, "--log-interval", 50)
        assert "docs/s" in proc.stderr and "tagged" in proc.stdout
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    records = [json.loads(line) for line in outs[0].decode().splitlines()]
    original = [json.loads(line) for line in open(corpus_file)]
    assert [r["text"] for r in records] == [r["text"] for r in original]
    levels = {lv for r in records for _, _, lv in r["risk_spans"]}
    assert {1, 2, 3} <= levels
    for r in records:  # sorted, non-overlapping, inside the text
        spans = r["risk_spans"]
        assert all(0 <= s < e <= len(r["text"]) for s, e, _ in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # Bad input: an error naming file and line, and no output file.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + "{not json\n")
    proc = run_tool("tag_risk.py", *common[2:], "--input", bad, "--output", tmp_path / "never.jsonl", check=False)
    assert proc.returncode == 1 and f"{bad}:2: malformed JSON" in proc.stderr
    assert not list(tmp_path.glob("never.jsonl*"))


def test_tag_risk_given_unit_validates(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "Bob is here", "risk_spans": [[0, 3, 2]]}, {"text": "x"},
                                               {"text": "abc", "risk_spans": [[0, 9, 3]]}])
    proc = run_tool("tag_risk.py", "--input", path, "--output", tmp_path / "o.jsonl", "--unit", "given",
                    "--tagger", "pii", check=False)
    assert proc.returncode == 1 and f"{path}:3" in proc.stderr and "out of range" in proc.stderr
    path = write_jsonl(tmp_path / "in2.jsonl", [{"text": "mail bob@x.org now", "risk_spans": [[0, 4, 2]]}, {"text": "x"}])
    run_tool("tag_risk.py", "--input", path, "--output", tmp_path / "o.jsonl", "--unit", "given", "--tagger", "pii")
    out = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert out[0]["risk_spans"] == [[0, 4, 2], [5, 14, 4]] and out[1]["risk_spans"] == []


@pytest.mark.skipif(importlib.util.find_spec("profanity_check") is None, reason="alt-profanity-check not installed")
def test_profanity_scorer():
    score = build_scorer("profanity")
    clean, rude = score(["have a lovely day, friend", "fuck you, you stupid idiot"])
    assert 0 <= clean < 0.5 < rude <= 1
    assert ClassifierTagger(score).levels(["fuck you, you stupid idiot"]) == [3]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A randomly initialised 2-label BERT with its own small tokenizer, saved to a directory."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(["the quick brown fox is rude and nice and calm"] * 20,
                            trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                                      show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(hf_tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2,
                        id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})
    model = BertForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("clf") / "tiny"
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)


def test_hf_classifier_scorer(tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["the fox is rude", "calm", "the quick brown fox is nice and calm and quick"]
    score = build_scorer("hf", tiny_classifier, batch_size=2)
    got = score(texts)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    with torch.no_grad():
        want = [torch.softmax(model(**tok(t, return_tensors="pt")).logits, -1)[0, 1].item() for t in texts]
    assert np.allclose(got, want, atol=1e-5)
    assert score.label_index == 1  # "toxic", not "non-toxic"
    assert build_scorer("hf", tiny_classifier, label="non-toxic").label_index == 0
    with pytest.raises(FileNotFoundError, match="local directory"):
        build_scorer("hf", os.path.join(tiny_classifier, "missing"))


def test_tag_risk_with_hf_classifier_workers(tmp_path, tiny_classifier, corpus_records):
    import sys

    sys.path.insert(0, TOOLS)
    import tag_risk  # tools/tag_risk.py, run in this process (its workers fork from it: fast)

    path = write_jsonl(tmp_path / "in.jsonl", corpus_records[:30])
    config = tag_risk.TagConfig(unit="sentence", taggers=("classifier",), scorer="hf", scorer_path=tiny_classifier,
                                toxic_threshold=0.5, ambiguous_threshold=0.3)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"o{workers}.jsonl"
        tag_risk.run([path], str(out), config, workers=workers, chunk_bytes=4096)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    levels = {lv for line in outs[0].decode().splitlines() for _, _, lv in json.loads(line)["risk_spans"]}
    assert levels <= {1, 2, 3} and levels


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_tag_risk_compressed_output_feeds_the_next_tool(tmp_path, corpus_file, sp_model, suffix):
    """--output t.jsonl.gz used to be plain JSONL (the temporary name decided), which the next tool refused."""
    import gzip

    import zstandard

    (tmp_path / "tox.txt").write_text("zorblax\nvexmorg\n")
    common = ["--input", corpus_file, "--unit", "sentence", "--tagger", "lexicon", "--lexicon", f"3:{tmp_path}/tox.txt",
              "--workers", "2"]
    run_tool("tag_risk.py", *common, "--output", tmp_path / "t.jsonl")
    run_tool("tag_risk.py", *common, "--output", tmp_path / f"t.jsonl{suffix}")
    data = (tmp_path / f"t.jsonl{suffix}").read_bytes()
    if suffix == ".gz":
        decoded = gzip.decompress(data)
    else:
        decoded = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    assert decoded == (tmp_path / "t.jsonl").read_bytes()
    # the next tool reads it and writes the same dataset as from the plain file
    for name in ("t.jsonl", f"t.jsonl{suffix}"):
        run_tool("preprocess_data.py", "--input", tmp_path / name, "--output-prefix", tmp_path / name.replace(".", "_"),
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model)
    for ext in (".bin", ".idx", ".risk.bin", ".risk.idx"):
        a = (tmp_path / f"t_jsonl_text_document{ext}").read_bytes()
        assert a == (tmp_path / f"t_jsonl{suffix.replace('.', '_')}_text_document{ext}").read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))
    proc = run_tool("tag_risk.py", *common, "--output", tmp_path / "t.jsonl.xz", check=False)
    assert proc.returncode == 1 and ".xz output is not supported" in proc.stderr
    assert not list(tmp_path.glob("t.jsonl.xz*"))


def test_tag_risk_lone_surrogate_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut emoji \\ud83d here"}\n', encoding="utf-8")
    proc = run_tool("tag_risk.py", "--input", path, "--output", tmp_path / "o.jsonl", "--unit", "given", check=False)
    assert proc.returncode == 1
    assert f"{path}:2: field 'text' holds a lone surrogate escape \\ud83d at character 10" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["s.jsonl"]


def test_tag_risk_removes_what_a_dead_run_left(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID is no longer running
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    out = tmp_path / "o.jsonl.gz"
    (tmp_path / f"o.jsonl.gz.tmp-{dead.pid}").write_text("half a file")
    (tmp_path / f"o.jsonl.gz.tmp-{os.getpid()}").write_text("a live run's")  # this test process is alive
    proc = run_tool("tag_risk.py", "--input", path, "--output", out, "--unit", "given")
    assert f"removed what an earlier run (PID {dead.pid}, no longer running) left" in proc.stderr
    assert f"process {os.getpid()} is still running" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o.jsonl.gz", f"o.jsonl.gz.tmp-{os.getpid()}"]
