"""DeepSpeed pipeline (2 stages, gloo, CPU) against the plain model: loss, gradient norm, one optimizer step."""

import pytest
import torch

from megatron_slung.model.gpt import GPTConfig, GPTModel, tensor_parallel_layout
from megatron_slung.model.pipeline import (
    PipelineLoss,
    loss_scale_for_global_batch,
    masked_cross_entropy_tp,
    pipeline_layer_prefixes,
)
from megatron_slung.parallel.layers import merge_tensor_parallel_shards
from tests.distributed import run_distributed

POLICY = "0:ce,1:ce,2:ignore,3:unlikelihood"
GAS, MICRO, SEQ = 2, 2, 8
CLIP = 0.05
# name -> (config overrides, DeepSpeed "pipeline" section)
NO_PARTITION = {"pipe_partitioned": False, "grad_partitioned": False}
GPT3 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False, add_bias_linear=True)
PP2_CONFIGS = {
    "tied_fused_head": (dict(), NO_PARTITION),
    # the learned positions live on the first stage only; the tied head of the last stage holds the word embeddings
    "gpt3_tied": (GPT3, NO_PARTITION),
    # full recomputation of the first layer of each stage (Megatron's block method, counted per stage)
    "untied_recompute": (dict(untie_embeddings_and_output_weights=True, recompute_granularity="full",
                              recompute_method="block", recompute_num_layers=1), NO_PARTITION),
}
TP2_PP2_CONFIGS = {
    # sequence-parallel activations differ across TP ranks: DeepSpeed must not partition them
    "tied_sp": (dict(sequence_parallel=True), NO_PARTITION),
    "gpt3_tied_sp_qkv_bias_qk_norm": (dict(GPT3, sequence_parallel=True, add_qkv_bias=True, qk_layernorm=True),
                                      NO_PARTITION),
    # replicated activations: DeepSpeed's default partitioning across the TP ranks works
    "untied_partitioned_fused_head": (dict(untie_embeddings_and_output_weights=True), {}),
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


def _pipeline_body(rank, world_size, tp, configs, batches):
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_

    from megatron_slung.model.pipeline import GPTPipelineModule
    from megatron_slung.parallel import state

    state.init_deepspeed_comm()
    state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=2)
    out = {}
    for name, (overrides, pipeline_section) in configs.items():
        module = GPTPipelineModule(_config(**overrides), policy=POLICY, fused_head="fused_head" in name)
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": GAS,
            "steps_per_print": 10**9,
            "gradient_clipping": CLIP,  # DeepSpeed's default is 1.0; small, so that it acts
            "pipeline": pipeline_section,
        }
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        # fp32 engines do not keep the norm they clip with: record what DeepSpeed's clipping computes
        norms = []
        engine.clip_fp32_gradients = lambda: norms.append(
            float(clip_grad_norm_(parameters=module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)))
        module.set_loss_scale(loss_scale_for_global_batch(_num_loss_tokens(batches), GAS, state.get_data_parallel_world_size()))
        loss = engine.train_batch(iter(batches))
        stats = module.loss_fn.pop_stats()
        out[name] = dict(loss=float(loss), norm=norms[0], stats=stats, parts=module.parts,
                         stage=state.get_pipeline_model_parallel_rank(), tp_rank=state.get_tensor_model_parallel_rank(),
                         params={k: v.detach().clone() for k, v in module.model_state_dict().items()})
    state.destroy_model_parallel()
    return out


def _reference_step(cfg, batches, n_tokens):
    """The plain model, one process: loss, gradient norm, weights after one clipped SGD step."""
    model = GPTModel(cfg)
    loss_fn = PipelineLoss(POLICY)
    loss_fn.set_scale(1.0 / n_tokens)  # one process, no accumulation: scale = 1 / N
    total = sum(loss_fn(model(tokens), labels) for tokens, labels in batches)
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    assert norm > 2 * CLIP  # clipping acts: the gradient norm must be the same as DeepSpeed's
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad  # SGD, lr 1
    return total.item(), norm.item(), loss_fn.pop_stats(), model.state_dict()


def _check_against_reference(results, configs, tp):
    batches = _micro_batches()
    n_tokens = _num_loss_tokens(batches)
    for name, (overrides, _) in configs.items():
        cfg = _config(**overrides)
        loss, norm, stats, expected = _reference_step(cfg, batches, n_tokens)
        layout = tensor_parallel_layout(cfg)
        seen = set()
        for stage in (0, 1):
            ranks = [r[name] for r in results if r[name]["stage"] == stage]
            ranks.sort(key=lambda r: r["tp_rank"])
            assert len(ranks) == tp
            for r in ranks:
                # every rank reports the global loss and DeepSpeed's gradient norm counts each parameter once
                assert r["loss"] == pytest.approx(loss, rel=1e-5), name
                assert r["norm"] == pytest.approx(norm, rel=1e-6), name
                assert r["parts"] == [0, 3, 7]  # embedding + 2 layers | 2 layers + norm + head
                if stage == 0:
                    assert r["stats"] is None
                else:
                    assert int(r["stats"]["num_tokens"]) == n_tokens == int(stats["num_tokens"])
                    assert torch.equal(r["stats"]["level_count"], stats["level_count"])
            # updated weights (gradients, scaling and clipping right) match, TP shards merged
            for key in ranks[0]["params"]:
                dim, parts = layout[key]
                shards = [r["params"][key] for r in ranks]
                got = shards[0] if dim is None else merge_tensor_parallel_shards(shards, dim, parts)
                torch.testing.assert_close(got, expected[key], rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")
                seen.add(key)
        assert seen == set(expected)
        if not cfg.untie_embeddings_and_output_weights:  # both stages hold the tied embedding, still equal
            key = "embedding.word_embeddings.weight"
            firsts = {r[name]["tp_rank"]: r[name]["params"][key] for r in results if r[name]["stage"] == 0}
            for r in results:
                if r[name]["stage"] == 1:
                    assert torch.equal(r[name]["params"][key], firsts[r[name]["tp_rank"]])


@pytest.mark.distributed
def test_two_stage_deepspeed_pipeline_matches_the_plain_model():
    results = run_distributed(_pipeline_body, 2, args=(1, PP2_CONFIGS, _micro_batches()))
    _check_against_reference(results, PP2_CONFIGS, tp=1)


@pytest.mark.distributed
def test_tp2_by_pp2_deepspeed_pipeline_matches_the_plain_model():
    results = run_distributed(_pipeline_body, 4, args=(2, TP2_PP2_CONFIGS, _micro_batches()))
    _check_against_reference(results, TP2_PP2_CONFIGS, tp=2)


@pytest.mark.parametrize("variant", [{}, GPT3, dict(GPT3, qk_layernorm=True, add_qkv_bias=False, add_bias_linear=False)],
                         ids=["llama", "gpt3", "layernorm_qk_norm_no_bias"])
@pytest.mark.parametrize("untie", [False, True])
def test_layer_parameter_counts_match_built_layers_and_names_map_to_gpt_model(untie, variant):
    from megatron_slung.model.pipeline import gpt_layer_specs, pipeline_layer_parameter_counts

    cfg = _config(num_layers=2, untie_embeddings_and_output_weights=untie, **variant)
    layers = [spec.build() for spec in gpt_layer_specs(cfg)]
    assert pipeline_layer_parameter_counts(cfg) == [sum(p.numel() for p in m.parameters()) for m in layers]
    # each layer's own state dict, under its prefix, is GPTModel's state dict (same weights too)
    model_sd = GPTModel(cfg).state_dict()
    mapped = {}
    for layer, prefix in zip(layers, pipeline_layer_prefixes(cfg)):
        if prefix is not None:
            mapped.update({prefix + k: v for k, v in layer.state_dict().items()})
    assert set(mapped) == set(model_sd) and all(torch.equal(mapped[k], model_sd[k]) for k in model_sd)


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
