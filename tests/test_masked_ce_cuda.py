"""The CUDA masked-CE kernel against the reference (skipped without a GPU or a CUDA build)."""

import pytest
import torch

from megatron_slung import _ext
from megatron_slung.loss import (
    LossPolicy,
    fused_linear_masked_cross_entropy,
    masked_cross_entropy,
    masked_cross_entropy_reference,
)
from megatron_slung.loss.backends import KernelBackend, TorchBackend
from megatron_slung.loss.masked_ce import policy_tables
from tests.loss_cases import NEAR_ONE_POLICY, NON_FINITE_POLICY, near_one, non_finite

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]
needs_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and KernelBackend.available(torch.device("cuda"))),
    reason="megatron_slung._C was built without CUDA",
)
POLICY = LossPolicy.parse("0:ce,1:ce@0.5,2:ignore,3:unlikelihood")
VARIANTS = [0, 1, 2, 3, 4, 5, 6]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(n, v, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    labels[1] = v - 1  # the last column (a tail element when V is odd)
    risk = torch.randint(0, 4, (n,), generator=g).to(torch.uint8)
    return logits.cuda(), labels.cuda(), risk.cuda()


def _kernel(logits, labels, risk, variant, grad_out=True, inplace=False, **kw):
    modes, weights = policy_tables(POLICY, logits.device)
    opts = dict(label_smoothing=0.0, z_loss=0.0, unlikelihood_eps=1e-9) | kw
    return _ext._C.masked_ce_forward(logits, labels, risk, modes, weights, -100, opts["label_smoothing"],
                                     opts["z_loss"], opts["unlikelihood_eps"], grad_out, inplace, variant)


def _reference(logits, labels, risk, **kw):
    x = logits.detach().double().cpu().requires_grad_(True)
    out = masked_cross_entropy_reference(x, labels.cpu(), risk.cpu(), POLICY, return_per_token=True, **kw)
    out.loss_sum.backward()
    return out, x.grad


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(37, 1000), (16, 50257), (6, 131075)], ids=["small", "odd_v", "over_smem"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_matches_reference(dtype, shape, variant):
    logits, labels, risk = _inputs(*shape, dtype)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    torch.cuda.synchronize()
    per_token, ce, kind, grad = _kernel(logits, labels, risk, variant, **kw)
    ref, ref_grad = _reference(logits, labels, risk, **kw)
    tol = TOL[dtype]
    assert _rel(per_token, ref.per_token) < max(tol, 1e-5)
    assert _rel(grad, ref_grad) < tol
    assert torch.all(kind.cpu() == torch.where(labels.cpu() == -100, 0, torch.where(risk.cpu() == 2, 1, 2)))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_rows_and_inplace(dtype):
    logits, labels, risk = _inputs(24, 4099, dtype)  # odd V: every row starts at a different alignment
    ref, ref_grad = _reference(logits, labels, risk)
    _, _, _, g = _kernel(logits, labels, risk, 0)  # vector path with a scalar head and tail per row
    assert _rel(g, ref_grad) < TOL[dtype]
    big = torch.zeros(24, 4101, dtype=dtype, device="cuda")
    big[:, 1:4100] = logits
    view = big[:, 1:4100]  # rows of the logits and of the new gradient buffer are misaligned differently
    _, _, _, g = _kernel(view, labels, risk, 0)  # scalar path
    assert _rel(g, ref_grad) < TOL[dtype]
    inplace = logits.clone()
    _, _, _, g = _kernel(inplace, labels, risk, 0, inplace=True)
    assert g.data_ptr() == inplace.data_ptr() and _rel(inplace, ref_grad) < TOL[dtype]


@needs_kernel
def test_deterministic_bitwise():
    logits, labels, risk = _inputs(512, 32000, torch.bfloat16)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        out = masked_cross_entropy(x, labels, risk, POLICY, label_smoothing=0.1)
        out.loss_sum.backward()
        runs.append((out.loss_sum, out.level_ce_sum, out.level_count, x.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_kernel
def test_public_api_on_cuda_matches_cpu_and_stats():
    logits, labels, risk = _inputs(300, 2003, torch.float32)
    gpu = masked_cross_entropy(logits, labels, risk, POLICY, return_per_token=True, z_loss=1e-3)
    cpu = masked_cross_entropy(logits.cpu(), labels.cpu(), risk.cpu(), POLICY, return_per_token=True, z_loss=1e-3)
    torch.testing.assert_close(gpu.loss_sum.cpu(), cpu.loss_sum, rtol=1e-5, atol=1e-4)
    assert gpu.num_tokens.item() == cpu.num_tokens.item()
    assert torch.equal(gpu.level_count.cpu(), cpu.level_count)
    torch.testing.assert_close(gpu.level_ce_sum.cpu(), cpu.level_ce_sum, rtol=1e-5, atol=1e-3)


@needs_kernel
def test_ignore_only_and_extreme_logits():
    logits, labels, risk = _inputs(64, 999, torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    out = masked_cross_entropy(x, torch.full_like(labels, -100), risk, POLICY)
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0.0 and torch.all(x.grad == 0)
    ext = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 0.0, 1.0]], device="cuda").repeat(8, 1)
    lab = torch.tensor([0, 0], device="cuda").repeat(8)
    rk = torch.tensor([3, 1], dtype=torch.uint8, device="cuda").repeat(8)
    x = ext.clone().requires_grad_(True)
    out = masked_cross_entropy(x, lab, rk, "unlikelihood", z_loss=1e-4, label_smoothing=0.1)
    out.loss_sum.backward()
    ref = masked_cross_entropy_reference(ext.cpu(), lab.cpu(), rk.cpu(), "unlikelihood", z_loss=1e-4,
                                         label_smoothing=0.1)
    assert torch.isfinite(out.loss_sum) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.loss_sum.cpu(), ref.loss_sum, rtol=1e-4, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_building_blocks_match_torch(dtype):
    logits, labels, risk = _inputs(40, 3001, dtype)
    target = torch.where(labels >= 1500, labels - 1500, torch.full_like(labels, -1))
    shard = logits[:, 1500:].contiguous()
    got = KernelBackend.row_stats(shard, target)
    want = TorchBackend.row_stats(shard, target)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    lse = want[0] + torch.log(want[1])
    a, b, c = (torch.rand(40, device="cuda") for _ in range(3))
    a[3] = b[3] = c[3] = 0.0
    tol = TOL[dtype]
    assert _rel(KernelBackend.grad(shard, lse, a, b, c, target), TorchBackend.grad(shard, lse, a, b, c, target)) < tol


@needs_kernel
def test_fused_linear_on_cuda_matches_unfused():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(257, 64, generator=g).cuda().to(torch.bfloat16)
    weight = (torch.randn(5003, 64, generator=g) * 0.2).cuda().to(torch.bfloat16)
    labels = torch.randint(0, 5003, (257,), generator=g).cuda()
    risk = torch.randint(0, 4, (257,), generator=g).to(torch.uint8).cuda()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_masked_cross_entropy(h, w, labels, risk, POLICY, chunk_size=64)
    out.loss_sum.backward()
    h2 = hidden.double().requires_grad_(True)
    w2 = weight.double().requires_grad_(True)
    ref = masked_cross_entropy_reference(h2 @ w2.t(), labels, risk, POLICY)
    ref.loss_sum.backward()
    assert _rel(out.loss_sum, ref.loss_sum) < 1e-3
    assert _rel(h.grad, h2.grad) < 2e-2 and _rel(w.grad, w2.grad) < 2e-2


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_near_p_one_at_every_shift(variant):
    # 1 - p(target) down to 1e-7 in float32 at shifts 0, +-40, 1000: within 1e-3 of float64 (loss and gradient)
    logits, labels, risk = near_one()
    logits, labels, risk = logits.cuda(), labels.cuda(), risk.cuda()
    modes, weights = policy_tables(LossPolicy.parse(NEAR_ONE_POLICY), logits.device)
    per_token, ce, kind, grad = _ext._C.masked_ce_forward(logits, labels, risk, modes, weights, -100, 0.0, 0.0, 1e-9,
                                                          True, False, variant)
    x = logits.double().cpu().requires_grad_(True)
    ref = masked_cross_entropy_reference(x, labels.cpu(), risk.cpu(), NEAR_ONE_POLICY, return_per_token=True)
    ref.loss_sum.backward()
    assert ((per_token.cpu().double() - ref.per_token).abs() / ref.per_token).max() < 1e-3
    grad = grad.cpu().double()
    assert ((grad - x.grad).norm(dim=1) / x.grad.norm(dim=1)).max() < 1e-3
    # the vocab-parallel building blocks: the non-target mass of the kernel and of torch agree
    target = torch.where(labels < 16000, labels, torch.full_like(labels, -1))
    got = KernelBackend.row_stats(logits[:, :16000].contiguous(), target)
    want = TorchBackend.row_stats(logits[:, :16000].contiguous(), target)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_or_plus_inf_makes_the_row_nan(dtype, variant):
    # a thread whose first pack is all NaN used to skip it (finite loss); now every row with a NaN or +inf that
    # carries loss is NaN, rows without loss stay 0, -inf stays legitimate
    logits, labels, risk, bad, carries, names = non_finite(dtype=dtype)
    logits, labels, risk = logits.cuda(), labels.cuda(), risk.cuda()
    modes, weights = policy_tables(LossPolicy.parse(NON_FINITE_POLICY), logits.device)
    per_token, ce, kind, grad = _ext._C.masked_ce_forward(logits, labels, risk, modes, weights, -100, 0.0, 1e-4, 1e-9,
                                                          True, False, variant)
    per_token, grad = per_token.cpu(), grad.cpu()
    ref = masked_cross_entropy_reference(logits.cpu(), labels.cpu(), risk.cpu(), NON_FINITE_POLICY, z_loss=1e-4,
                                         return_per_token=True)
    nan_rows = bad & carries
    assert torch.isnan(per_token[nan_rows]).all() and torch.isnan(grad[nan_rows]).all()
    assert torch.all(per_token[~carries] == 0) and torch.all(grad[~carries] == 0)
    ok = carries & ~bad
    assert torch.isfinite(grad[ok]).all()
    torch.testing.assert_close(per_token[ok].double(), ref.per_token[ok].double(), rtol=1e-2, atol=1e-3)
    # the public API (and its per-level stats) on the same rows
    out = masked_cross_entropy(logits, labels, risk, NON_FINITE_POLICY)
    assert torch.isnan(out.loss_sum) and torch.isnan(out.level_ce_sum[2])
    target = torch.where(labels >= 0, labels, torch.full_like(labels, -1))
    m, s, q, xt, sx = KernelBackend.row_stats(logits, target)  # the TP path flags the row from these
    assert torch.equal(torch.isnan(sx.cpu()) | (m.cpu() == float("inf")), bad)
