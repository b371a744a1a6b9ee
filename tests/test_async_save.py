"""--async-save with the real trainer: the checkpoint is the synchronous one (DeepSpeed's files byte for byte) and
the resumed run continues exactly (DP=2, gloo); a process killed during the background write leaves `latest`
on the previous complete checkpoint, which loads; a second save waits for the first and pruning follows the
write; a failed write on one rank fails the run on every rank with a message."""

import collections
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_slung.training import checkpointing as ckpt
from megatron_slung.training.arguments import ArgumentError, parse_args
from megatron_slung.training.async_save import snapshot
from tests.distributed import free_port, run_distributed
from tests.pretrain_helpers import ROOT, TINY, env, pretrain_body, read_jsonl, run_cli, train_records

OURS = {"args.json", "slung_state.pt"}  # they record the flags, --async-save among them


def _files(path) -> dict:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):  # DeepSpeed's loss scaler: no __eq__
        return type(a) is type(b) and _equal(vars(a), vars(b))
    return a == b


def _assert_same_checkpoint(sync_dir, async_dir, *, byte_for_byte=True):
    """DeepSpeed's files and the RNG states byte for byte (or their tensors and values equal); our state equal
    but for the flags."""
    a, b = _files(sync_dir), _files(async_dir)
    assert sorted(a) == sorted(b)
    for name in sorted(set(a) - OURS):
        if byte_for_byte:
            assert a[name] == b[name], name
        else:
            assert _equal(torch.load(os.path.join(sync_dir, name), weights_only=False),
                          torch.load(os.path.join(async_dir, name), weights_only=False)), name
    sa, sb = ckpt.load_train_state(sync_dir), ckpt.load_train_state(async_dir)
    assert sb["args"].pop("async_save") is True and sa["args"].pop("async_save") is False
    for key in sa["args"]:
        if key not in ("save", "load", "exit_interval"):
            assert sa["args"][key] == sb["args"][key], key
    for key in set(sa) - {"args"}:
        assert sa[key] == sb[key], key


def _entries(save_dir) -> list:
    return sorted(n for n in os.listdir(save_dir) if not n.endswith(".py"))


# --------------------------------------------------------------------------- the copy to host memory
def test_the_host_copy_writes_the_same_bytes_and_does_not_follow_the_training_state(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    betas = (0.9, 0.999)
    state = collections.OrderedDict(
        a=flat[2:6], b=flat[6:].view(2, 3), t=flat[::2],  # views of one storage: written once
        p=torch.nn.Parameter(torch.ones(3)), n=7, groups=[{"betas": betas}, {"betas": betas}],  # one tuple
        nested={"x": (torch.zeros(2, dtype=torch.bfloat16), "s")}, tagged=torch.ones(2))
    state["tagged"].ds_id = 3  # an attribute on a tensor (DeepSpeed's flat groups have one): pickled too
    copied = snapshot(state)
    for name, obj in (("original", state), ("copy", copied)):  # the same file name: it is in the archive
        (tmp_path / name).mkdir()
        torch.save(obj, tmp_path / name / "state.pt")
    assert (tmp_path / "original" / "state.pt").read_bytes() == (tmp_path / "copy" / "state.pt").read_bytes()
    flat.add_(100.0)  # the training state moves on; the copy does not
    state["p"].data.zero_()
    assert copied["a"].tolist() == [2.0, 3.0, 4.0, 5.0] and copied["p"].tolist() == [1.0, 1.0, 1.0]
    assert copied["a"].untyped_storage().data_ptr() == copied["b"].untyped_storage().data_ptr()


def test_async_save_needs_save():
    base = TINY + ["--train-iters", "2"]
    with pytest.raises(ArgumentError, match="--async-save needs --save DIR"):
        parse_args(base + ["--async-save"], world_size=1)
    assert parse_args(base + ["--async-save", "--save", "x"], world_size=1).async_save


# --------------------------------------------------------------------------- the real trainer
@pytest.mark.slow
def test_async_checkpoint_equals_the_synchronous_one_and_the_resume_is_exact_dp2(tmp_path):
    """ZeRO-1 on two gloo ranks. The async run stops at iteration 3 (--exit-interval): its save of 3 waits for
    the background write of 2, and is itself complete before the processes exit."""
    common = TINY + ["--train-iters", "4", "--save-interval", "2", "--zero-stage", "1", "--hidden-dropout", "0.1"]
    ref = run_distributed(pretrain_body, 2, args=(common + ["--save", str(tmp_path / "sync")],))[1]
    run_distributed(pretrain_body, 2, args=(common + ["--save", str(tmp_path / "async"), "--async-save",
                                                      "--exit-interval", "3"],))
    assert _entries(tmp_path / "async") == ["iter_0000002", "iter_0000003", "latest"]
    assert ckpt.read_latest(str(tmp_path / "async")) == "iter_0000003"
    _assert_same_checkpoint(tmp_path / "sync" / "iter_0000002", tmp_path / "async" / "iter_0000002")

    resumed = run_distributed(pretrain_body, 2, args=(common + ["--load", str(tmp_path / "async"), "--save",
                                                                str(tmp_path / "async"), "--async-save"],))[1]
    assert [r["iteration"] for r in train_records(resumed)] == [4]
    assert train_records(resumed)[0]["loss"] == train_records(ref)[3]["loss"]  # exactly (dropout on: RNG restored)
    # a resumed process pickles some RNG state objects differently (not the same Python objects): compare values
    _assert_same_checkpoint(tmp_path / "sync" / "iter_0000004", tmp_path / "async" / "iter_0000004",
                            byte_for_byte=False)


ONE = TINY + ["--save-interval", "1", "--async-save"]


def _start(args, extra_env=None, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_slung.pretrain"] + [str(a) for a in args], cwd=ROOT,
                            env=env(**(extra_env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=preexec_fn)


@pytest.mark.parametrize("how", ["kill -9", "before_latest:2"])
def test_a_process_killed_during_the_background_write_leaves_latest_on_the_previous_checkpoint(tmp_path, how):
    """kill -9 while the writer sleeps before the first file of iteration 2's checkpoint (a slow disk), or a
    crash (exit 17) in rank 0's writer thread between its rename and `latest`."""
    save = tmp_path / "ckpt"
    args = ONE + ["--train-iters", "3", "--save", save]
    if how == "kill -9":
        proc = _start(args, {"SLUNG_CHECKPOINT_SLOW_WRITE": "1"})
        lines = []
        for line in proc.stdout:  # the loop has moved on from the save of iteration 2: its write is under way
            lines.append(line)
            if line.startswith("checkpoint of iteration 2: training stopped"):
                proc.send_signal(signal.SIGKILL)
                break
        code = proc.wait(timeout=300)
        assert code == -signal.SIGKILL, "".join(lines)[-3000:]
        assert any("saved checkpoint" in x and "iter_0000001" in x for x in lines)
    else:
        proc = run_cli(args, extra_env={"SLUNG_CHECKPOINT_CRASH_AT": how})
        assert proc.returncode == 17, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ckpt.read_latest(str(save)) == "iter_0000001"
    left = {"before_latest:2": "iter_0000002"}.get(how, ".tmp-iter_0000002")
    assert _entries(save) == sorted(["iter_0000001", "latest", left])

    proc = run_cli(ONE + ["--train-iters", "2", "--load", save, "--save", save])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"loaded checkpoint {save}/iter_0000001 at iteration 1" in proc.stdout
    assert ckpt.read_latest(str(save)) == "iter_0000002"
    assert _entries(save) == ["iter_0000001", "iter_0000002", "latest"]  # the leftover is gone


def test_a_second_save_waits_for_the_first_and_pruning_follows_the_write(tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli(ONE + ["--train-iters", "3", "--save", save, "--keep-last-checkpoints", "2"],
                   extra_env={"SLUNG_CHECKPOINT_SLOW_WRITE": "0.3"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout

    def at(text):
        assert text in out, text
        return out.index(text)

    for it in (2, 3):
        prev = f"iter_{it - 1:07d}"
        assert (at(f"waiting for the background write of checkpoint {prev} before saving iteration {it}")
                < at(f"saved checkpoint {save}/{prev} (written in the background")
                < at(f"checkpoint of iteration {it}: training stopped"))
    # the last save is complete before the run ends; the oldest is deleted only once it is
    assert (at(f"saved checkpoint {save}/iter_0000003 (written in the background")
            < at("deleted older checkpoints iter_0000001") < at("done: iteration 3"))
    assert _entries(save) == ["iter_0000002", "iter_0000003", "latest"]
    assert ckpt.read_latest(str(save)) == "iter_0000003"


def _limit_file_size():
    limit = 200_000  # smaller than this rank's optimizer shard: writing it fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_failed_background_write_on_one_rank_fails_the_run_on_every_rank(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = TINY + ["--train-iters", "8", "--save-interval", "2", "--zero-stage", "1", "--async-save", "--save", save,
                   "--metrics-jsonl", metrics]
    port = free_port()
    procs = []
    for rank in range(2):
        extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                     WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(_start(args, extra, preexec_fn=_limit_file_size if rank == 1 else None))
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [4, 4], "\n".join(o[-3000:] for o in outs)
    for out in outs:
        assert ("error: --async-save: the background write of checkpoint iter_0000002 in "
                f"{save} failed: rank 1: writing {save}/.tmp-iter_0000002/zero_pp_rank_1_mp_rank_00_optim_states.pt: ") in out
        assert "`latest` still names the previous checkpoint" in out
    assert ckpt.read_latest(str(save)) is None and not os.path.exists(save / "iter_0000002")
    assert max(r["iteration"] for r in train_records(read_jsonl(metrics))) < 8  # stopped, not at the end
