"""The RNG tracker: forked states, TP-rank seeding, and recomputation replaying dropout exactly."""

import pytest
import torch
import torch.nn.functional as F

from megatron_slung.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    checkpoint,
    get_rng_tracker,
    model_parallel_manual_seed,
)
from tests.distributed import run_distributed


def test_fork_uses_its_own_stream_and_leaves_the_default_one_alone():
    tracker = RNGStatesTracker()
    torch.manual_seed(1)
    tracker.add("a", 99)
    expected_default = torch.rand(4), torch.rand(4)
    torch.manual_seed(1)
    tracker2 = RNGStatesTracker()
    tracker2.add("a", 99)
    first = torch.rand(4)
    with tracker2.fork("a"):
        forked1 = torch.rand(4)
    with tracker2.fork("a"):  # continues where the previous fork stopped
        forked2 = torch.rand(4)
    second = torch.rand(4)
    assert torch.equal(first, expected_default[0]) and torch.equal(second, expected_default[1])
    g = torch.Generator().manual_seed(99)
    assert torch.equal(forked1, torch.rand(4, generator=g)) and torch.equal(forked2, torch.rand(4, generator=g))
    assert not torch.equal(forked1, first)


def test_tracker_errors_and_state_round_trip():
    tracker = RNGStatesTracker()
    tracker.add("a", 5)
    with pytest.raises(ValueError, match="seed 5 is already in use"):
        tracker.add("b", 5)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 6)
    with pytest.raises(KeyError, match="model_parallel_manual_seed"):
        with tracker.fork("missing"):
            pass
    saved = tracker.get_states()
    with tracker.fork("a"):
        x = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), x)


def _dropout_block(x, w):
    h = F.dropout(torch.tanh(x @ w), 0.5, True)  # default generator
    with get_rng_tracker().fork():
        h = F.dropout(h, 0.5, True)  # the tracker's state
    return (h * h).sum(dim=-1)


def test_checkpoint_replays_default_and_tracker_dropout_masks():
    x = torch.randn(6, 8)
    w = torch.randn(8, 8, requires_grad=True)
    grads = []
    for recompute in (False, True):
        model_parallel_manual_seed(7, tp_rank=0)
        w.grad = None
        y = checkpoint(_dropout_block, x, w) if recompute else _dropout_block(x, w)
        y.sum().backward()
        grads.append((y.detach(), w.grad.clone()))
        # after the step, both paths left the generators in the same place
        grads[-1] += (torch.rand(2), get_rng_tracker().get_states()[MODEL_PARALLEL_RNG]["cpu"])
    (y0, g0, r0, t0), (y1, g1, r1, t1) = grads
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert torch.equal(r0, r1) and torch.equal(t0, t1)


def _tp_body(rank, world_size):
    from megatron_slung.model.gpt import GPTConfig, GPTModel
    from megatron_slung.parallel import state

    state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    model_parallel_manual_seed(1234)
    default_mask = F.dropout(torch.ones(64), 0.5, True)
    with get_rng_tracker().fork():
        tp_mask = F.dropout(torch.ones(64), 0.5, True)

    out = {"default": default_mask, "tp": tp_mask}
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for sp in (False, True):
        grads = []
        # no recomputation, selective (the core attention: its forked dropout), full (whole layers: every dropout)
        for recompute in ({}, {"recompute_granularity": "selective"},
                          {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}):
            cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                            vocab_size=64, max_position_embeddings=16, hidden_dropout=0.2, attention_dropout=0.2,
                            sequence_parallel=sp, **recompute)
            model = GPTModel(cfg)
            model_parallel_manual_seed(99)
            logits = model(tokens)
            logits.square().mean().backward()
            grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        out[f"sp{sp}"] = grads
    state.destroy_model_parallel()
    return out


@pytest.mark.distributed
def test_tp_ranks_share_default_dropout_differ_in_forked_dropout_and_recompute_is_exact():
    r0, r1 = run_distributed(_tp_body, 2)
    assert torch.equal(r0["default"], r1["default"])  # replicated activations: same mask
    assert not torch.equal(r0["tp"], r1["tp"])  # split activations: each rank its own mask
    for r in (r0, r1):
        for sp in (False, True):
            (logits_a, grads_a), *recomputed = r[f"sp{sp}"]
            # recomputation replays every dropout mask (default and forked): identical results
            for logits_b, grads_b in recomputed:
                assert torch.equal(logits_a, logits_b)
                for n in grads_a:
                    assert torch.equal(grads_a[n], grads_b[n]), (sp, n)
