"""Activation recomputation with Megatron's flags: the gradients equal those without it, and what is recomputed is
what Megatron recomputes (counted by forward calls: a recomputed module runs twice per step)."""

import pytest
import torch

from megatron_slung.model.gpt import GPTConfig, GPTModel, TransformerLayer, recompute_plan
from megatron_slung.training.arguments import ArgumentError, parse_args
from tests.distributed import run_distributed

MODES = {
    "none": dict(),
    "selective": dict(recompute_granularity="selective"),
    "recompute_activations": dict(recompute_activations=True),  # Megatron: = selective
    "full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_uniform_2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block_1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "full_block_0": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=0),
}


def _config(**overrides):
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                vocab_size=64, max_position_embeddings=16, init_seed=3, hidden_dropout=0.1, attention_dropout=0.1)
    base.update(overrides)
    return GPTConfig(**base)


def _count_calls(model):
    """Per layer: forward calls of the whole layer, of its QKV projection and of its core attention."""
    counts = []
    for layer in model.decoder.layers:
        c = {"layer": 0, "qkv": 0, "core_attention": 0}
        # pre-hooks: torch's recomputation stops once it has what the backward needs (before a layer returns)
        layer.register_forward_pre_hook(lambda *_, c=c: c.__setitem__("layer", c["layer"] + 1))
        layer.self_attention.linear_qkv.register_forward_hook(lambda *_, c=c: c.__setitem__("qkv", c["qkv"] + 1))
        attn = layer.self_attention
        inner = attn.core_attention

        def counted(*a, c=c, inner=inner):
            c["core_attention"] += 1
            return inner(*a)

        attn.core_attention = counted
        counts.append(c)
    return counts


def _step(overrides):
    from megatron_slung.parallel.random import model_parallel_manual_seed

    model_parallel_manual_seed(7, tp_rank=0)  # the same dropout masks in every run
    model = GPTModel(_config(**overrides))
    counts = _count_calls(model)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens).logsumexp(-1).mean().backward()
    return [p.grad.clone() for p in model.parameters()], counts


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_gradients_equal_without_recompute(mode):
    # with dropout on: the recomputed forward must replay the same masks
    reference, _ = _step(MODES["none"])
    grads, _ = _step(MODES[mode])
    for a, b in zip(reference, grads):
        assert torch.equal(a, b), mode


# forward calls per layer (3 layers) of: the layer, its QKV projection, its core attention
EXPECTED_CALLS = {
    "none": ([1, 1, 1], [1, 1, 1], [1, 1, 1]),
    "selective": ([1, 1, 1], [1, 1, 1], [2, 2, 2]),  # only the core attention is recomputed
    "recompute_activations": ([1, 1, 1], [1, 1, 1], [2, 2, 2]),
    "full_uniform_1": ([2, 2, 2], [2, 2, 2], [2, 2, 2]),  # chunks [0], [1], [2]
    "full_uniform_2": ([2, 2, 2], [2, 2, 2], [2, 2, 2]),  # chunks [0, 1], [2]
    "full_block_1": ([2, 1, 1], [2, 1, 1], [2, 1, 1]),  # the first layer only
    "full_block_0": ([1, 1, 1], [1, 1, 1], [1, 1, 1]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_what_is_recomputed(mode):
    _, counts = _step(MODES[mode])
    got = tuple([c[k] for c in counts] for k in ("layer", "qkv", "core_attention"))
    assert got == EXPECTED_CALLS[mode]


def test_uniform_chunks_keep_only_each_chunk_input():
    # uniform with N layers per chunk: one checkpoint per chunk, so fewer saved activations with larger N
    assert recompute_plan(_config(**MODES["full_uniform_2"]), 3) == [(0, 2, True), (2, 3, True)]
    assert recompute_plan(_config(**MODES["full_block_1"]), 3) == [(0, 1, True), (1, 2, False), (2, 3, False)]
    assert recompute_plan(_config(**MODES["selective"]), 3) == [(0, 3, False)]

    def saved_bytes(overrides):
        model = GPTModel(_config(num_layers=4, hidden_dropout=0.0, attention_dropout=0.0, **overrides))
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens).sum()
        return total[0]

    none = saved_bytes({})
    selective = saved_bytes(MODES["selective"])
    block1 = saved_bytes(MODES["full_block_1"])
    uniform1 = saved_bytes(MODES["full_uniform_1"])
    uniform2 = saved_bytes(MODES["full_uniform_2"])
    assert none > selective and none > block1 > uniform1 > uniform2, (none, selective, block1, uniform1, uniform2)


def test_flag_rules_follow_megatron():
    base = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
            "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "64"]
    args = parse_args(base + ["--recompute-activations"], world_size=1)
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("selective", None, None)
    args = parse_args(base + ["--recompute-granularity", "full", "--recompute-method", "block",
                              "--recompute-num-layers", "2"], world_size=1)
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "block", 2)
    refused = [
        (["--recompute-granularity", "full"], "--recompute-method"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform"], "--recompute-num-layers"),
        (["--recompute-granularity", "selective", "--recompute-method", "uniform"], "selective"),
        (["--recompute-method", "block", "--recompute-num-layers", "1"], "needs --recompute-granularity full"),
        (["--recompute-activations", "--recompute-granularity", "full", "--recompute-method", "block",
          "--recompute-num-layers", "1"], "selective"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "0"], ">= 1"),
    ]
    for extra, message in refused:
        with pytest.raises(ArgumentError, match=message):
            parse_args(base + extra, world_size=1)


def _pipeline_calls(rank, world_size):
    from megatron_slung.model.pipeline import GPTPipelineModule
    from megatron_slung.parallel import state

    state.init_deepspeed_comm()
    state.initialize_model_parallel(pipeline_model_parallel_size=2)
    config = _config(num_layers=4, hidden_dropout=0.0, attention_dropout=0.0, **MODES["full_block_1"])
    module = GPTPipelineModule(config)
    module.train()
    calls = {}
    for f in module.forward_funcs:
        if isinstance(f, TransformerLayer):
            calls[f.layer_number] = 0
            f.register_forward_pre_hook(lambda m, *_: calls.__setitem__(m.layer_number, calls[m.layer_number] + 1))
    if state.get_pipeline_model_parallel_rank() == 0:
        x = torch.randint(0, 64, (2, 8))
    else:
        x = torch.randn(8, 2, 32, requires_grad=True)
    module(x).float().sum().backward()
    state.destroy_model_parallel()
    return calls


def test_block_counts_the_first_layers_of_each_pipeline_stage():
    # Megatron's block method: the first N layers *of each stage* (layers 0 and 2 with 4 layers on 2 stages)
    results = run_distributed(_pipeline_calls, world_size=2)
    assert results == [{0: 2, 1: 1}, {2: 2, 3: 1}]
