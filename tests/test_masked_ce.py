"""masked_cross_entropy (torch building blocks and the C++ kernel) against the plain-torch reference."""

import inspect
import math

import pytest
import torch

from megatron_slung.loss import LossPolicy, masked_cross_entropy, masked_cross_entropy_reference
from megatron_slung.loss.backends import KernelBackend, TorchBackend
from tests.loss_cases import NEAR_ONE_POLICY, NON_FINITE_POLICY, near_one, non_finite

HAVE_CPU_KERNEL = KernelBackend.available(torch.device("cpu"))
IMPLS = ["torch", pytest.param("kernel", marks=pytest.mark.skipif(not HAVE_CPU_KERNEL, reason="no C++ kernel"))]
POLICIES = ["ce", "masked", "unlikelihood", "0:ce,1:ce@0.5,2:ignore,3:unlikelihood@2", "*:ignore,1:unlikelihood"]
OPTIONS = [dict(), dict(label_smoothing=0.15), dict(z_loss=1e-2), dict(label_smoothing=0.2, z_loss=1e-3)]


def _inputs(n=29, v=37, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    risk = torch.randint(0, 4, (n,), generator=g).to(torch.uint8)
    return logits, labels, risk


def _run(fn, logits, labels, risk, policy, upstream=None, **kw):
    """Loss, per-token loss and the gradient of 0.7 * loss_sum + <upstream, per_token>."""
    x = logits.clone().requires_grad_(True)
    out = fn(x, labels, risk, policy, return_per_token=True, **kw)
    objective = 0.7 * out.loss_sum
    if upstream is not None:
        objective = objective + (out.per_token * upstream).sum()
    objective.backward()
    return out, x.grad


def _finite_difference_grad(f, x, eps=1e-6):
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    with torch.no_grad():
        for k in range(flat.numel()):
            old = flat[k].item()
            flat[k] = old + eps
            hi = f(x).item()
            flat[k] = old - eps
            lo = f(x).item()
            flat[k] = old
            gflat[k] = (hi - lo) / (2 * eps)
    return grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing", "z_loss", "both"])
@pytest.mark.parametrize("policy", POLICIES)
def test_float64_matches_reference_values_and_gradients(impl, policy, options):
    logits, labels, risk = _inputs()
    upstream = torch.rand(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours, g_ours = _run(masked_cross_entropy, logits, labels, risk, policy, upstream, impl=impl, **options)
    ref, g_ref = _run(masked_cross_entropy_reference, logits, labels, risk, policy, upstream, **options)
    torch.testing.assert_close(ours.loss_sum, ref.loss_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.per_token, ref.per_token, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    assert ours.num_tokens == ref.num_tokens
    assert torch.equal(ours.level_count, ref.level_count)
    torch.testing.assert_close(ours.level_ce_sum, ref.level_ce_sum, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_matches_finite_differences_in_float64(impl):
    # gradcheck by hand: the backward scales a buffer in place, so it cannot be run twice (as gradcheck does)
    logits, labels, risk = _inputs(n=9, v=6, seed=3)
    labels[4] = -100
    risk[:4] = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    policy = LossPolicy.parse("0:ce,1:ce@0.5,2:ignore,3:unlikelihood")
    for options in OPTIONS:
        def f(x):
            return masked_cross_entropy(x, labels, risk, policy, impl=impl, **options).loss_sum
        _, grad = _run(masked_cross_entropy, logits, labels, risk, policy, impl=impl, **options)
        numeric = _finite_difference_grad(f, logits.clone())
        torch.testing.assert_close(grad, 0.7 * numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_tolerance(impl, dtype):
    logits, labels, risk = _inputs(n=64, v=301, dtype=dtype)
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
    ours, g_ours = _run(masked_cross_entropy, logits, labels, risk, "unlikelihood", impl=impl, **kw)
    ref, g_ref = _run(masked_cross_entropy_reference, logits.double(), labels, risk, "unlikelihood", **kw)
    assert ours.loss_sum.dtype == torch.float32 and g_ours.dtype == dtype
    torch.testing.assert_close(ours.loss_sum.double(), ref.loss_sum, rtol=1e-5, atol=1e-4)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # about one ulp of the dtype
    err = (g_ours.double() - g_ref).abs().max() / g_ref.abs().max()
    assert err < tol, f"relative gradient error {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_only_batch_is_zero_without_nan(impl):
    logits, labels, risk = _inputs(dtype=torch.float32)
    for labels_, policy in [(torch.full_like(labels, -100), "ce"), (labels, "*:ignore")]:
        out, grad = _run(masked_cross_entropy, logits, labels_, risk, policy, impl=impl)
        assert out.loss_sum.item() == 0.0 and out.num_tokens.item() == 0
        assert torch.all(grad == 0) and not torch.isnan(out.per_token).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits_stay_finite(impl):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 0.0, 1.0], [1e4, 1e4, -1e4, 0.0]])
    labels = torch.tensor([0, 0, 1])
    risk = torch.tensor([3, 1, 3], dtype=torch.uint8)
    for options in OPTIONS:
        out, grad = _run(masked_cross_entropy, logits, labels, risk, "unlikelihood", impl=impl, **options)
        ref = masked_cross_entropy_reference(logits, labels, risk, "unlikelihood", **options)
        assert torch.isfinite(out.loss_sum) and torch.isfinite(grad).all()
        torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dimensions_and_int32_labels(impl):
    logits, labels, risk = _inputs(n=24, dtype=torch.float32)
    out3, g3 = _run(masked_cross_entropy, logits.view(4, 6, -1), labels.view(4, 6).int(), risk.view(4, 6), "masked",
                    impl=impl)
    out2, g2 = _run(masked_cross_entropy, logits, labels, risk, "masked", impl=impl)
    assert out3.per_token.shape == (4, 6)
    torch.testing.assert_close(out3.loss_sum, out2.loss_sum)
    torch.testing.assert_close(g3.view_as(g2), g2)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_grad_overwrites_logits_with_the_gradient(impl):
    logits, labels, risk = _inputs(dtype=torch.float32)
    expected, g_expected = _run(masked_cross_entropy, logits, labels, risk, "unlikelihood", impl=impl)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf buffer the loss may take over (mul does not save its output)
    out = masked_cross_entropy(x, labels, risk, "unlikelihood", impl=impl, inplace_grad=True)
    (0.7 * out.loss_sum).backward()
    torch.testing.assert_close(out.loss_sum, expected.loss_sum)
    torch.testing.assert_close(leaf.grad, g_expected)
    # a node that saved the logits for its backward must refuse to run on the overwritten buffer
    y = logits.clone().requires_grad_(True)
    z = torch.tanh(y)  # tanh saves its output
    out = masked_cross_entropy(z, labels, risk, "ce", impl=impl, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss_sum.backward()


def test_scalar_only_path_skips_and_scales():
    logits, labels, risk = _inputs(dtype=torch.float32)
    _, g1 = _run(masked_cross_entropy, logits, labels, risk, "ce")  # gradient 0.7
    x = logits.clone().requires_grad_(True)
    masked_cross_entropy(x, labels, risk, "ce").loss_sum.backward()  # gradient exactly 1: no scaling pass
    torch.testing.assert_close(x.grad * 0.7, g1)


def test_backward_twice_is_a_clear_error():
    logits, labels, risk = _inputs(dtype=torch.float32)
    x = logits.clone().requires_grad_(True)
    out = masked_cross_entropy(x, labels, risk, "ce")
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss_sum.backward()


def test_no_grad_needed():
    logits, labels, risk = _inputs(dtype=torch.float32)
    with torch.no_grad():
        out = masked_cross_entropy(logits, labels, risk, "masked")
    ref = masked_cross_entropy_reference(logits, labels, risk, "masked")
    torch.testing.assert_close(out.loss_sum, ref.loss_sum)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace_grad", [False, True])
def test_no_grad_computes_the_loss_only_and_leaves_the_logits_alone(impl, inplace_grad, monkeypatch):
    """Evaluation runs under no_grad with logits that require grad: no gradient may be computed or kept,
    and inplace_grad must not overwrite the logits (the caller may still read them)."""
    logits, labels, risk = _inputs(dtype=torch.float32)
    expected, _ = _run(masked_cross_entropy, logits, labels, risk, "unlikelihood", impl=impl)
    asked = []
    backend = {"torch": TorchBackend, "kernel": KernelBackend}[impl]
    forward = backend.forward

    def spy(*args, **kw):
        asked.append(inspect.signature(forward).bind(*args, **kw).arguments["compute_grad"])
        return forward(*args, **kw)

    monkeypatch.setattr(backend, "forward", staticmethod(spy))
    x = logits.clone().requires_grad_(True)
    before = x.detach().clone()
    with torch.no_grad():
        out = masked_cross_entropy(x, labels, risk, "unlikelihood", impl=impl, inplace_grad=inplace_grad,
                                   return_per_token=True)
    assert asked == [False]
    assert torch.equal(x.detach(), before)  # bitwise
    assert out.loss_sum.grad_fn is None and out.per_token.grad_fn is None
    assert torch.equal(out.loss_sum, expected.loss_sum) and torch.equal(out.per_token, expected.per_token)
    assert torch.equal(out.num_tokens, expected.num_tokens)
    assert torch.equal(out.level_ce_sum, expected.level_ce_sum)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda lg, lb, r: (lg[0], lb, r), "logits must be"),
        (lambda lg, lb, r: (lg, lb[:-1], r), "leading shape"),
        (lambda lg, lb, r: (lg, lb, r.long()), "risk must be uint8"),
        (lambda lg, lb, r: (lg, lb.float(), r), "labels must be int64 or int32"),
        (lambda lg, lb, r: (lg.long(), lb, r), "floating point"),
        (lambda lg, lb, r: (lg, torch.where(lb == -100, lb, lb + 1000), r), "outside the vocabulary"),
        (lambda lg, lb, r: (lg, torch.where(lb == -100, lb, -lb - 1), r), "outside the vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error(impl, mutate, error):
    with pytest.raises((ValueError, TypeError), match=error):
        masked_cross_entropy(*mutate(*_inputs(dtype=torch.float32)), "ce", impl=impl)


def test_bad_policy_and_options_are_clear_errors():
    logits, labels, risk = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown mode 'forget'"):
        masked_cross_entropy(logits, labels, risk, "3:forget")
    with pytest.raises(ValueError, match="label_smoothing"):
        masked_cross_entropy(logits, labels, risk, "ce", label_smoothing=1.5)
    with pytest.raises(ValueError, match="impl must be"):
        masked_cross_entropy(logits, labels, risk, "ce", impl="fast")


@pytest.mark.skipif(not HAVE_CPU_KERNEL, reason="no C++ kernel")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 2047, 2048, 2049, 4099, 6145])
def test_kernel_odd_sizes_and_chunk_boundaries(dtype, vocab):
    # V not a multiple of the vector width, and rows spanning several 2048-element chunks
    logits, labels, risk = _inputs(n=11, v=vocab, dtype=dtype, seed=vocab)
    labels[2] = vocab - 1
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    ours, g_ours = _run(masked_cross_entropy, logits, labels, risk, "unlikelihood", impl="kernel", **kw)
    ref, g_ref = _run(masked_cross_entropy_reference, logits.double(), labels, risk, "unlikelihood", **kw)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    assert abs(ours.loss_sum.item() - ref.loss_sum.item()) <= max(tol, 1e-5) * max(1.0, abs(ref.loss_sum.item()))
    assert ((g_ours.double() - g_ref).norm() / g_ref.norm().clamp(min=1e-30)).item() < tol


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_logits_such_as_masked_vocab_padding(impl):
    logits, labels, risk = _inputs(n=9, v=5000, dtype=torch.float32)
    logits[:, 2048:4200] = float("-inf")  # a whole chunk and more of the row is -inf
    labels = torch.where((labels >= 2048) & (labels < 4200), labels - 2048, labels)
    ours, g_ours = _run(masked_cross_entropy, logits, labels, risk, "unlikelihood", impl=impl, z_loss=1e-3)
    ref, g_ref = _run(masked_cross_entropy_reference, logits, labels, risk, "unlikelihood", z_loss=1e-3)
    assert torch.isfinite(ours.loss_sum) and torch.isfinite(g_ours).all()
    torch.testing.assert_close(ours.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(g_ours[:, 2048:4200] == 0)


@pytest.mark.skipif(not HAVE_CPU_KERNEL, reason="no C++ kernel")
def test_kernel_results_do_not_depend_on_the_thread_count():
    logits, labels, risk = _inputs(n=64, v=3001, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(masked_cross_entropy, logits, labels, risk, "masked", impl="kernel"))
    finally:
        torch.set_num_threads(threads)
    (a, ga), (b, gb) = results
    assert torch.equal(a.loss_sum, b.loss_sum) and torch.equal(a.level_ce_sum, b.level_ce_sum)
    assert torch.equal(ga, gb)


# ------------------------------------------------------------------------------ p(target) -> 1, NaN and inf
def _rel_err(got, want):
    return ((got.double() - want).abs() / want.abs()).max().item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-4)], ids=["plain", "both"])
def test_exact_near_p_one_at_every_shift(impl, options):
    # 1 - p(target) from 0.1 down to 1e-7 in float32, logits shifted by 0, 40, -40, 1000: within 1e-3 of
    # float64 in the loss (ce and unlikelihood rows) and in the gradient. Before, log(1 - p) came from
    # x_t - lse and was quantised to ulp(lse): at 1 - p = 1.2e-6 and shift 40 the loss was the 1e-9 clamp
    # (20.72, no gradient) instead of 13.63.
    logits, labels, risk = near_one()
    ours, g_ours = _run(masked_cross_entropy, logits, labels, risk, NEAR_ONE_POLICY, impl=impl, **options)
    ref, g_ref = _run(masked_cross_entropy_reference, logits.double(), labels, risk, NEAR_ONE_POLICY, **options)
    assert _rel_err(ours.per_token, ref.per_token) < 1e-3
    rows = torch.arange(len(labels))
    assert _rel_err(g_ours[rows, labels], g_ref[rows, labels]) < 1e-3  # the target's own gradient
    row_err = (g_ours.double() - g_ref).norm(dim=1) / g_ref.norm(dim=1)
    assert row_err.max().item() < 1e-3
    # the plain ce of the counted tokens (per-level stats) is exact too: ce ~ 1 - p here
    torch.testing.assert_close(ours.level_ce_sum.double(), ref.level_ce_sum.double(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_unlikelihood_clamp_only_below_eps(impl):
    logits, labels, risk = near_one(one_minus_p=(3e-9, 3e-10), shifts=(0.0, 40.0))
    ul = risk == 3
    logits, labels, risk = logits[ul], labels[ul], risk[ul]
    ours, g_ours = _run(masked_cross_entropy, logits, labels, risk, NEAR_ONE_POLICY, impl=impl)
    ref, g_ref = _run(masked_cross_entropy_reference, logits.double(), labels, risk, NEAR_ONE_POLICY)
    clamped = torch.tensor([False, True, False, True])  # 3e-9 is above eps = 1e-9, 3e-10 below
    assert torch.equal(ref.per_token == -math.log(1e-9), clamped)
    assert _rel_err(ours.per_token, ref.per_token) < 1e-3
    assert torch.all(g_ours[clamped] == 0) and torch.all(g_ours[~clamped].abs().amax(dim=1) > 0.5)
    assert ((g_ours - g_ref).norm(dim=1) / g_ref.norm(dim=1).clamp(min=1e-30))[~clamped].max() < 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [dict(), dict(z_loss=1e-3)], ids=["plain", "z_loss"])
def test_nan_or_plus_inf_makes_the_row_nan(impl, options):
    # NaN first, inside the second 2048-chunk, last, a whole chunk, at the target; +inf; and -inf (legitimate).
    # Rows that carry loss (ce, unlikelihood) become NaN, loss and gradient; rows that carry none (mode ignore,
    # label == ignore_index) stay 0 with a zero gradient, and an ignore row's plain ce (per-level stats) is NaN.
    # Before, the CPU kernel skipped a chunk of NaN (finite loss, NaN gradient) and a NaN 1 - p went to the
    # unlikelihood clamp (20.72).
    logits, labels, risk, bad, carries, names = non_finite()
    ours, grad = _run(masked_cross_entropy, logits, labels, risk, NON_FINITE_POLICY, impl=impl, **options)
    ref, g_ref = _run(masked_cross_entropy_reference, logits.double(), labels, risk, NON_FINITE_POLICY, **options)
    loss = ours.per_token
    for i, name in enumerate(names):
        if bad[i] and carries[i]:
            assert torch.isnan(loss[i]) and torch.isnan(ref.per_token[i]), name
            assert torch.isnan(grad[i]).all(), name
        elif not carries[i]:
            assert loss[i] == 0 and torch.all(grad[i] == 0), name
        else:
            assert torch.isfinite(loss[i]) and torch.isfinite(grad[i]).all(), name
            torch.testing.assert_close(loss[i].double(), ref.per_token[i], rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(grad[i].double(), g_ref[i], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.isnan(ours.loss_sum)
    assert torch.isnan(ours.level_ce_sum[2]) and torch.isnan(ref.level_ce_sum[2])  # ignore rows with NaN/+inf
    # the same batch without its non-finite rows that carry loss: finite, the ignored ones change nothing
    keep = ~(bad & carries)
    ours, grad = _run(masked_cross_entropy, logits[keep], labels[keep], risk[keep], NON_FINITE_POLICY, impl=impl,
                      **options)
    ref = masked_cross_entropy_reference(logits[keep].double(), labels[keep], risk[keep], NON_FINITE_POLICY, **options)
    assert torch.isfinite(ours.loss_sum) and torch.isfinite(grad).all()
    torch.testing.assert_close(ours.loss_sum.double(), ref.loss_sum, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not HAVE_CPU_KERNEL, reason="no C++ kernel")
def test_kernel_reuses_freed_gradient_buffers_without_stale_values():
    """The CPU kernel keeps freed gradient buffers (>= 1 MB) for the next call instead of faulting in fresh
    pages: a live gradient is never handed out again, and a reused one is overwritten everywhere (rows with
    an ignored label or a masked level too), so nothing of the previous gradient shows through."""
    from megatron_slung import _ext

    _ext._C.masked_ce_empty_cache()
    policy = "0:ce,1:ignore,2:unlikelihood,3:ce@0.5"
    logits, labels, risk = _inputs(n=64, v=5000, dtype=torch.float32)  # 1.3 MB of gradient
    other = torch.randn_like(logits) * 5 + 3
    _, expected = _run(masked_cross_entropy, logits, labels, risk, policy, impl="torch")
    _, g_other_expected = _run(masked_cross_entropy, other, labels, risk, policy, impl="torch")

    _, g_other = _run(masked_cross_entropy, other, labels, risk, policy, impl="kernel")
    _, g_live = _run(masked_cross_entropy, logits, labels, risk, policy, impl="kernel")
    assert g_live.data_ptr() != g_other.data_ptr()
    torch.testing.assert_close(g_other, g_other_expected)
    torch.testing.assert_close(g_live, expected)

    freed = g_other.data_ptr()
    del g_other
    _, g_reused = _run(masked_cross_entropy, logits, labels, risk, policy, impl="kernel")
    assert g_reused.data_ptr() == freed
    torch.testing.assert_close(g_reused, expected)
    assert torch.equal(g_reused, g_live)
    _ext._C.masked_ce_empty_cache()
