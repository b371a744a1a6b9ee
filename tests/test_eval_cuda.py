"""The evaluations on a CUDA GPU agree with the CPU (skipped without a GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("sklearn")

from megatron_slung.eval import generation, perplexity, probe, safe_beam, steer  # noqa: E402
from megatron_slung.eval.__main__ import main as eval_main  # noqa: E402
from tests import eval_fixtures as fx  # noqa: E402
from tests.test_eval import BEAM_TABLE, GEN_TABLE, labelled_set, steering_data  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return fx.word_tokenizer()


def test_sampling_and_beams_on_gpu_match_cpu(tok):
    cfg = generation.SamplingConfig(num_samples=3, max_new_tokens=5, top_k=10, seed=3, stop_at_eos=False)
    prompts = ["hello you", "the cat is so", "a"]
    bigram = fx.bigram_llama(tok, GEN_TABLE)
    cpu = generation.sample(bigram, tok, prompts, cfg, batch_size=4)
    gpu = generation.sample(bigram.cuda(), tok, prompts, cfg, batch_size=4)
    assert cpu.token_ids == gpu.token_ids
    rand = fx.random_llama(tok, seed=5)
    cpu = generation.sample(rand, tok, prompts, cfg, batch_size=2)
    gpu = generation.sample(rand.cuda(), tok, prompts, cfg, batch_size=9)
    same = np.mean([a == b for pa, pb in zip(cpu.token_ids, gpu.token_ids) for a, b in zip(pa, pb)])
    assert same >= 0.8  # float differences may flip a rare draw, nothing more
    model = fx.bigram_llama(tok, BEAM_TABLE, default_logit=-5.0).cuda()
    res = safe_beam.evaluate_safe_beam(model, tok, ["hello"], fx.HARM_TAG, None, num_beams=2, max_new_tokens=6)
    assert res["outputs"][0]["plain"]["text"] == "you idiot" and res["outputs"][0]["safe"]["text"] == "they are nice"


def test_features_and_perplexity_on_gpu_match_cpu(tok, tmp_path):
    model = fx.random_llama(tok, seed=6)
    texts, labels = labelled_set(40)
    cpu = probe.last_token_hidden_states(model, tok, texts, layers=[1, 2])
    docs = steer.documents_from_texts(tok, texts)
    nll_cpu, _ = perplexity.token_nll(model, docs)
    model.cuda()
    gpu = probe.last_token_hidden_states(model, tok, texts, layers=[1, 2])
    for layer in (1, 2):
        np.testing.assert_allclose(gpu[layer], cpu[layer], atol=1e-4)
    nll_gpu, _ = perplexity.token_nll(model, docs)
    np.testing.assert_allclose(nll_gpu, nll_cpu, atol=1e-4)
    model.to(torch.bfloat16)
    nll_bf16, _ = perplexity.token_nll(model, docs)
    assert abs(nll_bf16.mean() - nll_cpu.mean()) < 0.05 * nll_cpu.mean()


def test_steering_on_gpu(tok):
    model = fx.bag_of_words_llama(tok).cuda()
    texts, labels = steering_data()
    iv, _ = steer.fit_intervention(steer.head_activations(model, tok, texts), labels, top_k_heads=1)
    assert (iv.layers, iv.heads) == ([0], [0])
    from megatron_slung.data import scorers

    res = steer.evaluate_steering(model, tok, iv, ["you are", "hello you idiot"], scorers.lexicon_scorer(words=fx.TOXIC_WORDS),
                                  alphas=[0, 2], cfg=generation.SamplingConfig(num_samples=8, max_new_tokens=4, top_k=0),
                                  bootstrap=20)
    assert res["alphas"][1]["mean_toxicity"] < res["alphas"][0]["mean_toxicity"]


def test_cli_on_gpu_in_bf16(tok, tmp_path):
    path = fx.save(fx.random_llama(tok, seed=7), tok, str(tmp_path / "m"))
    texts, labels = labelled_set(20)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts, labels)))
    out = tmp_path / "out"
    assert eval_main(["zero-shot", "--model", path, "--data", str(data), "--device", "cuda", "--dtype", "bfloat16",
                      "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["num_examples"] == 20
