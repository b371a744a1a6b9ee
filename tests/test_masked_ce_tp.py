"""Vocab-parallel masked CE on real gloo processes (tp = 2 and 4) against tp = 1 and the reference."""

import pytest
import torch
import torch.distributed as dist

from megatron_slung.loss import (
    fused_linear_masked_cross_entropy,
    masked_cross_entropy,
    masked_cross_entropy_reference,
)
from megatron_slung.loss.backends import KernelBackend
from tests.distributed import run_distributed
from tests.loss_cases import NEAR_ONE_POLICY, NON_FINITE_POLICY, near_one, non_finite

POLICY = "0:ce,1:ce@0.5,2:ignore,3:unlikelihood"
CASES = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(label_smoothing=0.2, z_loss=1e-2),
]
IMPLS = ["torch"] + (["kernel"] if KernelBackend.available(torch.device("cpu")) else [])


def _inputs(n=37, v=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::6] = -100
    risk = torch.randint(0, 4, (n,), generator=g).to(torch.uint8)
    token_weights = torch.rand(n, generator=g)  # an arbitrary upstream gradient for per_token
    return logits, labels, risk, token_weights


def _loss_and_grad(logits, labels, risk, token_weights, impl, group=None, **kw):
    x = logits.clone().requires_grad_(True)
    out = masked_cross_entropy(x, labels, risk, POLICY, return_per_token=True, tp_group=group, impl=impl, **kw)
    (0.37 * out.loss_sum + (out.per_token * token_weights).sum()).backward()
    return dict(loss_sum=out.loss_sum.detach(), per_token=out.per_token.detach(), num_tokens=out.num_tokens,
                level_count=out.level_count, level_ce_sum=out.level_ce_sum, grad=x.grad)


def _fused_linear(hidden, weight, labels, risk, impl, group=None, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_masked_cross_entropy(h, w, labels, risk, POLICY, tp_group=group, impl=impl, chunk_size=10,
                                            **kw)
    (0.37 * out.loss_sum).backward()
    return dict(loss_sum=out.loss_sum.detach(), grad_hidden=h.grad, grad_weight=w.grad)


def _tp_body(rank, world_size, logits, labels, risk, token_weights, hidden, weight):
    group = dist.new_group(list(range(world_size)))
    shard = logits.shape[1] // world_size
    local = logits[:, rank * shard:(rank + 1) * shard].contiguous()
    local_weight = weight[rank * shard:(rank + 1) * shard].contiguous()
    results = {}
    for impl in IMPLS:
        for i, kw in enumerate(CASES):
            results[impl, i] = _loss_and_grad(local, labels, risk, token_weights, impl, group, **kw)
        results[impl, "fused_linear"] = _fused_linear(hidden, local_weight, labels, risk, impl, group, **CASES[-1])
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_tp1_in_values_and_gradients(tp):
    logits, labels, risk, token_weights = _inputs()
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(logits.shape[0], 8, generator=g)
    weight = torch.randn(logits.shape[1], 8, generator=g)
    per_rank = run_distributed(_tp_body, world_size=tp, args=(logits, labels, risk, token_weights, hidden, weight))
    shard = logits.shape[1] // tp
    for impl in IMPLS:
        for i, kw in enumerate(CASES):
            single = _loss_and_grad(logits, labels, risk, token_weights, impl, **kw)
            ref = masked_cross_entropy_reference(logits, labels, risk, POLICY, return_per_token=True, **kw)
            ranks = [r[impl, i] for r in per_rank]
            for r in ranks[1:]:  # every rank returns the very same values
                for key in ("loss_sum", "per_token", "num_tokens", "level_count", "level_ce_sum"):
                    assert torch.equal(r[key], ranks[0][key]), (impl, kw, key)
            got = ranks[0]
            msg = f"impl={impl} options={kw}"
            torch.testing.assert_close(got["loss_sum"], single["loss_sum"], rtol=1e-5, atol=1e-5, msg=msg)
            torch.testing.assert_close(got["loss_sum"], ref.loss_sum, rtol=1e-5, atol=1e-5, msg=msg)
            torch.testing.assert_close(got["per_token"], single["per_token"], rtol=1e-5, atol=1e-5, msg=msg)
            assert got["num_tokens"] == single["num_tokens"] == ref.num_tokens
            assert torch.equal(got["level_count"], ref.level_count)
            torch.testing.assert_close(got["level_ce_sum"], ref.level_ce_sum, rtol=1e-5, atol=1e-4, msg=msg)
            grad = torch.cat([r["grad"] for r in ranks], dim=1)
            assert grad.shape == logits.shape
            torch.testing.assert_close(grad, single["grad"], rtol=1e-5, atol=1e-6, msg=msg)
            # each rank's gradient is exactly its own columns
            for rank, r in enumerate(ranks):
                assert r["grad"].shape == (logits.shape[0], shard)
        # fused linear, vocab-parallel: full hidden gradient on every rank, weight gradient by shard
        single = _fused_linear(hidden, weight, labels, risk, impl, **CASES[-1])
        ranks = [r[impl, "fused_linear"] for r in per_rank]
        for r in ranks:
            torch.testing.assert_close(r["loss_sum"], single["loss_sum"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["grad_hidden"], single["grad_hidden"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r["grad_weight"] for r in ranks]), single["grad_weight"],
                                   rtol=1e-5, atol=1e-5)


def _label_smoothing_needs_the_global_mean(rank, world_size, logits, labels, risk):
    group = dist.new_group(list(range(world_size)))
    shard = logits.shape[1] // world_size
    local = logits[:, rank * shard:(rank + 1) * shard].contiguous()
    return masked_cross_entropy(local, labels, risk, "ce", label_smoothing=0.3, tp_group=group, impl="torch").loss_sum


@pytest.mark.distributed
def test_label_smoothing_is_exact_at_tp2_even_when_shards_differ():
    # shards with very different means: a per-shard mean (Megatron's approach) would be far off
    logits, labels, risk, _ = _inputs(n=16, v=32)
    logits[:, 16:] += 25.0
    got = run_distributed(_label_smoothing_needs_the_global_mean, world_size=2, args=(logits, labels, risk))
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum", label_smoothing=0.3)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], expected, rtol=1e-5, atol=1e-4)


def _near_one_and_non_finite_body(rank, world_size, logits, labels, risk, policy):
    group = dist.new_group(list(range(world_size)))
    shard = logits.shape[1] // world_size
    local = logits[:, rank * shard:(rank + 1) * shard].contiguous()
    results = {}
    for impl in IMPLS:
        x = local.clone().requires_grad_(True)
        out = masked_cross_entropy(x, labels, risk, policy, return_per_token=True, tp_group=group, impl=impl)
        out.per_token.nan_to_num(0.0).sum().backward()
        results[impl] = dict(per_token=out.per_token.detach(), level_ce_sum=out.level_ce_sum, grad=x.grad)
    return results


@pytest.mark.distributed
def test_vocab_parallel_exact_near_p_one():
    # the non-target mass is one more row of the all-reduce: 1 - p within 1e-3 of float64 down to 1e-7, at every
    # shift, with the target on either rank. (Before: 1 - p from x_t - lse, the 1e-9 clamp at 1.2e-6, shift 40.)
    logits, labels, risk = near_one(v=8000)
    per_rank = run_distributed(_near_one_and_non_finite_body, world_size=2,
                               args=(logits, labels, risk, NEAR_ONE_POLICY))
    assert {int(t) // 4000 for t in labels} == {0, 1}
    x = logits.double().requires_grad_(True)
    ref = masked_cross_entropy_reference(x, labels, risk, NEAR_ONE_POLICY, return_per_token=True)
    ref.per_token.sum().backward()
    for impl in IMPLS:
        got = per_rank[0][impl]
        assert torch.equal(got["per_token"], per_rank[1][impl]["per_token"])
        assert ((got["per_token"].double() - ref.per_token).abs() / ref.per_token).max() < 1e-3, impl
        grad = torch.cat([r[impl]["grad"] for r in per_rank], dim=1).double()
        assert ((grad - x.grad).norm(dim=1) / x.grad.norm(dim=1)).max() < 1e-3, impl


@pytest.mark.distributed
def test_vocab_parallel_non_finite_rows():
    # NaN / +inf in either shard makes the row NaN on both ranks; -inf is fine, even a whole shard of it
    # (masked vocabulary padding: the torch path gave NaN there, exp(-inf - -inf)).
    logits, labels, risk, bad, carries, names = non_finite(v=8192)
    padded = torch.randn(4, logits.shape[1], generator=torch.Generator().manual_seed(1))
    padded[:, 4096:] = float("-inf")  # rank 1's whole shard
    logits = torch.cat([logits, padded])
    labels = torch.cat([labels, torch.tensor([5, 4000, 77, -100])])
    risk = torch.cat([risk, torch.tensor([0, 3, 2, 0], dtype=torch.uint8)])
    bad = torch.cat([bad, torch.zeros(4, dtype=torch.bool)])
    carries = torch.cat([carries, torch.tensor([True, True, False, False])])
    per_rank = run_distributed(_near_one_and_non_finite_body, world_size=2,
                               args=(logits, labels, risk, NON_FINITE_POLICY))
    x = logits.double().requires_grad_(True)
    ref = masked_cross_entropy_reference(x, labels, risk, NON_FINITE_POLICY, return_per_token=True)
    ref.per_token.nan_to_num(0.0).sum().backward()
    nan_rows = bad & carries
    for impl in IMPLS:
        for r in per_rank:
            loss, grad = r[impl]["per_token"], r[impl]["grad"]
            assert torch.isnan(loss[nan_rows]).all(), impl
            assert torch.isfinite(loss[~nan_rows]).all(), impl
            torch.testing.assert_close(loss[~nan_rows].double(), ref.per_token[~nan_rows], rtol=1e-5, atol=1e-5)
            assert torch.isnan(grad[nan_rows]).all() and torch.isfinite(grad[~nan_rows]).all(), impl
            assert torch.all(grad[~carries] == 0), impl
            assert torch.isnan(r[impl]["level_ce_sum"][2]), impl
        grad = torch.cat([r[impl]["grad"] for r in per_rank], dim=1).double()
        torch.testing.assert_close(grad[~nan_rows], x.grad[~nan_rows], rtol=1e-5, atol=1e-6)
