import math

import pytest
import torch
import torch.nn.functional as F

from megatron_slung.loss import LossPolicy, masked_cross_entropy_reference
from tests.loss_cases import NEAR_ONE_POLICY, NON_FINITE_POLICY, near_one, non_finite


def _inputs(n=64, v=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    risk = torch.randint(0, 4, (n,), generator=g).to(torch.uint8)
    return logits, labels, risk


def test_all_ce_matches_torch_cross_entropy():
    logits, labels, risk = _inputs()
    out = masked_cross_entropy_reference(logits, labels, risk, "ce", label_smoothing=0.1)
    expected = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum", label_smoothing=0.1)
    assert torch.allclose(out.loss_sum, expected)
    assert out.num_tokens.item() == (labels != -100).sum().item()


def test_masked_levels_carry_no_loss_or_gradient():
    logits, labels, risk = _inputs()
    logits.requires_grad_(True)
    out = masked_cross_entropy_reference(logits, labels, risk, "masked", return_per_token=True)
    out.loss_sum.backward()
    masked = (risk >= 2) | (labels == -100)
    assert torch.all(out.per_token[masked] == 0)
    assert torch.all(logits.grad[masked] == 0)
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    assert out.num_tokens.item() == (~masked).sum().item()


def test_unlikelihood_value_and_level_stats():
    logits, labels, risk = _inputs()
    out = masked_cross_entropy_reference(logits, labels, risk, "unlikelihood", return_per_token=True)
    i = int(((risk == 3) & (labels != -100)).nonzero()[0])
    p = torch.softmax(logits[i], -1)[labels[i]]
    assert out.per_token[i].item() == pytest.approx(-math.log(1 - p.item()))
    # per-level stats hold the plain ce of every level, masked or not
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    for level in range(4):
        sel = (risk == level) & (labels != -100)
        assert out.level_count[level].item() == sel.sum().item()
        assert out.level_ce_sum[level].item() == pytest.approx(ce[sel].sum().item(), rel=1e-5)


def test_gradcheck_every_mode_with_smoothing_and_z_loss():
    logits, labels, risk = _inputs(n=12, v=7)
    logits.requires_grad_(True)
    policy = LossPolicy.parse("0:ce,1:ce@0.5,2:ignore,3:unlikelihood")

    def f(x):
        return masked_cross_entropy_reference(x, labels, risk, policy, label_smoothing=0.2, z_loss=1e-2).loss_sum

    assert torch.autograd.gradcheck(f, (logits,))


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    risk = torch.tensor([3, 1], dtype=torch.uint8)
    out = masked_cross_entropy_reference(logits, labels, risk, "unlikelihood")
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(logits.grad).all()


def test_ignore_only_batch_is_zero_not_nan():
    logits, labels, risk = _inputs(dtype=torch.float32)
    out = masked_cross_entropy_reference(logits, torch.full_like(labels, -100), risk, "ce")
    assert out.loss_sum.item() == 0.0 and out.num_tokens.item() == 0


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda lg, lb, r: (lg[0], lb, r), "logits must be"),
        (lambda lg, lb, r: (lg, lb[:-1], r), "labels must be"),
        (lambda lg, lb, r: (lg, lb, r.long()), "risk must be uint8"),
        (lambda lg, lb, r: (lg, torch.where(lb == -100, lb, lb + 1000), r), "outside the vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, error):
    with pytest.raises((ValueError, TypeError), match=error):
        masked_cross_entropy_reference(*mutate(*_inputs()), "ce")


def _exact_one_minus_p(row, t):
    """1 - p_t of one row with math.fsum over float64 values (no cancellation anywhere)."""
    x = row.double().tolist()
    m = max(x)
    rest = math.fsum(math.exp(v - m) for j, v in enumerate(x) if j != t)
    return rest / (rest + math.exp(x[t] - m))


@pytest.mark.parametrize("shift", [0.0, 40.0, -40.0, 1000.0])
def test_unlikelihood_is_exact_near_p_one_in_float32_input(shift):
    # the reference judges the kernels, so it must itself be exact: float64 inside, log(1 - p) from the
    # non-target mass. (In float32, 1 - p = 1.2e-6 at shift 40 came out as the 1e-9 clamp, 20.72.)
    logits, labels, risk = near_one(v=4000, shifts=(shift,))
    out = masked_cross_entropy_reference(logits, labels, risk, NEAR_ONE_POLICY, return_per_token=True)
    assert out.per_token.dtype == torch.float32
    for i in range(len(labels)):
        omp = _exact_one_minus_p(logits[i], int(labels[i]))
        want = -math.log(omp) if risk[i] == 3 else -math.log1p(-omp)
        assert out.per_token[i].item() == pytest.approx(want, rel=1e-6), (i, omp)


def test_non_finite_rows():
    logits, labels, risk, bad, carries, names = non_finite(v=4200)
    x = logits.clone().requires_grad_(True)
    out = masked_cross_entropy_reference(x, labels, risk, NON_FINITE_POLICY, return_per_token=True)
    out.per_token[~(bad & carries)].sum().backward()
    for i, name in enumerate(names):
        if bad[i] and carries[i]:
            assert torch.isnan(out.per_token[i]), name
        elif carries[i]:
            assert torch.isfinite(out.per_token[i]) and torch.isfinite(x.grad[i]).all(), name
        else:
            assert out.per_token[i] == 0 and torch.all(x.grad[i] == 0), name
    assert torch.isnan(out.loss_sum) and torch.isnan(out.level_ce_sum[2])
