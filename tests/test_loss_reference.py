import math

import pytest
import torch
import torch.nn.functional as F

from megatron_slung.loss import LossPolicy, masked_cross_entropy_reference


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
