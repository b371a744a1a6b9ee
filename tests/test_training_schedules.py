"""The learning-rate schedule: Megatron's warmup and decay, hand-computed values."""

import math

import pytest
import torch

from megatron_slung.training.schedules import LRScheduler, lr_at


def at(n, style, warmup=10, decay=110, max_lr=1.0, min_lr=0.1):
    return lr_at(n, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, decay_steps=decay, decay_style=style)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_linear_warmup_starts_at_zero(style):
    assert at(0, style) == 0.0  # the first update uses lr 0, as in Megatron
    assert at(5, style) == pytest.approx(0.5)
    assert at(10, style) == pytest.approx(1.0)


def test_decay_values():
    # halfway through decay: r = (60 - 10) / (110 - 10) = 0.5
    assert at(60, "linear") == pytest.approx(0.1 + 0.5 * 0.9)
    assert at(60, "cosine") == pytest.approx(0.1 + 0.5 * (math.cos(math.pi * 0.5) + 1) * 0.9)
    assert at(35, "cosine") == pytest.approx(0.1 + 0.5 * (math.cos(math.pi * 0.25) + 1) * 0.9)
    assert at(110, "linear") == pytest.approx(0.1) and at(110, "cosine") == pytest.approx(0.1)
    assert at(500, "linear") == 0.1 and at(500, "cosine") == 0.1  # past decay: min_lr
    assert at(500, "constant") == 1.0
    assert at(40, "inverse-square-root") == pytest.approx(math.sqrt(10) / math.sqrt(40))
    assert at(10**6, "inverse-square-root") == 0.1  # floored at min_lr
    assert at(3, "linear", warmup=0) == pytest.approx(0.1 + (1 - 3 / 110) * 0.9)  # no warmup


def test_cosine_is_monotone_after_warmup():
    values = [at(n, "cosine") for n in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_sets_param_groups_and_resumes():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "lr_mult": 0.5}], lr=123.0)
    sched = LRScheduler(opt, max_lr=1.0, min_lr=0.0, warmup_steps=4, decay_steps=8, decay_style="linear")
    assert opt.param_groups[0]["lr"] == 0.0  # set at construction for update 0
    for _ in range(6):
        sched.step()
    assert sched.num_steps == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25)
    other = LRScheduler(opt, max_lr=1.0, min_lr=0.0, warmup_steps=4, decay_steps=8, decay_style="linear")
    other.load_state_dict(sched.state_dict())
    assert other.num_steps == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown lr decay style"):
        lr_at(1, max_lr=1, min_lr=0, warmup_steps=0, decay_steps=1, decay_style="wsd")
