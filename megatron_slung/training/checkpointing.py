"""Checkpoints: DeepSpeed's files plus the trainer's own state, written atomically, loaded without unpickling.

Layout of ``--save DIR``:

    DIR/latest                          the tag of the newest complete checkpoint (one line)
    DIR/iter_0000100/                   one checkpoint: DeepSpeed's files (mp_rank_XX_model_states.pt,
                                        ZeRO shards, pipeline layer_XX files) and ours:
        slung_state.pt                  iteration, consumed samples, LR-schedule step count, arguments (JSON)
        rng_state_rank00003.pt          python / numpy / torch / CUDA and model-parallel tracker RNG states
        args.json                       the arguments, for people
    DIR/.tmp-iter_0000100/              a save in progress (never loaded; removed by the next save)

Atomicity. Every rank writes into ``.tmp-TAG``; after a barrier rank 0 flushes every file to disk (fsync),
renames the directory to ``TAG`` (one atomic rename), then replaces ``latest`` by writing ``latest.tmp`` and
renaming it over ``latest`` (atomic too), fsyncing the directory after each rename. A crash at any point
leaves ``latest`` naming a complete checkpoint: before the first rename nothing visible changed; between the
two renames the new directory exists but ``latest`` still names the previous one. If ``TAG`` already exists
(the same iteration saved twice) and ``latest`` names it, the new one gets ``TAG_1`` (``_2``...) instead, so
the checkpoint ``latest`` names is never touched. Needs a file system all ranks share (as Megatron does).

Loading never unpickles arbitrary objects. Our files are read with ``torch.load(weights_only=True)``.
DeepSpeed reads its own files with ``torch.load(weights_only=False)`` (``TorchCheckpointEngine.load`` and a
few direct calls), which would run any pickled code; while it loads, ``safe_torch_load`` makes every
``torch.load`` call use ``weights_only=True`` with an allow-list of the few DeepSpeed classes its checkpoints
hold (``SAFE_DEEPSPEED_GLOBALS``: enums and a loss-scaler). A file holding anything else fails to load with
torch's ``UnpicklingError`` naming the offending global.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "slung_state.pt"
ARGS_FILE = "args.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- safe loading
def _deepspeed_safe_globals() -> list:
    """DeepSpeed classes that appear in its checkpoints (enums, loss scalers): plain data, safe to rebuild."""
    found = []
    candidates = [
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaleConfig"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaleProfile"),
        ("deepspeed.runtime.zero.offload_config", "OffloadDeviceEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ]
    import importlib

    for module_name, name in candidates:
        try:
            found.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            pass
    return found


SAFE_DEEPSPEED_GLOBALS = None  # filled on first use (importing DeepSpeed is slow)


@contextlib.contextmanager
def safe_torch_load():
    """Within the block every ``torch.load`` uses ``weights_only=True`` (DeepSpeed's allow-listed classes only)."""
    global SAFE_DEEPSPEED_GLOBALS
    if SAFE_DEEPSPEED_GLOBALS is None:
        SAFE_DEEPSPEED_GLOBALS = _deepspeed_safe_globals()
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(SAFE_DEEPSPEED_GLOBALS):
            yield
    finally:
        torch.load = original


# --------------------------------------------------------------------------- RNG states
def get_rng_state() -> dict:
    """Every RNG this process uses, as tensors and plain values (loadable with weights_only=True)."""
    version, key, gauss = random.getstate()
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(key), gauss],
        "numpy": {"algo": algo, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": None,
    }
    tracker = _rng_tracker()
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict) -> None:
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    n = state["numpy"]
    np.random.set_state((n["algo"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _rng_tracker()
    if tracker is not None and state.get("tracker") is not None:
        tracker.set_states(state["tracker"])


def _rng_tracker():
    try:
        from megatron_slung.parallel.random import get_rng_tracker
    except ImportError:
        return None
    return get_rng_tracker()


# --------------------------------------------------------------------------- atomic file helpers
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


def read_latest(save_dir: str) -> Optional[str]:
    """The tag ``latest`` names, or None when there is no ``latest``."""
    path = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    if not tag:
        raise RuntimeError(f"{path} is empty")
    return tag


_CRASH_COUNTS: dict = {}


def _crash_point(name: str) -> None:
    """Test hook: ``SLUNG_CHECKPOINT_CRASH_AT=NAME[:N]`` kills the process (exit 17) the N-th time (default
    first) a save reaches point NAME: a crash in the middle of a save, for the atomicity tests."""
    spec = os.environ.get("SLUNG_CHECKPOINT_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] == int(nth or 1):
        os._exit(17)


# --------------------------------------------------------------------------- save
def save_checkpoint(engine, save_dir: str, iteration: int, train_state: dict, args_dict: dict) -> str:
    """Save ``engine`` (DeepSpeed) and ``train_state`` as ``save_dir/iter_{iteration}``; return its path.

    Collective: every rank must call it. ``train_state`` holds plain values and tensors (iteration,
    consumed samples, scheduler state...); RNG states are added per rank.
    """
    rank = _rank()
    final_tag = checkpoint_tag(iteration)
    tmp_tag = TMP_PREFIX + final_tag
    tmp_dir = os.path.join(save_dir, tmp_tag)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):  # leftovers of saves that crashed
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    _barrier()

    engine.save_checkpoint(save_dir, tag=tmp_tag, save_latest=False)
    _crash_point("after_deepspeed")
    torch.save(get_rng_state(), os.path.join(tmp_dir, rng_file(rank)))
    if rank == 0:
        state = dict(train_state)
        state.update(format_version=FORMAT_VERSION, iteration=int(iteration), args_json=json.dumps(args_dict))
        torch.save(state, os.path.join(tmp_dir, STATE_FILE))
        with open(os.path.join(tmp_dir, ARGS_FILE), "w", encoding="utf-8") as f:
            json.dump(args_dict, f, indent=1, sort_keys=True)
    _barrier()

    if rank == 0:
        _fsync_tree(tmp_dir)
        _crash_point("before_rename")
        tag = final_tag
        latest = read_latest(save_dir)
        suffix = 0
        while os.path.exists(os.path.join(save_dir, tag)):
            if tag != latest:  # not referenced by `latest`: an older run's or a crashed save's; replace it
                shutil.rmtree(os.path.join(save_dir, tag))
                break
            suffix += 1
            tag = f"{final_tag}_{suffix}"
        os.rename(tmp_dir, os.path.join(save_dir, tag))
        _fsync_path(save_dir)
        _crash_point("before_latest")
        write_text_atomic(os.path.join(save_dir, LATEST_FILE), tag + "\n")
    else:
        tag = None
    if dist.is_initialized():
        box = [tag]
        dist.broadcast_object_list(box, src=0)
        tag = box[0]
    _barrier()
    return os.path.join(save_dir, tag)


# --------------------------------------------------------------------------- load
def find_checkpoint(load: str) -> Optional[tuple]:
    """``(dir, tag)`` of the checkpoint ``--load`` means, or None when there is none.

    ``load`` is a save directory (its ``latest`` is used) or one checkpoint directory.
    """
    if os.path.isfile(os.path.join(load, STATE_FILE)):
        path = os.path.abspath(load.rstrip("/"))
        return os.path.dirname(path), os.path.basename(path)
    tag = read_latest(load) if os.path.isdir(load) else None
    if tag is None:
        return None
    if not os.path.isfile(os.path.join(load, tag, STATE_FILE)):
        raise RuntimeError(f"{os.path.join(load, LATEST_FILE)} names {tag!r}, which is not a complete checkpoint "
                           f"(no {STATE_FILE} in {os.path.join(load, tag)})")
    return load, tag


def load_train_state(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, STATE_FILE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise RuntimeError(f"{path}: unknown checkpoint format version {state.get('format_version')!r}")
    state["args"] = json.loads(state.pop("args_json"))
    return state


def load_checkpoint(engine, load: str, *, load_optimizer: bool = True, load_rng: bool = True,
                    finetune: bool = False, log=print) -> Optional[dict]:
    """Load the checkpoint ``load`` names into ``engine``; return our train state (None: no checkpoint).

    ``finetune``: the weights only (no optimizer, RNG or position). Collective: every rank calls it.
    """
    found = find_checkpoint(load)
    if found is None:
        log(f"no checkpoint found in {load} (no {LATEST_FILE} file): starting from scratch")
        return None
    load_dir, tag = found
    path = os.path.join(load_dir, tag)
    with safe_torch_load():
        loaded_path, _client = engine.load_checkpoint(
            load_dir, tag=tag, load_module_strict=True,
            load_optimizer_states=load_optimizer and not finetune,
            load_lr_scheduler_states=False, load_module_only=finetune,
        )
    if loaded_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    state = load_train_state(path)
    if finetune:
        log(f"loaded the weights of {path} (--finetune: iteration, optimizer and data position start afresh)")
        return {"iteration": 0, "finetune_from": path, "args": state["args"]}
    if load_rng:
        rng_path = os.path.join(path, rng_file(_rank()))
        if os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
        else:
            log(f"{rng_path} is missing (a different number of ranks?): RNG states not restored")
    log(f"loaded checkpoint {path} at iteration {state['iteration']}")
    return state
