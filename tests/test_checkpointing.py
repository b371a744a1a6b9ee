"""Checkpoint files: atomic saves (a crash at any point leaves `latest` on a complete checkpoint), RNG states,
and loading that never unpickles arbitrary objects."""

import os
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from megatron_slung.training import checkpointing as ckpt

_original_torch_load = torch.load
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeEngine:
    """Stands in for DeepSpeed's engine: writes one model file into save_dir/tag."""

    def __init__(self, value):
        self.value = value

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        assert save_latest is False  # `latest` is ours to write, atomically
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"w": torch.full((3,), float(self.value))}, os.path.join(save_dir, tag, "model.pt"))


def _save(tmp_path, iteration, value=None):
    return ckpt.save_checkpoint(FakeEngine(iteration if value is None else value), str(tmp_path), iteration,
                                {"consumed_train_samples": 8 * iteration}, {"lr": 0.1})


def _model_value(path):
    return float(torch.load(os.path.join(path, "model.pt"), weights_only=True)["w"][0])


def test_save_writes_a_complete_checkpoint_and_latest(tmp_path):
    path = _save(tmp_path, 2)
    assert path == str(tmp_path / "iter_0000002")
    assert ckpt.read_latest(str(tmp_path)) == "iter_0000002"
    assert sorted(os.listdir(path)) == ["args.json", "model.pt", "rng_state_rank00000.pt", "slung_state.pt"]
    state = ckpt.load_train_state(path)
    assert state["iteration"] == 2 and state["consumed_train_samples"] == 16 and state["args"] == {"lr": 0.1}
    assert ckpt.find_checkpoint(str(tmp_path)) == (str(tmp_path), "iter_0000002")
    assert ckpt.find_checkpoint(path) == (str(tmp_path), "iter_0000002")  # a checkpoint directory itself
    assert ckpt.find_checkpoint(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("point", ["after_deepspeed", "before_rename", "before_latest"])
def test_a_crash_anywhere_in_a_save_leaves_latest_on_a_complete_checkpoint(tmp_path, point):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpointing import _save
        import pathlib
        _save(pathlib.Path({str(tmp_path)!r}), 2)
        _save(pathlib.Path({str(tmp_path)!r}), 4)   # crashes half-way
        print("not reached")
    """)
    env = dict(os.environ, SLUNG_CHECKPOINT_CRASH_AT=f"{point}:2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr
    assert "not reached" not in proc.stdout
    # the previous checkpoint is what `latest` names, and it loads
    load_dir, tag = ckpt.find_checkpoint(str(tmp_path))
    assert tag == "iter_0000002"
    assert ckpt.load_train_state(os.path.join(load_dir, tag))["iteration"] == 2
    assert _model_value(os.path.join(load_dir, tag)) == 2.0
    leftovers = set(os.listdir(tmp_path)) - {"iter_0000002", "latest"}
    assert leftovers == ({"iter_0000004"} if point == "before_latest" else {".tmp-iter_0000004"})
    # the next save cleans up and moves `latest` forward
    _save(tmp_path, 4)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000004", "latest"]
    assert ckpt.read_latest(str(tmp_path)) == "iter_0000004" and _model_value(tmp_path / "iter_0000004") == 4.0


def test_saving_an_iteration_again_never_touches_the_checkpoint_latest_names(tmp_path):
    _save(tmp_path, 3, value=1.0)
    path = _save(tmp_path, 3, value=2.0)
    assert path.endswith("iter_0000003_1") and ckpt.read_latest(str(tmp_path)) == "iter_0000003_1"
    assert _model_value(tmp_path / "iter_0000003") == 1.0 and _model_value(path) == 2.0


def test_latest_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "iter_0000009").mkdir()
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        ckpt.find_checkpoint(str(tmp_path))


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt.get_rng_state()
    expected = (random.random(), np.random.randn(3), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


class _Exploit:
    """Unpickling this creates a file: what arbitrary unpickling allows."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_safe_loading_refuses_arbitrary_objects_but_takes_deepspeed_state(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": torch.ones(1), "x": _Exploit(str(marker))}, evil)
    with ckpt.safe_torch_load():
        with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL io.open"):
            torch.load(evil, weights_only=False)  # what DeepSpeed's loader asks for
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # outside the guard the file really is dangerous
    assert marker.exists()

    good = tmp_path / "zero.pt"
    torch.save({"zero_stage": ZeroStageEnum.optimizer_states, "loss_scaler": LossScaler(1.0), "t": torch.ones(2)}, good)
    with ckpt.safe_torch_load():
        out = torch.load(good, weights_only=False)
    assert out["zero_stage"] == ZeroStageEnum.optimizer_states and torch.equal(out["t"], torch.ones(2))
    assert torch.load is _original_torch_load  # restored afterwards
