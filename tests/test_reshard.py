"""Resume at any layout: a checkpoint saved at one (TP, PP, DP, ZeRO stage) continues at another.

Each case trains 6 iterations at the saving layout (a checkpoint at iteration 3), then resumes the iteration-3
checkpoint at the other layout: its losses of iterations 4-6 match the uninterrupted run's within 1e-5 when only
DP / ZeRO change, and within 1e-4 (reduction order) when TP or PP change. Real gloo processes, fp32 (and one
bf16 case).
"""

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
    "zero2_dp2_to_zero3_dp2": (2, ["--zero-stage", "2"], 2, ["--zero-stage", "3"], 1e-5),
    # bf16: DeepSpeed's fp32 copies per parameter at ZeRO 0, its bf16 optimizer at ZeRO 1 (fp32 gradient
    # accumulation there, bf16 at ZeRO 0: the two runs differ by more than fp32 noise)
    "bf16_zero0_to_zero1": (1, ["--bf16"], 1, ["--bf16", "--zero-stage", "1"], 2e-4),
    # --decoupled-lr: a third optimizer group (embedding and output layer) between the other two
    "decoupled_lr_zero0_to_tp2": (1, ["--decoupled-lr", "1e-2"], 2, TP2 + ["--decoupled-lr", "1e-2"], 1e-4),
}

# each case is two runs of about a minute; these four (TP, ZeRO 3 -> 1, bf16, decoupled lr) run without -m slow
FAST = ("1_to_tp2", "zero3_dp2_to_zero1_dp2", "bf16_zero0_to_zero1", "decoupled_lr_zero0_to_tp2")


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=[] if name in FAST else [pytest.mark.slow]) for name in CASES])
def test_a_checkpoint_resumes_at_another_layout(tmp_path, case, capfd):
    save_ws, save_flags, load_ws, load_flags, tol = CASES[case]
    save = tmp_path / "save"
    uninterrupted = _train(save_ws, save_flags + ["--save", save, "--save-interval", "3"])
    resumed = _train(load_ws, load_flags + ["--load", save, "--ckpt-step", "3"])
    out = capfd.readouterr().out
    assert "converting checkpoint" in out and " -> " in out  # said in one line
    _assert_continues(resumed, uninterrupted, tol)


@pytest.mark.slow
def test_the_offline_tool_writes_a_checkpoint_the_new_layout_loads_without_converting(tmp_path, capfd):
    """TP 2 -> tools/reshard_checkpoint.py -> PP 2 at ZeRO 1: DeepSpeed loads it as its own, the run continues."""
    save, out = tmp_path / "save", tmp_path / "out"
    uninterrupted = _train(2, TP2 + ["--save", save, "--save-interval", "3"])
    tool = subprocess.run([sys.executable, "tools/reshard_checkpoint.py", "--load", str(save), "--ckpt-step", "3",
                           "--save", str(out), "--tensor-model-parallel-size", "1",
                           "--pipeline-model-parallel-size", "2", "--zero-stage", "1"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert "TP 2 x PP 1 x DP 1, ZeRO 0 -> TP 1 x PP 2 x DP 1, ZeRO 1" in tool.stdout
    assert (out / "latest").read_text().strip() == "iter_0000003"
    capfd.readouterr()
    resumed = _train(2, PP2 + ["--zero-stage", "1", "--load", out])
    assert "converting checkpoint" not in capfd.readouterr().out  # saved at this layout: loaded as it is
    _assert_continues(resumed, uninterrupted, 1e-4)


def test_the_offline_tool_refuses_a_layout_that_cannot_hold_the_model_before_reading_weights(tmp_path, capsys):
    from megatron_slung.training import checkpointing as ckpt
    from tools import reshard_checkpoint

    # a checkpoint with its records and no weight file at all
    arch = {"version": ckpt.ARCHITECTURE_VERSION, "padded_vocab_size": 256, "tokenizer_vocab_size": 256,
            "make_vocab_size_divisible_by": 128,
            "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                      "ffn_hidden_size": 96, "kv_channels": 16}}
    tag = tmp_path / "save" / "iter_0000003"
    tag.mkdir(parents=True)
    torch_state = {"format_version": ckpt.FORMAT_VERSION, "iteration": 3, "args_json": "{}", "scheduler": {},
                   "model_architecture": arch, "layout": ckpt.layout(1, 1, 1, 0, False)}
    import torch

    torch.save(torch_state, tag / ckpt.STATE_FILE)
    (tmp_path / "save" / "latest").write_text("iter_0000003\n")
    for flags, message in [(["--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "1"],
                            "--tensor-model-parallel-size 4 cannot hold the checkpoint's model: its num-query-groups "
                            "(2) is not divisible by 4"),
                           (["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "3"],
                            "--pipeline-model-parallel-size 3 cannot hold the checkpoint's model: its num-layers (4) "
                            "is not divisible by 3")]:
        rc = reshard_checkpoint.main(["--load", str(tmp_path / "save"), "--save", str(tmp_path / "out")] + flags)
        assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
