"""Resume at any layout: a checkpoint saved at one (TP, PP, DP, ZeRO stage) continues at another.

Each case trains 6 iterations at the saving layout (a checkpoint at iteration 3), then resumes the iteration-3
checkpoint at the other layout: its losses of iterations 4-6 match the uninterrupted run's within 1e-5 when only
DP / ZeRO change, and within 1e-4 (reduction order) when TP or PP change. Real gloo processes, fp32.
"""

import os
import subprocess
import sys

import pytest

from tests.distributed import run_distributed
from tests.pretrain_helpers import ROOT, TINY, env, pretrain_body, train_records

pytestmark = pytest.mark.distributed

ITERS = ["--train-iters", "6"]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def _train(world_size, extra):
    records = run_distributed(pretrain_body, world_size, args=(TINY + ITERS + [str(a) for a in extra],))[-1]
    return {r["iteration"]: r for r in train_records(records)}


def _assert_continues(resumed, uninterrupted, tol):
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        got, want = resumed[it], uninterrupted[it]
        assert abs(got["loss"] - want["loss"]) <= tol, (it, got["loss"], want["loss"])
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)  # the LR schedule continues
        assert got["loss_tokens"] == want["loss_tokens"]  # the same data: the position carried over
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=max(tol * 100, 1e-4))


CASES = {
    # id: (saving world size, saving flags, resuming world size, resuming flags, tolerance)
    "tp2xpp2_to_1": (4, TP2 + PP2 + ["--sequence-parallel"], 1, [], 1e-4),
    "1_to_tp2": (1, [], 2, TP2, 1e-4),
    "pp2_to_dp2": (2, PP2, 2, [], 1e-4),
    "zero2_dp2_to_zero0_dp1": (2, ["--zero-stage", "2"], 1, ["--zero-stage", "0"], 1e-5),
    "zero3_dp2_to_zero1_dp2": (2, ["--zero-stage", "3"], 2, ["--zero-stage", "1"], 1e-5),
}


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=[pytest.mark.slow] if name == "tp2xpp2_to_1" else []) for name in CASES])
def test_a_checkpoint_resumes_at_another_layout(tmp_path, case, capfd):
    save_ws, save_flags, load_ws, load_flags, tol = CASES[case]
    save = tmp_path / "save"
    uninterrupted = _train(save_ws, save_flags + ["--save", save, "--save-interval", "3"])
    resumed = _train(load_ws, load_flags + ["--load", save, "--ckpt-step", "3"])
    out = capfd.readouterr().out
    assert "converting checkpoint" in out and " -> " in out  # said in one line
    _assert_continues(resumed, uninterrupted, tol)
