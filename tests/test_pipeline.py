"""DeepSpeed pipeline (2 stages, gloo, CPU) against the plain model: loss, gradient norm, one optimizer step."""

import pytest
import torch

from megatron_slung.model.gpt import GPTConfig, GPTModel
from megatron_slung.model.pipeline import (
    PipelineLoss,
    loss_scale_for_global_batch,
    masked_cross_entropy_tp,
    pipeline_layer_prefixes,
)
from tests.distributed import run_distributed

POLICY = "0:ce,1:ce,2:ignore,3:unlikelihood"
GAS, MICRO, SEQ = 2, 2, 8
CLIP = 0.05
CONFIGS = {
    "tied": dict(),
    "untied_recompute": dict(untie_embeddings_and_output_weights=True, recompute_activations=True),
}


def _config(**overrides):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                vocab_size=64, max_position_embeddings=16, init_seed=11)
    base.update(overrides)
    return GPTConfig(**base)


def _micro_batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(GAS):
        tokens = torch.randint(0, 64, (MICRO, SEQ), generator=g)
        labels = torch.randint(0, 64, (MICRO, SEQ), generator=g)
        risk = torch.randint(0, 4, (MICRO, SEQ), generator=g).to(torch.uint8)
        loss_mask = (torch.rand(MICRO, SEQ, generator=g) > 0.2).float()
        out.append((tokens, (labels, risk, loss_mask)))
    return out


def _num_loss_tokens(batches):
    # what the trainer counts (and all-reduces over DP) before the step: labels kept and not 'ignore'
    n = 0
    for _, (labels, risk, mask) in batches:
        n += int(((mask > 0) & (risk != 2)).sum())
    return n


def _pipeline_body(rank, world_size, batches):
    import deepspeed

    from megatron_slung.model.pipeline import GPTPipelineModule
    from megatron_slung.parallel import state

    state.init_deepspeed_comm()
    state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=world_size)
    out = {}
    for name, overrides in CONFIGS.items():
        module = GPTPipelineModule(_config(**overrides), policy=POLICY)
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": GAS,
            "steps_per_print": 10**9,
            "gradient_clipping": CLIP,  # DeepSpeed's default is 1.0; small, so that it acts
            "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        }
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        # fp32 engines do not keep the norm they clip with: record what DeepSpeed's clipping computes
        from deepspeed.runtime.utils import clip_grad_norm_

        norms = []
        engine.clip_fp32_gradients = lambda: norms.append(
            float(clip_grad_norm_(parameters=module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)))
        module.set_loss_scale(loss_scale_for_global_batch(_num_loss_tokens(batches), GAS, state.get_data_parallel_world_size()))
        loss = engine.train_batch(iter(batches))
        stats = module.loss_fn.pop_stats()
        out[name] = (float(loss), norms[0], stats, {k: v.detach().clone() for k, v in module.model_state_dict().items()},
                     module.parts)
    state.destroy_model_parallel()
    return out


@pytest.mark.distributed
def test_two_stage_deepspeed_pipeline_matches_the_plain_model():
    batches = _micro_batches()
    n_tokens = _num_loss_tokens(batches)
    results = run_distributed(_pipeline_body, 2, args=(batches,))
    for name, overrides in CONFIGS.items():
        cfg = _config(**overrides)
        model = GPTModel(cfg)
        loss_fn = PipelineLoss(POLICY)
        loss_fn.set_scale(1.0 / n_tokens)  # one process, no accumulation: scale = 1 / N
        total = sum(loss_fn(model(tokens), labels) for tokens, labels in batches)
        total.backward()
        expected_stats = loss_fn.pop_stats()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        assert norm > 2 * CLIP  # clipping acts: the gradient norm must be the same as DeepSpeed's
        with torch.no_grad():
            for p in model.parameters():
                p -= p.grad  # SGD, lr 1

        (loss0, norm0, stats0, params0, parts), (loss1, norm1, stats1, params1, _) = results[0][name], results[1][name]
        # every parameter counted once in the gradient norm (norms of later stages, the tied copy)
        assert norm0 == pytest.approx(norm.item(), rel=1e-6) and norm1 == pytest.approx(norm.item(), rel=1e-6)
        # stage 0 holds the embedding and the first layers, stage 1 the rest (+ the head)
        assert parts == [0, 3, 7]
        assert stats0 is None and stats1["num_tokens"] == n_tokens == expected_stats["num_tokens"]
        assert torch.equal(stats1["level_count"], expected_stats["level_count"])
        torch.testing.assert_close(loss0, total.item(), rtol=1e-5, atol=1e-6)  # every stage reports the loss
        torch.testing.assert_close(loss1, total.item(), rtol=1e-5, atol=1e-6)
        # updated weights (= the gradients, scaled right) match, stage by stage
        expected = model.state_dict()
        assert set(params0) | set(params1) == set(expected)
        for params in (params0, params1):
            for k, v in params.items():
                torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
        if name == "tied":  # both stages hold the tied embedding, and they stay equal after the step
            assert torch.equal(params0["embedding.word_embeddings.weight"], params1["embedding.word_embeddings.weight"])


def test_pipeline_layer_prefixes_and_loss_scale():
    cfg = _config(num_layers=2)
    assert pipeline_layer_prefixes(cfg) == ["embedding.", "decoder.layers.0.", "decoder.layers.1.",
                                            "decoder.final_layernorm.", None]
    untied = _config(num_layers=2, untie_embeddings_and_output_weights=True)
    assert pipeline_layer_prefixes(untied)[-1] == "output_layer."
    assert loss_scale_for_global_batch(100, 4, 2) == pytest.approx(0.08)
    assert loss_scale_for_global_batch(0, 4, 2) == 0.0


def test_pipeline_loss_scale_statistics_and_loss_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, requires_grad=True)
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    risk = torch.tensor([[0, 2, 3], [1, 1, 0]], dtype=torch.uint8)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    fn = PipelineLoss(POLICY)
    ref = masked_cross_entropy_tp(logits.reshape(-1, 10), labels.masked_fill(mask == 0, -100).reshape(-1),
                                  risk.reshape(-1), POLICY)
    # unset scale: mean over this micro-batch's loss-carrying tokens
    assert int(ref.num_tokens) == 4
    torch.testing.assert_close(fn(logits, (labels, risk, mask)), ref.loss_sum / 4)
    fn.set_scale(0.5)
    torch.testing.assert_close(fn(logits, (labels, risk, mask)), ref.loss_sum * 0.5)
    stats = fn.pop_stats()
    assert int(stats["num_tokens"]) == 8 and int(stats["level_count"][1]) == 2  # two calls summed; masked label gone
    assert fn.pop_stats() is None
    with pytest.raises(ValueError, match="labels must be"):
        fn(logits, labels)
