"""``--async-save`` (Megatron's flag): the training loop stops only while the state is copied to host memory;
a background thread on each rank writes the files, with the atomicity of ``checkpointing.save_checkpoint``.

    the loop, every rank (collective)           each rank's writer thread            then rank 0's thread
    ---------------------------------           -------------------------            --------------------
    wait until the previous save is complete    torch.save every captured object     wait for every rank's
    rank 0 removes .tmp- leftovers              into .tmp-TAG, fsync each file,      .done-rankR marker; fsync,
    DeepSpeed's save_checkpoint, with a         then write .tmp-TAG/.done-rankR      rename .tmp-TAG -> TAG,
      checkpoint engine that copies each        (.failed-rankR with the error if     latest.tmp -> latest, then
      file's object to the CPU instead of       a write fails)                       prune (--keep-last-
      writing it; our RNG / state files too                                          checkpoints ...)

While a save is pending, ``poll()`` after each iteration all-reduces (MAX) [failed, unfinished, tag suffix]
over the ranks: a failure on any rank stops the run on every rank with its message; when every rank is done
the save is reported complete. ``latest`` changes only in ``publish_checkpoint``, after every file of the
checkpoint is on disk, so a process killed at any moment (kill -9 included) leaves ``latest`` naming the
previous complete checkpoint and a ``.tmp-`` directory that nothing loads and the next save removes.

The copy keeps tensors that share memory sharing it (each storage is copied once and its views rebuilt on
the copy), so ``torch.save`` writes the files byte for byte as the synchronous save does. It holds one more
copy of the saved state in host memory until the files are written; a second save first waits for the
first, so there is never more than one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import traceback
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_slung.training import checkpointing as ckpt

DONE_MARKER = ".done-rank{:05d}"
FAILED_MARKER = ".failed-rank{:05d}"


class AsyncSaveError(RuntimeError):
    """A checkpoint's background write failed (on this rank or another)."""


class _WriteError(AsyncSaveError):
    """Writing one file failed (the message names it)."""


class _OtherRankFailed(AsyncSaveError):
    """Rank 0's writer found another rank's failure marker (its text: "rank R: ...")."""


# --------------------------------------------------------------------------- copy to host memory
def snapshot(obj, memo: Optional[dict] = None):
    """A copy of ``obj`` (nested dicts, lists, tuples) whose tensors live in host memory of their own.

    Each tensor storage is copied once and the tensors viewing it are rebuilt on the copy with the same
    offset, shape and strides; an object referenced twice is copied once (as ``copy.deepcopy`` does): later
    updates of the training state do not reach the copy, and ``torch.save`` of the copy writes the same bytes
    as of the original. Other objects are deep-copied. ``memo``: what was copied so far; use one per file
    (the objects it names must stay alive while it is used)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = _copy_tensor(obj, memo)
    elif isinstance(obj, dict):
        out = memo[id(obj)] = copy.copy(obj)  # keeps the type (OrderedDict...) and the key order
        for key, value in obj.items():
            out[key] = snapshot(value, memo)
    elif isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(snapshot(v, memo) for v in obj)
    elif isinstance(obj, tuple):
        items = [snapshot(v, memo) for v in obj]
        out = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    else:
        out = copy.deepcopy(obj, memo)
    memo[id(obj)] = out
    return out


def _copy_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
        return copy.deepcopy(t.detach())
    storages = memo.setdefault("storages", {})
    storage = t.untyped_storage()
    key = storage._cdata  # the storage itself (torch.save shares storages by the same key)
    host = storages.get(key)
    if host is None:
        # .cpu() of a CPU storage returns the storage itself, so CPU storages are cloned
        host = storage.clone() if storage.device.type == "cpu" else storage.cpu()
        storages[key] = host
    out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    elif t.requires_grad:
        out.requires_grad_(True)
    if t.__dict__:  # Python attributes (DeepSpeed sets some on its flat groups): torch.save writes them too
        out.__dict__.update(snapshot(dict(t.__dict__), memo))
    return out


def _capturing_engine(original, sink: list):
    """A DeepSpeed checkpoint engine that records (path, host copy) for each file instead of writing it."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class Capturing(CheckpointEngine):
        def __init__(self):
            super().__init__()
            self.name = "slung-async-capture"

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            sink.append((path, snapshot(state_dict), original.zipfile_serialization))

        def load(self, path, map_location=None):
            raise RuntimeError("the capturing checkpoint engine only saves")

        def commit(self, info):
            return True

        def preserves_storage_sharing(self):  # DeepSpeed then clones what it clones for the synchronous save
            return original.preserves_storage_sharing()

    return Capturing()


def check_engine(engine) -> None:
    """--async-save replaces DeepSpeed's plain torch.save writer; another writer is refused before training."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    found = engine.checkpoint_engine
    if type(found) is not TorchCheckpointEngine:
        from megatron_slung.training.arguments import ArgumentError

        raise ArgumentError(f"--async-save writes DeepSpeed's files itself in the background, in place of its "
                                  f"default TorchCheckpointEngine; this run's DeepSpeed config selects "
                                  f"{type(found).__name__} (remove its `checkpoint` writer / nebula section from "
                                  "--deepspeed-config, or drop --async-save)")


# --------------------------------------------------------------------------- test hooks
def _slow_write_hook() -> None:
    """Test hook: ``SLUNG_CHECKPOINT_SLOW_WRITE=SECONDS`` sleeps before each file the background writes (a
    slow disk), so that a test can act while a background write is under way."""
    seconds = float(os.environ.get("SLUNG_CHECKPOINT_SLOW_WRITE") or 0)
    if seconds > 0:
        time.sleep(seconds)


# --------------------------------------------------------------------------- the saver
class _Pending:
    def __init__(self, save_dir: str, iteration: int, final_tag: str):
        self.save_dir, self.iteration, self.final_tag = save_dir, iteration, final_tag
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None  # "rank R: what failed", one line
        self.suffix = 0  # rank 0: the tag got _1, _2 ... (the iteration was saved before)
        self.deleted: List[str] = []  # rank 0: what pruning removed
        self.started = time.perf_counter()
        self.written_s: Optional[float] = None


class AsyncCheckpointSaver:
    """Saves checkpoints with ``--async-save``; one per run, its methods called by every rank together.

    ``save(...)``: wait for the previous save, copy the state to host memory, start the background write.
    ``poll()``: after each iteration; reports a completed save, raises ``AsyncSaveError`` for a failed one.
    ``finish()``: wait for the pending save (end of training, before exiting early).
    ``finish_after_error()``: in an error path: this rank's writes only, no collective."""

    def __init__(self, engine, *, prune=None, log=print, comm_device=torch.device("cpu"),
                 timeout_s: float = 600.0):
        check_engine(engine)
        self.engine, self.prune, self.log = engine, prune, log
        self.comm_device, self.timeout_s = comm_device, timeout_s
        self.pending: Optional[_Pending] = None
        self.rank = ckpt._rank()
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    # ---- the loop's side
    def save(self, save_dir: str, iteration: int, train_state: dict, args_dict: dict, *, save_optim: bool = True,
             save_rng: bool = True) -> float:
        """Collective. Returns the seconds the loop stopped (waiting for the previous save included)."""
        start = time.perf_counter()
        if self.pending is not None:
            self.log(f"waiting for the background write of checkpoint {self.pending.final_tag} before saving "
                     f"iteration {iteration} (a --save-interval longer than a write avoids this wait)")
            self.finish()
        final_tag = ckpt.checkpoint_tag(iteration)
        tmp_dir = os.path.join(save_dir, ckpt.TMP_PREFIX + final_tag)
        ckpt.prepare_save_dir(save_dir)

        files: List[Tuple[str, object, bool]] = []
        engine = self.engine
        original = engine.checkpoint_engine
        engine.checkpoint_engine = _capturing_engine(original, files)
        try:
            with contextlib.nullcontext() if save_optim else ckpt._without_optimizer_state(engine):
                engine.save_checkpoint(save_dir, tag=ckpt.TMP_PREFIX + final_tag, save_latest=False)
        finally:
            engine.checkpoint_engine = original
        for name, obj in ckpt.trainer_files(self.rank, iteration, train_state, args_dict, save_optim,
                                            save_rng).items():
            files.append((os.path.join(tmp_dir, name), obj if isinstance(obj, str) else snapshot(obj), True))
        os.makedirs(tmp_dir, exist_ok=True)  # DeepSpeed made it where it wrote a file; not on every rank

        pending = _Pending(save_dir, iteration, final_tag)
        pending.thread = threading.Thread(target=self._write, args=(pending, files), name="slung-async-save")
        pending.thread.start()
        self.pending = pending
        return time.perf_counter() - start

    def poll(self, block: bool = False) -> None:
        """Collective while a save is pending (every rank has the same pending save)."""
        pending = self.pending
        if pending is None:
            return
        if block:
            pending.thread.join()
        flags = torch.tensor([float(pending.error is not None), float(pending.thread.is_alive()),
                              float(pending.suffix)], device=self.comm_device)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, unfinished, suffix = (int(v) for v in flags.tolist())
        if failed:
            self.pending = None
            pending.thread.join()  # ends soon: rank 0's once it has read the failing rank's marker
            what = pending.error or "on another rank (see its output)"
            raise AsyncSaveError(f"--async-save: the background write of checkpoint {pending.final_tag} in "
                                 f"{pending.save_dir} failed: {what}; `latest` still names the previous checkpoint")
        if unfinished:
            return
        pending.thread.join()
        self.pending = None
        tag = pending.final_tag + (f"_{suffix}" if suffix else "")
        self.log(f"saved checkpoint {os.path.join(pending.save_dir, tag)} (written in the background in "
                 f"{pending.written_s:.1f} s)")
        if pending.deleted:
            print(f"deleted older checkpoints {', '.join(pending.deleted)} (--save-retain-interval / "
                  "--keep-last-checkpoints)", flush=True)

    def finish(self) -> None:
        """Collective: wait until the pending save is complete (raises if it failed)."""
        self.poll(block=True)

    def finish_after_error(self) -> None:
        """After an error in the loop: let this rank's writer finish (no collective: the other ranks may be
        anywhere). Rank 0's thread publishes the checkpoint if every rank's files arrive."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.thread.is_alive():
            self.log(f"finishing the background write of checkpoint {pending.final_tag} before exiting")
        pending.thread.join()
        if pending.error:
            self.log(f"--async-save: the background write of checkpoint {pending.final_tag} failed: {pending.error}")

    # ---- the writer thread
    def _write(self, pending: _Pending, files: list) -> None:
        tmp_dir = os.path.join(pending.save_dir, ckpt.TMP_PREFIX + pending.final_tag)
        try:
            for path, obj, zipfile in files:
                _slow_write_hook()
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    if isinstance(obj, str):
                        ckpt.write_file(path, obj)
                    else:
                        torch.save(obj, path, _use_new_zipfile_serialization=zipfile)
                    ckpt._fsync_path(path)
                except Exception as e:  # torch's C++ writer fails with a chain of vague errors: the first says most
                    first = e
                    while first.__context__ is not None:
                        first = first.__context__
                    raise _WriteError(f"writing {path}: {type(first).__name__}: {first}") from e
            files.clear()  # free the host copy before waiting for the other ranks
            ckpt.write_text_atomic(os.path.join(tmp_dir, DONE_MARKER.format(self.rank)), "")
            if self.rank == 0:
                self._publish(pending, tmp_dir)
        except BaseException as e:  # reported by poll() on every rank
            files.clear()
            failed_here = not isinstance(e, _OtherRankFailed)
            what = str(e) if isinstance(e, _WriteError) else f"{type(e).__name__}: {e}"
            pending.error = (f"rank {self.rank}: {what}" if failed_here else str(e)).splitlines()[0]
            if not isinstance(e, AsyncSaveError):
                traceback.print_exc()
            if failed_here:  # tell rank 0's writer, which waits for this rank's files
                try:
                    with open(os.path.join(tmp_dir, FAILED_MARKER.format(self.rank)), "w", encoding="utf-8") as f:
                        f.write(pending.error)
                except OSError:
                    pass
        pending.written_s = time.perf_counter() - pending.started

    def _publish(self, pending: _Pending, tmp_dir: str) -> None:
        """Rank 0: once every rank's files are on disk, the rename and `latest` (then pruning)."""
        deadline = time.monotonic() + self.timeout_s
        waiting = set(range(self.world))
        while waiting:
            for r in sorted(waiting):
                failed = os.path.join(tmp_dir, FAILED_MARKER.format(r))
                if os.path.exists(failed):
                    with open(failed, encoding="utf-8") as f:
                        raise _OtherRankFailed(f.read().strip())
                if os.path.exists(os.path.join(tmp_dir, DONE_MARKER.format(r))):
                    waiting.discard(r)
            if waiting:
                if time.monotonic() > deadline:
                    raise AsyncSaveError(f"ranks {sorted(waiting)} did not finish writing within "
                                         f"{self.timeout_s:.0f} s (--distributed-timeout-minutes)")
                time.sleep(0.02)
        for r in range(self.world):
            os.remove(os.path.join(tmp_dir, DONE_MARKER.format(r)))
        tag = ckpt.publish_checkpoint(pending.save_dir, pending.final_tag)
        pending.suffix = int(tag[len(pending.final_tag) + 1:] or 0)
        if self.prune is not None:  # only now that the new checkpoint is complete and `latest` names it
            pending.deleted = self.prune(pending.save_dir, pending.iteration)
