"""The schedules: Megatron's warmup and decay (iterations or samples, WSD), the weight-decay increment,
decoupled learning rates, the batch-size ramp-up; values computed by hand from Megatron's formulas."""

import math

import pytest
import torch

from megatron_slung.training.arguments import ArgumentError, parse_args
from megatron_slung.training.schedules import BatchSizeSchedule, LRScheduler, lr_at, schedule_steps, wd_at


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
        sched.step(1)
    assert sched.num_steps == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25)
    other = LRScheduler(opt, max_lr=1.0, min_lr=0.0, warmup_steps=4, decay_steps=8, decay_style="linear")
    other.load_state_dict(sched.state_dict())
    assert other.num_steps == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown lr decay style"):
        lr_at(1, max_lr=1, min_lr=0, warmup_steps=0, decay_steps=1, decay_style="wsd")


# --------------------------------------------------------------------------- WSD
def test_wsd_stays_at_max_lr_then_anneals_in_each_style():
    # warmup 10, decay 110, anneal the last 40: stable until 70
    def wsd(n, style):
        return lr_at(n, max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, decay_style="WSD",
                     wsd_decay_steps=40, wsd_decay_style=style)

    for style in ("exponential", "linear", "cosine", "minus_sqrt"):
        assert wsd(5, style) == pytest.approx(0.5)  # warmup as usual
        assert wsd(11, style) == 1.0 and wsd(70, style) == 1.0  # stable
        assert wsd(110, style) == pytest.approx(0.1, abs=1e-12) and wsd(111, style) == 0.1
    q = (80 - 70) / 40  # 0.25 of the anneal
    assert wsd(80, "linear") == pytest.approx(0.1 + (1 - q) * 0.9)
    assert wsd(80, "cosine") == pytest.approx(0.1 + 0.5 * (math.cos(math.pi * q) + 1) * 0.9)
    assert wsd(80, "exponential") == pytest.approx(0.1 + (2 * 0.5 ** q - 1) * 0.9)
    assert wsd(80, "minus_sqrt") == pytest.approx(0.1 + (1 - math.sqrt(q)) * 0.9)


def test_warmup_init():
    assert lr_at(0, max_lr=1.0, min_lr=0.0, warmup_steps=10, decay_steps=20, decay_style="linear",
                 init_lr=0.2) == pytest.approx(0.2)
    assert lr_at(5, max_lr=1.0, min_lr=0.0, warmup_steps=10, decay_steps=20, decay_style="linear",
                 init_lr=0.2) == pytest.approx(0.6)


# --------------------------------------------------------------------------- weight decay
def test_weight_decay_increment():
    def wd(n, style):
        return wd_at(n, start_wd=0.0, end_wd=0.1, incr_steps=100, incr_style=style)

    assert wd(0, "linear") == 0.0 and wd(25, "linear") == pytest.approx(0.025) and wd(100, "linear") == pytest.approx(0.1)
    # cosine: start + (1 + cos(pi (1 - r))) / 2 (end - start)
    assert wd(25, "cosine") == pytest.approx(0.5 * (math.cos(math.pi * 0.75) + 1) * 0.1)
    assert wd(0, "cosine") == pytest.approx(0.0, abs=1e-15) and wd(150, "cosine") == 0.1
    assert wd_at(7, start_wd=0.05, end_wd=0.05, incr_steps=100, incr_style="constant") == 0.05


# --------------------------------------------------------------------------- lengths from the flags
BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--lr 1.0 --min-lr 0.1 --mock-data --vocab-size 64").split()


def _args(extra, world_size=1):
    return parse_args(BASE + extra.split(), world_size=world_size)


def test_iteration_flags_count_samples_like_megatron():
    args = _args("--global-batch-size 8 --train-iters 100 --lr-warmup-iters 10 --lr-decay-iters 90")
    assert schedule_steps(args) == {"warmup_steps": 80, "decay_steps": 720, "wsd_decay_steps": None,
                                    "wd_incr_steps": 800}
    # --lr-warmup-fraction is a fraction of the decay samples, not rounded to an iteration (Megatron)
    args = _args("--global-batch-size 8 --train-iters 10 --lr-warmup-fraction 0.15")
    assert schedule_steps(args)["warmup_steps"] == pytest.approx(0.15 * 80)
    sched = LRScheduler.from_args(None, args)
    sched.step(8)  # after update 1 (8 samples): 8 / 12 of the way, where counting whole updates gave 1/1
    assert sched.get_lr() == pytest.approx(8 / 12)


def test_sample_flags():
    args = _args("--global-batch-size 8 --train-samples 1000 --lr-warmup-samples 100 --lr-decay-samples 900 "
                 "--lr-decay-style WSD --lr-wsd-decay-samples 200 --lr-wsd-decay-style linear")
    assert args.train_iters == 125  # 1000 // 8
    assert schedule_steps(args) == {"warmup_steps": 100, "decay_steps": 900, "wsd_decay_steps": 200,
                                    "wd_incr_steps": 1000}
    sched = LRScheduler.from_args(None, args)
    sched.step(800)  # anneal from 700: a half of it done
    assert sched.get_lr() == pytest.approx(0.1 + 0.5 * 0.9)
    args = _args("--global-batch-size 8 --train-samples 1001")
    assert args.train_iters == 125 and args.lr_decay_samples == 1001  # a partial last batch is dropped
    args = _args("--global-batch-size 8 --train-iters 20 --lr-decay-style WSD --lr-wsd-decay-iters 5")
    assert schedule_steps(args)["wsd_decay_steps"] == 40


@pytest.mark.parametrize("extra, message", [
    ("--train-iters 10 --train-samples 80", "give --train-iters or --train-samples"),
    ("", "give --train-iters or --train-samples"),
    ("--train-iters 10 --lr-warmup-samples 8", "--lr-warmup-samples needs sample-based training"),
    ("--train-iters 10 --lr-decay-samples 8", "--lr-decay-samples needs sample-based training"),
    ("--train-iters 10 --rampup-batch-size 2 2 16", "--rampup-batch-size needs sample-based training"),
    ("--train-samples 80 --lr-warmup-iters 2", "--lr-warmup-iters needs iteration-based training"),
    ("--train-samples 80 --lr-decay-iters 2", "--lr-decay-iters needs iteration-based training"),
    ("--train-samples 80 --lr-warmup-samples 8 --lr-warmup-fraction 0.1", "--lr-warmup-samples or --lr-warmup-fraction"),
    ("--train-iters 10 --lr-warmup-iters 2 --lr-warmup-fraction 0.1", "--lr-warmup-iters or --lr-warmup-fraction"),
    ("--train-iters 10 --lr-decay-style WSD", "WSD needs --lr-wsd-decay-iters"),
    ("--train-samples 80 --lr-decay-style WSD --lr-wsd-decay-iters 2", "--lr-wsd-decay-iters needs iteration-based"),
    ("--train-iters 10 --lr-wsd-decay-iters 2", "--lr-wsd-decay-iters has no effect without --lr-decay-style WSD"),
    ("--train-iters 10 --lr-wsd-decay-style linear", "--lr-wsd-decay-style has no effect without"),
    ("--train-iters 10 --lr-decay-style WSD --lr-wsd-decay-iters 11", "longer than the decay"),
    ("--train-iters 10 --decoupled-min-lr 0.1", "--decoupled-min-lr has no effect without --decoupled-lr"),
    ("--train-iters 10 --decoupled-lr 0.01 --decoupled-min-lr 0.1", "--decoupled-lr (0.01) must be >= its minimum"),
    ("--train-iters 10 --start-weight-decay 0.1", "--start-weight-decay needs --weight-decay-incr-style linear"),
    ("--train-iters 10 --weight-decay-incr-style linear --start-weight-decay 0", "needs --start-weight-decay and"),
    ("--train-iters 10 --weight-decay-incr-style cosine --start-weight-decay 0.2 --end-weight-decay 0.1",
     "--start-weight-decay (0.2) <="),
    ("--train-iters 10 --weight-decay-incr-style linear --start-weight-decay 0 --end-weight-decay 0.1 "
     "--weight-decay 0.1", "--weight-decay has no effect with --weight-decay-incr-style linear"),
    ("--train-samples 80 --global-batch-size 8 --micro-batch-size 4 --rampup-batch-size 4 2 16",
     "the global batch 6 of the ramp is not divisible by --micro-batch-size"),
    ("--train-samples 80 --global-batch-size 8 --rampup-batch-size 4 3 16", "must be a non-negative multiple"),
    ("--train-samples 80 --global-batch-size 8 --rampup-batch-size 16 4 16", "must be a non-negative multiple"),
    ("--train-samples 80 --global-batch-size 8 --rampup-batch-size 4 4 0", "each value must be >= 1"),
    ("--train-iters 10 --lr-warmup-init 2", "--lr-warmup-init (2.0) must be in"),
])
def test_schedule_refusals(extra, message):
    with pytest.raises(ArgumentError, match=re_escape(message)):
        _args(extra)


def re_escape(text):
    import re

    return re.escape(text)


# --------------------------------------------------------------------------- ramp-up
def test_rampup_batch_sizes_by_hand():
    # Megatron's example shape: start 4, +4 up to 16 over 60 samples: K = 3 increments of 20 samples each
    ramp = BatchSizeSchedule(16, (4, 4, 60))
    assert [ramp.at(c) for c in (0, 19, 20, 39, 40, 59, 60, 61, 1000)] == [4, 4, 8, 8, 12, 12, 16, 16, 16]
    # batches: 4 x5 (0..20), 8 x3 (20..44), 12 x2 (44..68), then 16
    assert [ramp.at(ramp.samples_after(k)) for k in range(12)] == [4] * 5 + [8] * 3 + [12] * 2 + [16] * 2
    assert ramp.samples_after(10) == 68 and ramp.samples_after(12) == 100
    assert ramp.iterations_for(100) == 12 and ramp.iterations_for(99) == 11 and ramp.iterations_for(67) == 9
    assert ramp.sizes() == [4, 8, 12, 16]
    assert BatchSizeSchedule(8, (8, 4, 100)).at(0) == 8  # no increment: constant
    args = _args("--global-batch-size 16 --train-samples 100 --rampup-batch-size 4 4 60")
    assert args.train_iters == 12


def test_scheduler_weight_decay_and_decoupled_groups():
    p, e, b = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [p], "wd_mult": 1.0}, {"params": [e], "wd_mult": 1.0, "max_lr": 0.5,
                                                                "min_lr": 0.05},
                             {"params": [b], "wd_mult": 0.0}], lr=9.0)
    sched = LRScheduler(opt, max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, decay_style="linear",
                        start_wd=0.0, end_wd=0.2, wd_incr_steps=200, wd_incr_style="linear")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
    sched.step(60)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.5 * 0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05 + 0.5 * 0.45)  # its own ends, the same shape
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.06, 0.06, 0.0])
    sched.step(4)
    assert sched.num_steps == 64


def test_legacy_state_counted_updates():
    sched = LRScheduler(None, max_lr=1.0, min_lr=0.0, warmup_steps=40, decay_steps=80, decay_style="linear")
    sched.load_state_dict({"num_steps": 3}, saved_global_batch_size=8)  # a state from before samples
    assert sched.num_steps == 24
    sched.load_state_dict(sched.state_dict())
    assert sched.num_steps == 24


def test_rampup_in_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rampup-batch-size: [4, 4, 60]\ntrain-samples: 100\nglobal-batch-size: 16\n")
    args = parse_args(BASE + ["--config", str(path)], world_size=1)
    assert args.rampup_batch_size == [4, 4, 60] and args.train_iters == 12
