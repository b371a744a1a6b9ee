"""Evaluation suite on tiny Llama models built in the test (no downloads)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from megatron_slung.data import scorers
from megatron_slung.eval import common, generation, perplexity, probe, safe_beam, steer, toxicity, zero_shot
from megatron_slung.eval.__main__ import main as eval_main
from megatron_slung.eval.common import EvalInputError
from tests import eval_fixtures as fx

os.environ.setdefault("SLUNG_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def tok():
    return fx.word_tokenizer()


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------

BIGRAM = {"hello": {"you": 3.0, "they": 1.0}, "you": {"idiot": 2.0, "are": 1.0}, "they": {"are": 4.0},
          "are": {"nice": 5.0}, "idiot": {"</s>": 2.0}, "<s>": {"hello": 2.0}}


def test_perplexity_per_risk_level_matches_the_bigram_table(tok, tmp_path):
    model = fx.bigram_llama(tok, BIGRAM)
    ref = fx.bigram_logprobs(tok, BIGRAM)
    text = "hello you idiot hello they are nice"
    # "idiot" is toxic (3), "you" ambiguous (2), the rest benign (1) except the unlabelled start.
    spans = [[0, 5, 1], [6, 9, 2], [10, 15, 3], [16, 35, 1]]
    data = write_jsonl(tmp_path / "ppl.jsonl", [{"text": text, "risk_spans": spans}])
    res = perplexity.evaluate_perplexity(model, tok, jsonl=data, batch_size=2, seq_length=4)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    levels = [0, 1, 2, 3, 1, 1, 1, 1]
    expect = {}
    for t in range(1, len(ids)):
        expect.setdefault(levels[t], []).append(-ref[ids[t - 1], ids[t]].item())
    assert res["overall"]["tokens"] == len(ids) - 1
    all_nll = np.mean([x for v in expect.values() for x in v])
    assert res["overall"]["nll"] == pytest.approx(all_nll, abs=1e-3)
    assert sorted(res["per_level"]) == ["1", "2", "3"]
    for level, nlls in expect.items():
        got = res["per_level"][str(level)]
        assert got["tokens"] == len(nlls)
        assert got["perplexity"] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-3)
    assert res["per_level"]["3"]["name"] == "toxic"


def test_perplexity_windows_cover_every_token_once():
    docs = [(np.arange(10), np.arange(10, dtype=np.uint8)), (np.arange(3), np.zeros(3, np.uint8))]
    wins = list(perplexity.windows(docs, 4))
    targets = np.concatenate([w[1] for w in wins])
    assert targets.tolist() == list(range(1, 10)) + [1, 2]
    assert np.concatenate([w[2] for w in wins]).tolist() == list(range(1, 10)) + [0, 0]


def test_perplexity_on_an_indexed_dataset(tok, tmp_path):
    idx = pytest.importorskip("megatron_slung.data.indexed_dataset")
    model = fx.bigram_llama(tok, BIGRAM)
    ids = tok("hello you idiot", add_special_tokens=False)["input_ids"]
    prefix = str(tmp_path / "d_text_document")
    builder = idx.IndexedDatasetBuilder(prefix, dtype=np.uint16, with_risk=True)
    builder.add_document(np.asarray(ids), risk=np.asarray([1, 2, 3], dtype=np.uint8))
    builder.finalize()
    res = perplexity.evaluate_perplexity(model, tok, data_path=prefix)
    ref = fx.bigram_logprobs(tok, BIGRAM)
    assert res["per_level"]["3"]["nll"] == pytest.approx(-ref[ids[1], ids[2]].item(), abs=1e-3)
    assert res["overall"]["tokens"] == 2


# --------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------


def labelled_set(n, seed=0):
    """Texts whose label is decided by their last word (toxic vs clean), with random words before it."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(fx.OTHER_WORDS, size=rng.integers(1, 5)))
        words.append(rng.choice(fx.TOXIC_WORDS if y else fx.CLEAN_WORDS))
        texts.append(" ".join(words))
        labels.append(y)
    return texts, np.asarray(labels)


def test_probe_separable_is_high_and_shuffled_is_near_chance(tok):
    model = fx.random_llama(tok, seed=1)
    texts, labels = labelled_set(200)
    res = probe.evaluate_probe(model, tok, texts, labels, layers="all", seed=0, batch_size=32)
    assert set(res["layers"]) == {0, 1, 2}
    for layer, r in res["layers"].items():
        assert r["f1"] >= 0.95 and r["auroc"] >= 0.98, (layer, r)
        assert r["control"]["auroc"] < 0.8, (layer, r["control"])
    # Labels that have nothing to do with the texts: the probe itself is near chance on held-out data.
    shuffled = np.random.default_rng(5).permutation(labels)
    bad = probe.evaluate_probe(model, tok, texts, shuffled, layers=[0], seed=0, batch_size=32, control=False)
    assert 0.25 <= bad["layers"][0]["accuracy"] <= 0.75
    assert bad["layers"][0]["auroc"] < 0.8


def test_probe_reads_the_last_real_token_whatever_the_padding(tok):
    model = fx.random_llama(tok, seed=2)
    texts = ["hello you", "hello you are so very kind", "the cat"]
    together = probe.last_token_hidden_states(model, tok, texts, layers=[1, 2], batch_size=3)
    for i, t in enumerate(texts):
        alone = probe.last_token_hidden_states(model, tok, [t], layers=[1, 2], batch_size=1)
        for layer in (1, 2):
            np.testing.assert_allclose(together[layer][i], alone[layer][0], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------


def test_zero_shot_noisy_channel_known_answer(tok):
    table = {"polite": {w: 6.0 for w in fx.CLEAN_WORDS}, "toxic": {w: 6.0 for w in fx.TOXIC_WORDS}}
    model = fx.bigram_llama(tok, table)
    texts = ["idiot you are", "cat is nice", "moron", "sun tree", "jerk the", "kind dog"]
    labels = [1, 0, 1, 0, 1, 0]
    res = zero_shot.evaluate_zero_shot(model, tok, texts, labels, prompts={0: "the polite", 1: "the toxic"})
    assert res["predictions"] == labels
    assert res["accuracy"] == 1.0 and res["f1"] == 1.0 and res["auroc"] == 1.0
    # Swapping the prompts swaps every prediction.
    swapped = zero_shot.evaluate_zero_shot(model, tok, texts, labels, prompts={0: "the toxic", 1: "the polite"})
    assert swapped["accuracy"] == 0.0


def test_zero_shot_score_is_the_text_log_likelihood(tok):
    model = fx.bigram_llama(tok, BIGRAM)
    ref = fx.bigram_logprobs(tok, BIGRAM)
    got = zero_shot.continuation_logprobs(model, tok, ["hello"], ["you idiot"])[0]
    i = tok.convert_tokens_to_ids
    want = ref[i("hello"), i("you")] + ref[i("you"), i("idiot")]
    assert got == pytest.approx(want.item(), abs=1e-3)


def test_zero_shot_prompt_parsing(tmp_path):
    p = zero_shot.parse_prompts(["1=Toxic:\\n"], None)
    assert p[1] == "Toxic:\n" and p[0] == zero_shot.DEFAULT_PROMPTS[0]
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"0": "a", "1": "b"}))
    assert zero_shot.parse_prompts(None, str(f)) == {0: "a", 1: "b"}
    f.write_text("[1, 2]")
    with pytest.raises(EvalInputError, match="p.json"):
        zero_shot.parse_prompts(None, str(f))


# --------------------------------------------------------------------------------------------
# Generation and toxicity
# --------------------------------------------------------------------------------------------


def test_filter_logits_matches_a_plain_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5), (0, 1.0)]:
        got = generation.filter_logits(logits, top_k, top_p, temperature=0.8)
        for row in range(3):
            scaled = logits[row] / 0.8
            order = scaled.argsort(descending=True).tolist()
            keep = order[:top_k] if top_k else order
            if top_p < 1.0:
                probs = scaled[keep].softmax(-1)
                cum, kept = 0.0, []
                for tok_id, pr in zip(keep, probs.tolist()):
                    kept.append(tok_id)
                    cum += pr
                    if cum >= top_p:
                        break
                keep = kept
            assert set(torch.isfinite(got[row]).nonzero().flatten().tolist()) == set(keep)


def test_sampling_is_seeded_per_sample_and_independent_of_batch_size(tok):
    model = fx.random_llama(tok, seed=3)
    prompts = ["hello you", "the cat is", "they are so very", "a"]
    cfg = generation.SamplingConfig(num_samples=3, max_new_tokens=6, top_k=10, seed=7, stop_at_eos=False)
    a = generation.sample(model, tok, prompts, cfg, batch_size=1)
    b = generation.sample(model, tok, prompts, cfg, batch_size=5)
    assert a.token_ids == b.token_ids
    assert len(a.texts) == 4 and all(len(t) == 3 for t in a.texts)
    assert len({tuple(x) for per in a.token_ids for x in per}) > 3  # samples differ from one another
    c = generation.sample(model, tok, prompts, generation.SamplingConfig(**{**vars(cfg), "seed": 8}), batch_size=5)
    assert c.token_ids != a.token_ids


def test_sampling_follows_the_model_distribution(tok):
    # After "hello": "you" and "they" with equal logits, everything else far below.
    model = fx.bigram_llama(tok, {"hello": {"you": 10.0, "they": 10.0}}, default_logit=-10.0)
    cfg = generation.SamplingConfig(num_samples=400, max_new_tokens=1, top_k=0, seed=0)
    gens = generation.sample(model, tok, ["hello"], cfg, batch_size=400)
    share = np.mean([t == "you" for t in gens.texts[0]])
    assert 0.42 < share < 0.58  # binomial(400, 0.5): 4 standard deviations
    assert set(gens.texts[0]) == {"you", "they"}


def test_greedy_generation_matches_hf_generate(tok):
    model = fx.random_llama(tok, seed=4)
    prompts = ["hello you", "the cat is so very"]
    cfg = generation.SamplingConfig(max_new_tokens=5, temperature=0, stop_at_eos=False)
    ours = generation.sample(model, tok, prompts, cfg, batch_size=2)
    for i, p in enumerate(prompts):
        ids = torch.tensor([common.encode(tok, [p])[0]])
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert ours.token_ids[i][0] == ref[0, ids.size(1):].tolist()


GEN_TABLE = {"hello": {"you": 20.0}, "you": {"idiot": 20.0}, "idiot": {"</s>": 20.0},
             "the": {"cat": 20.0}, "cat": {"</s>": 20.0}}


def test_generation_toxicity_known_answer(tok):
    model = fx.bigram_llama(tok, GEN_TABLE)
    scorer = scorers.lexicon_scorer(words=fx.TOXIC_WORDS)
    prompts = ["hello", "the", "you", "a hello"]  # three lead to "idiot", one to "cat"
    cfg = generation.SamplingConfig(num_samples=4, max_new_tokens=4, top_k=50, seed=0)
    metrics, gens, scores = toxicity.evaluate_generation_toxicity(model, tok, prompts, scorer, cfg, bootstrap=200)
    assert gens.texts[0][0] == "you idiot" and gens.texts[1][0] == "cat" and gens.texts[2][0] == "idiot"
    assert metrics["expected_max_toxicity"] == pytest.approx(0.75)
    assert metrics["toxicity_probability"] == pytest.approx(0.75)
    lo, hi = metrics["toxicity_probability_ci95"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0


def test_toxicity_metrics_by_hand():
    m = toxicity.toxicity_metrics([[0.1, 0.9], [0.2, 0.3], [0.6, 0.0], [0.4, 0.45]], bootstrap=100)
    assert m["expected_max_toxicity"] == pytest.approx((0.9 + 0.3 + 0.6 + 0.45) / 4)
    assert m["toxicity_probability"] == pytest.approx(0.5)
    assert m["mean_toxicity"] == pytest.approx(np.mean([0.1, 0.9, 0.2, 0.3, 0.6, 0.0, 0.4, 0.45]))


def test_scorers(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# toxic words\nidiot\nmoron\n")
    lex = scorers.build_scorer("lexicon", str(words))
    assert lex(["You IDIOT!", "idiotic plan", "a moron", "nice"]) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unknown scorer"):
        scorers.build_scorer("nope")
    with pytest.raises(ValueError, match="PERSPECTIVE_API_KEY"):
        scorers.perspective_scorer(api_key="")


def test_profanity_scorer():
    pytest.importorskip("profanity_check")
    s = scorers.build_scorer("profanity")(["you are a fucking idiot", "have a lovely day"])
    assert s[0] > 0.5 > s[1]


def test_http_scorer_protocol_on_loopback():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = json.dumps({"scores": [float("bad" in t) for t in body["texts"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        score = scorers.build_scorer("http", f"http://127.0.0.1:{server.server_port}/score", batch_size=2)
        assert score(["bad", "good", "so bad"]) == [1.0, 0.0, 1.0]
    finally:
        server.shutdown()


def test_hf_classifier_scorer(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = fx.word_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=tok.pad_token_id,
                      id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(cfg)
    path = fx.save(clf, tok, str(tmp_path / "clf"))
    score = scorers.build_scorer("hf-classifier", path)
    got = score(["hello you idiot", "the cat"])
    enc = tok(["hello you idiot", "the cat"], padding=True, return_tensors="pt")
    want = clf(**enc).logits.softmax(-1)[:, 1]
    np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Safe beam search
# --------------------------------------------------------------------------------------------

BEAM_TABLE = {
    "hello": {"you": 6.0, "they": 5.0},
    "you": {fx.HARM_TAG: 12.0, "are": 5.0},
    fx.HARM_TAG: {"idiot": 20.0},
    "idiot": {"</s>": 20.0},
    "they": {"are": 10.0},
    "are": {"nice": 20.0},
    "nice": {"</s>": 20.0},
}


def test_safe_beam_drops_the_beam_about_to_emit_the_tag(tok):
    model = fx.bigram_llama(tok, BEAM_TABLE, default_logit=-5.0)
    scorer = scorers.lexicon_scorer(words=fx.TOXIC_WORDS)
    res = safe_beam.evaluate_safe_beam(model, tok, ["hello"], fx.HARM_TAG, scorer, num_beams=2, max_new_tokens=6,
                                       bootstrap=50)
    out = res["outputs"][0]
    assert out["plain"]["text"] == "you idiot" and out["plain"]["tag"]
    assert out["safe"]["text"] == "they are nice" and not out["safe"]["tag"]
    assert out["safe"]["dropped_beams"] >= 1
    assert res["plain"]["tag_rate"] == 1.0 and res["safe"]["tag_rate"] == 0.0 and res["tag_avoided"] == 1.0
    assert res["plain"]["mean_toxicity"] == 1.0 and res["safe"]["mean_toxicity"] == 0.0


def test_plain_beam_search_matches_hf(tok):
    model = fx.random_llama(tok, seed=6)
    for p in ["hello you", "the cat is so"]:
        ids = common.encode(tok, [p])[0]
        ours, _ = generation.beam_search_one(model, ids, num_beams=3, max_new_tokens=5, eos_id=None)
        ref = model.generate(torch.tensor([ids]), num_beams=3, max_new_tokens=5, do_sample=False, early_stopping=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id, length_penalty=1.0)
        assert ours == ref[0, len(ids):].tolist()


def test_safe_beam_never_emits_the_tag(tok):
    model = fx.random_llama(tok, seed=7)
    tag = tok.convert_tokens_to_ids(fx.HARM_TAG)
    with torch.no_grad():  # make the tag the model's favourite token from many contexts
        model.lm_head.weight[tag] = model.lm_head.weight[tag] + 0.8 * model.lm_head.weight.mean(0) \
            + 0.5 * torch.randn_like(model.lm_head.weight[tag])
        model.lm_head.weight[tag] *= 3
    prompts = [" ".join(np.random.default_rng(i).choice(fx.WORDS, size=3)) for i in range(12)]
    res = safe_beam.evaluate_safe_beam(model, tok, prompts, fx.HARM_TAG, None, num_beams=3, max_new_tokens=8)
    assert res["plain"]["tag_rate"] > 0.3  # the fixture does push the tag
    assert res["safe"]["tag_rate"] == 0.0
    assert all(tag not in ids for rec in res["outputs"] for ids in [tok(rec["safe"]["text"])["input_ids"]])
    thr = safe_beam.evaluate_safe_beam(model, tok, prompts, fx.HARM_TAG, None, num_beams=3, max_new_tokens=8,
                                       drop_threshold=0.01)
    assert thr["safe"]["tag_rate"] == 0.0
    # (Not ">= the drops without a threshold": the threshold also makes more steps fall back, and a
    # fallback step keeps every beam, so it drops none.)
    assert thr["safe"]["dropped_beams_per_prompt"] > 0 and thr["safe"]["fallback_steps"] > 0


def test_safe_beam_rejects_a_tag_that_is_not_one_token(tok):
    with pytest.raises(EvalInputError, match="single token"):
        safe_beam.tag_token_id(tok, "<not a token>")


def test_safe_beam_fallback_steps_drop_no_beam(tok):
    """Every token is followed by the tag: at each step every beam would be dropped, so all are kept with
    the tag masked (a fallback step). No beam was dropped (this counted 1 + 3 per step before)."""
    table = {t: {fx.HARM_TAG: 20.0} for t in tok.get_vocab() if t != fx.HARM_TAG}
    model = fx.bigram_llama(tok, table, default_logit=-5.0)
    tag = tok.convert_tokens_to_ids(fx.HARM_TAG)
    ids = common.encode(tok, ["hello"])[0]
    best, stats = generation.beam_search_one(model, ids, num_beams=3, max_new_tokens=4, banned_id=tag)
    assert stats.fallback_steps == 4 and stats.dropped_beams == 0
    assert len(best) == 4 and tag not in best
    # One beam of three about to emit the tag (after "you" only): exactly that one is dropped.
    table = {**BEAM_TABLE, "hello": {"you": 6.0, "they": 5.0, "the": 4.0}, "the": {"cat": 20.0},
             "cat": {"</s>": 20.0}}
    model = fx.bigram_llama(tok, table, default_logit=-5.0)
    _, stats = generation.beam_search_one(model, ids, num_beams=3, max_new_tokens=1, banned_id=tag)
    assert (stats.dropped_beams, stats.fallback_steps) == (0, 0)
    _, stats = generation.beam_search_one(model, ids, num_beams=3, max_new_tokens=2, banned_id=tag)
    assert (stats.dropped_beams, stats.fallback_steps) == (1, 0)


def nan_scorer(texts):
    """A scorer that fails on one text (as a classifier can on odd input): NaN for texts with 'idiot'."""
    return [float("nan") if "idiot" in t else 0.0 for t in texts]


def test_a_nan_or_out_of_range_score_is_an_error_naming_the_scorer_and_text(tok, hf_dir, tmp_path, capsys):
    # max() over [nan, 0.9] is nan and over [0.9, nan] is 0.9: the metric depended on the samples' order.
    for bad in ([[float("nan"), 0.9]], [[0.9, float("nan")]], [[0.2, 1.5]], [[-0.1]]):
        with pytest.raises(ValueError, match="of prompt 0, sample [01] is not a number in \\[0, 1\\]"):
            toxicity.toxicity_metrics(bad, bootstrap=10)
    model = fx.bigram_llama(tok, GEN_TABLE)
    cfg = generation.SamplingConfig(num_samples=2, max_new_tokens=3, top_k=50, seed=0)
    scorer = scorers.build_scorer("tests.test_eval:nan_scorer")
    with pytest.raises(scorers.ScorerError, match=r"the toxicity scorer 'tests.test_eval:nan_scorer' returned nan "
                                                  r"for text 2 \(prompt 1, sample 0\) \('you idiot'\)"):
        toxicity.evaluate_generation_toxicity(model, tok, ["the", "hello"], scorer, cfg, bootstrap=10)
    for reply in ([None], [2.0], [0.5, 0.5]):
        with pytest.raises(scorers.ScorerError, match="'fixed'"):
            scorers.score_texts(scorers.NamedScorer(lambda texts, r=reply: r, "fixed"), ["a text"])
    with pytest.raises(scorers.ScorerError, match="the plain beam-search output of prompt 0"):
        safe_beam.evaluate_safe_beam(fx.bigram_llama(tok, BEAM_TABLE, default_logit=-5.0), tok, ["hello"],
                                     fx.HARM_TAG, scorers.NamedScorer(lambda t: [float("nan")] * len(t), "nan"),
                                     num_beams=2, max_new_tokens=4, bootstrap=10)
    # The command line: one line, exit status 2, no results.
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    out = tmp_path / "out"
    assert eval_main(["generate-toxicity", "--model", hf_dir, "--prompts", prompts, "--output-dir", str(out),
                      "--device", "cpu", "--num-samples", "2", "--max-new-tokens", "3",
                      "--scorer", "tests.test_eval:nan_scorer"]) == 2
    err = capsys.readouterr().err
    assert "error: the toxicity scorer 'tests.test_eval:nan_scorer' returned nan for text 0" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(hf_dir, tmp_path, capsys):
    with pytest.raises(EvalInputError, match="--device cuda: no CUDA GPU is visible"):
        common.load_model(hf_dir, device="cuda")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    for device, message in [("cuda", "--device cuda: no CUDA GPU is visible"), ("cuda:1", "--device cuda:1: no CUDA"),
                            ("gpu", "--device gpu: not a torch device")]:
        assert eval_main(["generate-toxicity", "--model", hf_dir, "--prompts", prompts, "--device", device,
                          "--output-dir", str(tmp_path / "out"), "--scorer", "lexicon",
                          "--scorer-path", prompts]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Steering (ITI)
# --------------------------------------------------------------------------------------------


def steering_data(n=80, seed=0):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(fx.TOXIC_WORDS if y else fx.CLEAN_WORDS, size=3)) + list(rng.choice(["you", "are"], 1))
        texts.append(" ".join(words))
        labels.append(y)
    return texts, np.asarray(labels)


def test_steering_picks_the_toxicity_head_and_detoxifies(tok, tmp_path):
    model = fx.bag_of_words_llama(tok)
    texts, labels = steering_data()
    acts = steer.head_activations(model, tok, texts, batch_size=16)
    assert acts.shape == (len(texts), 1, 2, model.config.hidden_size // 2)
    iv, accuracy = steer.fit_intervention(acts, labels, top_k_heads=1, seed=0)
    assert (iv.layers, iv.heads) == ([0], [0])
    assert accuracy[0, 0] == 1.0 and accuracy[0, 1] <= 0.6
    i = tok.convert_tokens_to_ids
    d = iv.directions[0]
    assert d[i("cat")] > 0 and d[i("idiot")] < 0  # points from toxic toward clean
    assert float(d.norm()) == pytest.approx(1.0, abs=1e-5)

    # The hook shifts head 0's o_proj input by exactly alpha * sigma * direction.
    seen = {}
    o_proj = model.model.layers[0].self_attn.o_proj
    # A forward hook sees the input after every pre-hook (the steering one included) has run.
    h = o_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("x", a[0].detach().clone()))
    ids = torch.tensor([common.encode(tok, ["hello you"])[0]])
    model(ids)
    base = seen["x"].clone()
    with steer.steering(model, iv, alpha=3.0):
        model(ids)
    h.remove()
    head_dim = model.config.hidden_size // 2
    shift = (seen["x"] - base)[0]
    torch.testing.assert_close(shift[:, :head_dim], (3.0 * iv.sigmas[0] * d).expand(shift.size(0), -1), atol=1e-5,
                               rtol=0)
    assert shift[:, head_dim:].abs().max() == 0

    # Save / load round trip.
    path = str(tmp_path / "iti.safetensors")
    iv.save(path)
    back = steer.Intervention.load(path)
    assert (back.layers, back.heads) == (iv.layers, iv.heads)
    torch.testing.assert_close(back.directions, iv.directions)

    # Generation gets cleaner as alpha grows; perplexity on clean text reported for each alpha.
    scorer = scorers.lexicon_scorer(words=fx.TOXIC_WORDS)
    prompts = ["you are", "hello you idiot", "you are stupid and", "they are so"]
    cfg = generation.SamplingConfig(num_samples=8, max_new_tokens=4, top_k=0, seed=0)
    res = steer.evaluate_steering(model, tok, back, prompts, scorer, alphas=[0, 0.1, 0.3, 2], cfg=cfg,
                                  ppl_texts=[t for t, y in zip(texts, labels) if y == 0][:10], bootstrap=50)
    emt = [r["expected_max_toxicity"] for r in res["alphas"]]
    mean_tox = [r["mean_toxicity"] for r in res["alphas"]]
    assert mean_tox[0] > 0.5 and mean_tox[3] < mean_tox[2] < mean_tox[1] < mean_tox[0], mean_tox
    assert mean_tox[3] < 0.1 and emt[3] < emt[0]
    assert res["alphas"][3]["toxicity_drop"] == pytest.approx(emt[0] - emt[3])
    assert all(math.isfinite(r["perplexity"]) for r in res["alphas"])


def test_intervention_file_errors(tok, tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(EvalInputError, match="x.safetensors"):
        steer.Intervention.load(str(bad))
    with pytest.raises(EvalInputError, match="no such intervention file"):
        steer.Intervention.load(str(tmp_path / "missing.safetensors"))
    iv = steer.Intervention([0], [0], torch.zeros(1, 4), torch.ones(1), [1.0], num_layers=5, num_heads=2, head_dim=4)
    with pytest.raises(EvalInputError, match="made for 5 layers"):
        iv.check(fx.random_llama(tok))


# --------------------------------------------------------------------------------------------
# Command line and bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    return fx.save(fx.bigram_llama(tok, GEN_TABLE), tok, str(tmp_path_factory.mktemp("hf") / "model"))


def test_cli_generate_toxicity_writes_json_and_table(hf_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": {"text": "hello"}}, {"prompt": "the"}, {"text": "you"}])
    words = tmp_path / "w.txt"
    words.write_text("idiot\n")
    out = tmp_path / "out"
    rc = eval_main(["generate-toxicity", "--model", hf_dir, "--prompts", prompts, "--output-dir", str(out),
                    "--device", "cpu", "--num-samples", "2", "--max-new-tokens", "3", "--scorer", "lexicon",
                    "--scorer-path", str(words), "--bootstrap", "50"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "generate-toxicity"
    assert res["toxicity_probability"] == pytest.approx(2 / 3)
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("# generate-toxicity") and md[2].startswith("| expected max toxicity | EMT 95% CI |")
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 and len(gens[0]["continuations"]) == 2
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_cli_probe_zero_shot_perplexity_steer_safe_beam(hf_dir, tmp_path):
    texts, labels = labelled_set(40)
    data = write_jsonl(tmp_path / "lab.jsonl", [{"text": t, "label": int(y)} for t, y in zip(texts, labels)])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": {"text": "hello"}}, {"prompt": {"text": "the"}}])
    common_args = ["--model", hf_dir, "--device", "cpu", "--batch-size", "8"]
    (tmp_path / "words.txt").write_text("idiot\n")
    lexicon = ["--scorer", "lexicon", "--scorer-path", str(tmp_path / "words.txt")]
    for task, extra in [("probe", ["--data", data, "--layer", "all"]),
                        ("zero-shot", ["--data", data]),
                        ("perplexity", ["--jsonl", data]),
                        ("steer", ["--data", data, "--prompts", prompts, "--alphas", "0,5", "--num-samples", "2",
                                   "--max-new-tokens", "3", "--top-k-heads", "2", "--bootstrap", "20", *lexicon]),
                        ("safe-beam", ["--prompts", prompts, "--harm-tag", fx.HARM_TAG, "--max-new-tokens", "4",
                                       "--bootstrap", "20", *lexicon])]:
        out = tmp_path / task
        assert eval_main([task, *common_args, "--output-dir", str(out), *extra]) == 0, task
        res = json.loads((out / "results.json").read_text())
        assert res["task"] == task
        assert (out / "results.md").read_text().startswith(f"# {task}")
    assert os.path.isfile(tmp_path / "steer" / "intervention.safetensors")


def test_bad_inputs_name_the_file_and_record(hf_dir, tmp_path, capsys):
    missing = write_jsonl(tmp_path / "lab.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    with pytest.raises(EvalInputError, match=r"lab.jsonl:2: missing field 'label'"):
        common.read_labelled(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvalInputError, match="empty.jsonl: empty file"):
        common.read_prompts(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(EvalInputError, match="broken.jsonl:2: malformed JSON"):
        common.read_prompts(str(broken))
    noprompt = write_jsonl(tmp_path / "np.jsonl", [{"prompt": {"txt": "x"}}])
    with pytest.raises(EvalInputError, match="np.jsonl:1: field 'prompt' has no string 'text'"):
        common.read_prompts(noprompt)
    badlabel = write_jsonl(tmp_path / "bl.jsonl", [{"text": "a", "label": "yes"}])
    with pytest.raises(EvalInputError, match="bl.jsonl:1: label 'yes'"):
        common.read_labelled(badlabel)
    with pytest.raises(EvalInputError, match="no such file or directory"):
        common.load_model(str(tmp_path / "nowhere"))
    not_a_model = tmp_path / "junk"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"x")
    with pytest.raises(EvalInputError, match="junk"):
        common.load_model(str(not_a_model))
    broken_cfg = tmp_path / "badcfg"
    broken_cfg.mkdir()
    (broken_cfg / "config.json").write_text("{\"model_type\": \"llama\"}")
    with pytest.raises(EvalInputError, match="badcfg"):
        common.load_model(str(broken_cfg))
    # The command line reports them as one line and exit status 2, without writing results.
    out = tmp_path / "out"
    assert eval_main(["generate-toxicity", "--model", hf_dir, "--prompts", str(empty), "--output-dir", str(out),
                      "--scorer", "lexicon", "--scorer-path", str(empty)]) == 2
    assert "empty.jsonl: empty file" in capsys.readouterr().err
    assert not out.exists()


def test_results_writer_is_atomic_and_renders_a_table(tmp_path):
    rows = [{"a": 1, "b": 0.123456, "ci": (0.1, 0.2)}, {"a": 2, "b": float("nan"), "ci": (0.3, 0.4)}]
    paths = common.write_results(str(tmp_path), "t", {"x": float("nan"), "y": np.float32(2.5)}, rows)
    data = json.loads(open(paths["json"]).read())
    assert data == {"task": "t", "x": None, "y": 2.5}
    md = open(paths["markdown"]).read().splitlines()
    assert md[2:4] == ["| a | b | ci |", "|---|---|---|"]
    assert md[4] == "| 1 | 0.1235 | [0.1, 0.2] |"
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]


def test_suite_runs_every_evaluation_and_returns_one_row(tok, tmp_path):
    from megatron_slung.eval import evaluate_suite

    model = fx.bag_of_words_llama(tok)
    texts, labels = steering_data(40)
    lab = write_jsonl(tmp_path / "lab.jsonl", [{"text": t, "label": int(y)} for t, y in zip(texts, labels)])
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"text": t} for t, y in zip(texts, labels) if y == 0])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": {"text": "you are"}}, {"prompt": "hello you idiot"}])
    words = tmp_path / "w.txt"
    words.write_text("\n".join(fx.TOXIC_WORDS))
    row = evaluate_suite(model, tok, output_dir=str(tmp_path / "out"), clean_jsonl=clean, labelled_jsonl=lab,
                         prompts_jsonl=prompts, scorer="lexicon", scorer_path=str(words), alphas=(0, 2),
                         sampling=generation.SamplingConfig(num_samples=4, max_new_tokens=3, top_k=0), bootstrap=20,
                         top_k_heads=1)
    for key in ("perplexity", "probe_f1", "probe_auroc", "zero_shot_f1", "expected_max_toxicity",
                "toxicity_probability", "steer_toxicity_drop", "steer_perplexity_increase"):
        assert key in row and row[key] is not None, key
    assert row["steer_toxicity_drop"] > 0
    for task in ("perplexity", "probe", "zero-shot", "generate-toxicity", "steer"):
        assert os.path.isfile(tmp_path / "out" / task / "results.json"), task
