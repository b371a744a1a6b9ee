"""Fused linear + masked CE against the unfused path (hidden @ weight.T, then the loss) and the reference."""

import inspect
import math

import pytest
import torch

from megatron_slung.loss import (
    fused_linear_masked_cross_entropy,
    masked_cross_entropy,
    masked_cross_entropy_reference,
)
from megatron_slung.loss.backends import KernelBackend
from megatron_slung.loss import fused_linear
from megatron_slung.loss.fused_linear import default_chunk_size

IMPLS = ["torch", pytest.param("kernel", marks=pytest.mark.skipif(
    not KernelBackend.available(torch.device("cpu")), reason="no C++ kernel"))]
POLICY = "0:ce,1:ce@0.5,2:ignore,3:unlikelihood"


def _inputs(n=45, h=12, v=41, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    risk = torch.randint(0, 4, (n,), generator=g).to(torch.uint8)
    return hidden, weight, labels, risk


def _grads(loss_fn, hidden, weight, labels, risk, scale=0.3, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = loss_fn(h, w, labels, risk, **kw)
    (scale * out.loss_sum).backward()
    return out, h.grad, w.grad


def _fused(h, w, labels, risk, **kw):
    return fused_linear_masked_cross_entropy(h, w, labels, risk, POLICY, **kw)


def _unfused(h, w, labels, risk, impl="torch", chunk_size=None, fp32_weight_grad=True, **kw):
    return masked_cross_entropy(h @ w.t(), labels, risk, POLICY, impl=impl, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 7, 45, 1000, None])
def test_matches_unfused_in_float64(impl, chunk_size):
    hidden, weight, labels, risk = _inputs()
    kw = dict(label_smoothing=0.1, z_loss=1e-3, impl=impl)
    fused, gh, gw = _grads(_fused, hidden, weight, labels, risk, chunk_size=chunk_size, **kw)
    plain, gh_ref, gw_ref = _grads(_unfused, hidden, weight, labels, risk, **kw)
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)
    assert fused.num_tokens == plain.num_tokens
    assert torch.equal(fused.level_count, plain.level_count)
    torch.testing.assert_close(fused.level_ce_sum, plain.level_ce_sum)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(impl, dtype):
    hidden, weight, labels, risk = _inputs(n=64, h=32, v=300, dtype=dtype)
    fused, gh, gw = _grads(_fused, hidden, weight, labels, risk, impl=impl, chunk_size=16)
    ref = masked_cross_entropy_reference
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    (0.3 * ref(h @ w.t(), labels, risk, POLICY).loss_sum).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    assert rel(fused.loss_sum, ref(hidden.double() @ weight.double().t(), labels, risk, POLICY).loss_sum) < tol
    assert rel(gh, h.grad) < tol and rel(gw, w.grad) < tol
    assert gh.dtype == dtype and gw.dtype == dtype


def test_only_one_input_needs_grad_and_leading_dims():
    hidden, weight, labels, risk = _inputs(n=24)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_masked_cross_entropy(hidden.view(4, 6, -1), w, labels.view(4, 6), risk.view(4, 6), POLICY,
                                            return_per_token=True, chunk_size=5)
    out.loss_sum.backward()
    _, _, gw_ref = _grads(_unfused, hidden, weight, labels, risk, scale=1.0)
    torch.testing.assert_close(w.grad, gw_ref)
    assert out.per_token.shape == (4, 6) and not out.per_token.requires_grad


def test_normalised_loss_scales_both_gradients():
    hidden, weight, labels, risk = _inputs()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_masked_cross_entropy(h, w, labels, risk, POLICY, chunk_size=8)
    (out.loss_sum / out.num_tokens).backward()
    _, gh, gw = _grads(_unfused, hidden, weight, labels, risk, scale=1.0 / out.num_tokens.item())
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_gives_zero_loss_and_zero_gradients(impl):
    """N = 0 (e.g. a micro-batch whose tokens all lie elsewhere): zero loss, 0 tokens, zero gradients."""
    hidden, weight, labels, risk = _inputs()
    h = hidden[:0].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_masked_cross_entropy(h, w, labels[:0], risk[:0], POLICY, impl=impl, return_per_token=True)
    (0.5 * out.loss_sum).backward()
    assert out.loss_sum.item() == 0.0 and out.num_tokens.item() == 0 and out.per_token.shape == (0,)
    assert h.grad.shape == (0, hidden.shape[1]) and w.grad.shape == weight.shape
    assert torch.count_nonzero(w.grad) == 0 and int(out.level_count.sum()) == 0
    # the unfused loss on the [0, V] logits agrees (it handles N = 0 in every impl)
    x = (h.detach() @ w.detach().t()).requires_grad_(True)
    ref = masked_cross_entropy(x, labels[:0], risk[:0], POLICY, impl=impl)
    ref.loss_sum.backward()
    assert ref.loss_sum.item() == 0.0 and ref.num_tokens.item() == 0 and x.grad.shape == x.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_computes_the_loss_only(impl, monkeypatch):
    """Evaluation: no_grad, but the weight (and hidden) still require grad. Nothing may compute a gradient."""
    hidden, weight, labels, risk = _inputs(dtype=torch.float32)
    expected, _, _ = _grads(_fused, hidden, weight, labels, risk, impl=impl, chunk_size=8)
    asked = []
    loss_and_grad = fused_linear.loss_and_grad

    def spy(*args, **kw):
        asked.append(inspect.signature(loss_and_grad).bind(*args, **kw).arguments["compute_grad"])
        return loss_and_grad(*args, **kw)

    monkeypatch.setattr(fused_linear, "loss_and_grad", spy)
    monkeypatch.setattr(fused_linear, "_accumulate", lambda *a: pytest.fail("weight gradient accumulated"))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        out = _fused(h, w, labels, risk, impl=impl, chunk_size=8, return_per_token=True)
    assert asked and not any(asked)
    assert out.loss_sum.grad_fn is None
    assert torch.equal(out.loss_sum, expected.loss_sum) and torch.equal(out.num_tokens, expected.num_tokens)
    assert torch.equal(out.level_ce_sum, expected.level_ce_sum)


def test_default_chunk_size_keeps_chunk_logits_near_hidden_size():
    assert default_chunk_size(16384, 128256, 4096) == 512
    assert default_chunk_size(10, 100, 1000) == 10
    assert default_chunk_size(4096, 32000, 128) <= 32


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda h, w, lb, r: (h, w[:, :-1], lb, r), "do not fit"),
        (lambda h, w, lb, r: (h, w.float(), lb, r), "share dtype"),
        (lambda h, w, lb, r: (h, w, lb[:-1], r), "leading shape"),
        (lambda h, w, lb, r: (h, w, torch.where(lb == -100, lb, lb + 100), r), "outside the vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, error):
    with pytest.raises((ValueError, TypeError), match=error):
        fused_linear_masked_cross_entropy(*mutate(*_inputs()), POLICY)


def _near_one_layer(v=32000, shifts=(0.0, 40.0, -40.0, 1000.0), one_minus_p=(1e-3, 1e-5, 1.2e-6, 1e-7)):
    """hidden [N, 3], weight [v, 3] with logits shift + noise_j + gap [j == 7]: 1 - p(7) set per row."""
    g = torch.Generator().manual_seed(0)
    noise = -torch.rand(v, generator=g, dtype=torch.float64)
    rest = math.fsum(math.exp(u) for u in noise.tolist()) - math.exp(noise[7].item())
    weight = torch.stack([torch.ones(v, dtype=torch.float64), torch.zeros(v, dtype=torch.float64), noise], dim=1)
    weight[7, 1] = 1.0
    hidden = [[shift, math.log(rest * (1 - omp) / omp), 1.0] for shift in shifts for omp in one_minus_p]
    hidden = torch.tensor(hidden * 2, dtype=torch.float64)  # every row twice: once ce, once unlikelihood
    n = hidden.shape[0]
    risk = torch.tensor([0] * (n // 2) + [3] * (n // 2), dtype=torch.uint8)
    return hidden.float(), weight.float(), torch.full((n,), 7), risk


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_near_p_one_at_every_shift(impl):
    # the fused path uses the same building blocks: 1 - p down to 1e-7 within 1e-3 of float64 at every shift
    hidden, weight, labels, risk = _near_one_layer()
    h = hidden.clone().requires_grad_(True)
    out = fused_linear_masked_cross_entropy(h, weight, labels, risk, "unlikelihood", impl=impl, chunk_size=5,
                                            return_per_token=True)
    out.loss_sum.backward()
    h64 = hidden.double().requires_grad_(True)
    ref = masked_cross_entropy_reference(h64 @ weight.double().t(), labels, risk, "unlikelihood", return_per_token=True)
    ref.loss_sum.backward()
    assert ((out.per_token.double() - ref.per_token).abs() / ref.per_token).max() < 1e-3
    assert ((h.grad.double() - h64.grad).norm(dim=1) / h64.grad.norm(dim=1)).max() < 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_hidden_rows_make_their_loss_nan(impl):
    # a NaN or +inf hidden state gives a row of NaN logits (every chunk of it): NaN loss, not the clamp or a
    # finite ce; the other rows keep their values
    hidden, weight, labels, risk = _inputs(n=12, h=6, v=5000, dtype=torch.float32)
    labels[:] = 3
    risk[:] = torch.tensor([0, 3, 2, 0, 3, 2, 0, 3, 2, 0, 3, 2], dtype=torch.uint8)
    hidden[0, 2] = hidden[1, 0] = hidden[2, 1] = float("nan")
    hidden[3, 4] = hidden[4, 5] = float("inf")
    h = hidden.clone().requires_grad_(True)
    out = fused_linear_masked_cross_entropy(h, weight, labels, risk, POLICY, impl=impl, chunk_size=4,
                                            return_per_token=True)
    out.loss_sum.backward()
    assert torch.isnan(out.per_token[[0, 1, 3, 4]]).all() and torch.isnan(out.loss_sum)
    assert out.per_token[2] == 0  # mode ignore: no loss, even on a NaN row
    ref = masked_cross_entropy_reference(hidden[5:].double() @ weight.double().t(), labels[5:], risk[5:], POLICY,
                                         return_per_token=True)
    torch.testing.assert_close(out.per_token[5:].double(), ref.per_token, rtol=1e-5, atol=1e-5)
    assert torch.isnan(h.grad[[0, 1, 3, 4]]).all() and torch.all(h.grad[2] == 0)
    assert torch.isfinite(h.grad[5:]).all()
    # NaN weights for one 2048-column chunk of the vocabulary: every row has a chunk of NaN logits, which the
    # CPU kernel's online softmax used to skip (finite loss)
    weight[2048:4096] = float("nan")
    out = fused_linear_masked_cross_entropy(hidden[5:], weight, labels[5:], risk[5:], POLICY, impl=impl,
                                            chunk_size=4, return_per_token=True)
    carries = risk[5:] != 2
    assert torch.isnan(out.per_token[carries]).all() and torch.all(out.per_token[~carries] == 0)
