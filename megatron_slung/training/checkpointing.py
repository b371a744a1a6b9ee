"""Checkpoints: DeepSpeed's files plus the trainer's own state, written atomically, loaded without unpickling.

Layout of ``--save DIR``:

    DIR/latest                          the tag of the newest complete checkpoint (one line)
    DIR/iter_0000100/                   one checkpoint: DeepSpeed's files (mp_rank_XX_model_states.pt,
                                        ZeRO shards, pipeline layer_XX files) and ours:
        slung_state.pt                  iteration, consumed samples, LR-schedule step count, arguments (JSON),
                                        the model architecture and the parallel layout (see below), and
                                        whether the optimizer / RNG states were saved (--no-save-optim/-rng)
        rng_state_rank00003.pt          python / numpy / torch / CUDA and model-parallel tracker RNG states
        args.json                       the arguments, for people
    DIR/.tmp-iter_0000100/              a save in progress (never loaded; removed by the next save)
    DIR/.tmp-deleting-iter_0000050/     an old checkpoint being deleted (--keep-last-checkpoints, idem)

Atomicity. Every rank writes into ``.tmp-TAG``; after a barrier rank 0 flushes every file to disk (fsync),
renames the directory to ``TAG`` (one atomic rename), then replaces ``latest`` by writing ``latest.tmp`` and
renaming it over ``latest`` (atomic too), fsyncing the directory after each rename. A crash at any point
leaves ``latest`` naming a complete checkpoint: before the first rename nothing visible changed; between the
two renames the new directory exists but ``latest`` still names the previous one. If ``TAG`` already exists
(the same iteration saved twice) and ``latest`` names it, the new one gets ``TAG_1`` (``_2``...) instead, so
the checkpoint ``latest`` names is never touched. Needs a file system all ranks share (as Megatron does).

Metadata. ``slung_state.pt`` holds ``model_architecture`` (versioned: every GPTConfig field that defines the
model, the padded vocabulary size, the tokenizer's vocabulary size and ``--make-vocab-size-divisible-by``) and
``layout`` (TP, PP, DP, world size, ZeRO stage, sequence parallel). ``read_checkpoint_metadata(path)`` reads
them without touching a weight (older checkpoints: from their saved arguments). Before anything is built,
``resolve_load(args)`` compares the run's flags with them: a model flag not given is adopted from the
checkpoint (one line says which), a flag that contradicts it is refused naming both values, and a layout
that cannot hold the model is refused; a checkpoint saved at another layout is converted on load
(``training/reshard.py``).

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
import re
import shutil
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "slung_state.pt"
ARGS_FILE = "args.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
ARCHITECTURE_VERSION = 1


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
@contextlib.contextmanager
def _without_optimizer_state(engine):
    """While DeepSpeed saves, leave the optimizer's state out: it goes under ``optimizer`` in
    ``mp_rank_XX_model_states.pt`` without ZeRO, and into the ``zero_pp_rank_*_optim_states.pt`` files with
    ZeRO 1-2 (or DeepSpeed's bf16 optimizer). The weights are in the model-states (or pipeline layer) files
    either way; at ZeRO 3 they are only in the optimizer files, so ``--no-save-optim`` is refused there."""
    optimizer, zero_flag = engine.optimizer, engine.save_zero_checkpoint
    engine.save_zero_checkpoint = False
    if optimizer is not None:
        optimizer.state_dict = lambda: None  # an instance attribute shadowing the method, removed below
    try:
        yield
    finally:
        engine.save_zero_checkpoint = zero_flag
        if optimizer is not None:
            del optimizer.state_dict


def save_checkpoint(engine, save_dir: str, iteration: int, train_state: dict, args_dict: dict, *,
                    save_optim: bool = True, save_rng: bool = True) -> str:
    """Save ``engine`` (DeepSpeed) and ``train_state`` as ``save_dir/iter_{iteration}``; return its path.

    Collective: every rank must call it. ``train_state`` holds plain values and tensors (iteration,
    consumed samples, scheduler state...); RNG states are added per rank unless ``save_rng`` is False.
    ``save_optim`` False (``--no-save-optim``) leaves the optimizer's state out of DeepSpeed's files.
    ``slung_state.pt`` records both (``saved_optimizer``, ``saved_rng``), so a load can insist on them.
    (``--async-save``: ``async_save.AsyncCheckpointSaver`` does the same in two halves.)
    """
    rank = _rank()
    final_tag = checkpoint_tag(iteration)
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + final_tag)
    prepare_save_dir(save_dir)

    with contextlib.nullcontext() if save_optim else _without_optimizer_state(engine):
        engine.save_checkpoint(save_dir, tag=TMP_PREFIX + final_tag, save_latest=False)
    _crash_point("after_deepspeed")
    for name, obj in trainer_files(rank, iteration, train_state, args_dict, save_optim, save_rng).items():
        write_file(os.path.join(tmp_dir, name), obj)
    _barrier()

    tag = publish_checkpoint(save_dir, final_tag) if rank == 0 else None
    if dist.is_initialized():
        box = [tag]
        dist.broadcast_object_list(box, src=0)
        tag = box[0]
    _barrier()
    return os.path.join(save_dir, tag)


def prepare_save_dir(save_dir: str) -> None:
    """Collective, before a save: rank 0 creates ``save_dir`` and removes what saves that crashed left."""
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    _barrier()


def trainer_files(rank: int, iteration: int, train_state: dict, args_dict: dict, save_optim: bool,
                  save_rng: bool) -> dict:
    """Our files of one checkpoint on ``rank``: file name -> object for ``write_file``."""
    files = {}
    if save_rng:
        files[rng_file(rank)] = get_rng_state()
    if rank == 0:
        state = dict(train_state)
        state.update(format_version=FORMAT_VERSION, iteration=int(iteration), args_json=json.dumps(args_dict),
                     saved_optimizer=bool(save_optim), saved_rng=bool(save_rng))
        files[STATE_FILE] = state
        files[ARGS_FILE] = json.dumps(args_dict, indent=1, sort_keys=True)
    return files


def write_file(path: str, obj) -> None:
    """A str as text, anything else with ``torch.save``."""
    if isinstance(obj, str):
        with open(path, "w", encoding="utf-8") as f:
            f.write(obj)
    else:
        torch.save(obj, path)


def publish_checkpoint(save_dir: str, final_tag: str) -> str:
    """On rank 0, once every rank's files are in ``.tmp-FINAL_TAG``: flush them to disk, rename the directory
    to its tag, then point ``latest`` at it (the atomicity steps of the module docstring). Returns the tag."""
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + final_tag)
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
    return tag


def prune_checkpoints(save_dir: str, iteration: int, *, retain_interval: Optional[int] = None,
                      keep_last: Optional[int] = None) -> List[str]:
    """After the save of ``iteration`` (complete, ``latest`` naming it): delete the older checkpoints that
    neither policy keeps; return their tags. Call on one rank.

    ``retain_interval`` (Megatron's ``--save-retain-interval``): keep the checkpoints whose iteration is a
    multiple of it. ``keep_last`` (``--keep-last-checkpoints``): keep the newest K (this one included). With
    both, either keeps a checkpoint. The one ``latest`` names and any newer than ``iteration`` (left by a run
    rolled back with ``--ckpt-step``) are never touched. Each victim is first renamed to ``.tmp-deleting-TAG``
    (atomic), then removed: a crash in the middle leaves a ``.tmp-`` directory, which nothing loads and the next
    save removes, never a half-deleted ``iter_*`` that looks complete."""
    if retain_interval is None and keep_last is None:
        return []
    latest = read_latest(save_dir)
    older = [(it, tag) for it, tag in list_checkpoints(save_dir) if it <= iteration]
    newest = {tag for _it, tag in older[-keep_last:]} if keep_last else set()
    victims = [tag for it, tag in older if tag != latest and tag not in newest
               and not (retain_interval and it % retain_interval == 0)]
    for tag in victims:
        doomed = os.path.join(save_dir, TMP_PREFIX + "deleting-" + tag)
        os.rename(os.path.join(save_dir, tag), doomed)
        _fsync_path(save_dir)
        _crash_point("while_deleting")
        shutil.rmtree(doomed)
    return victims


# --------------------------------------------------------------------------- load
_TAG_RE = re.compile(r"^iter_(\d{7,})(?:_(\d+))?$")


def list_checkpoints(save_dir: str) -> List[Tuple[int, str]]:
    """The complete checkpoints in ``save_dir`` as sorted ``(iteration, tag)`` (a tag saved twice: ``iter_N_1``)."""
    out = []
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            m = _TAG_RE.match(name)
            if m and os.path.isfile(os.path.join(save_dir, name, STATE_FILE)):
                out.append((int(m.group(1)), int(m.group(2) or 0), name))
    return [(it, name) for it, _n, name in sorted(out)]


def find_checkpoint(load: str, step: Optional[int] = None) -> Optional[tuple]:
    """``(dir, tag)`` of the checkpoint ``--load`` means, or None when there is none.

    ``load`` is a save directory (its ``latest`` is used, or with ``step`` (``--ckpt-step``) the checkpoint of
    that iteration) or one checkpoint directory. A ``step`` that is not there is an error naming the
    iterations that are.
    """
    if os.path.isfile(os.path.join(load, STATE_FILE)):
        path = os.path.abspath(load.rstrip("/"))
        if step is not None:
            raise RuntimeError(f"--ckpt-step {step} needs a save directory (with iter_* checkpoints), but {load} is "
                               "one checkpoint directory; give its parent")
        return os.path.dirname(path), os.path.basename(path)
    tag = read_latest(load) if os.path.isdir(load) else None
    if step is not None:
        found = [t for it, t in list_checkpoints(load) if it == step] if os.path.isdir(load) else []
        if not found:
            have = sorted({it for it, _t in list_checkpoints(load)}) if os.path.isdir(load) else []
            raise RuntimeError(f"--ckpt-step {step}: there is no complete checkpoint of iteration {step} in {load}; "
                               f"it has iterations {have}" if have else
                               f"--ckpt-step {step}: {load} holds no checkpoint at all")
        # saved twice (iter_N and iter_N_1): the one `latest` names, else the newest
        return load, tag if tag in found else found[-1]
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


# --------------------------------------------------------------------------- metadata: architecture and layout
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size", "world_size",
               "zero_stage", "sequence_parallel")

# Flags by which a user says the run starts from the weights of --load: no checkpoint there is then an error.
WANTS_WEIGHTS = ("finetune", "no_load_optim", "no_load_rng")

# --use-checkpoint-args (Megatron's load_args_from_checkpoint): the settings it forces from the checkpoint even
# over a flag given (its ``force=True``); the others it takes only when the flag is absent, which --load here
# always does (and refuses a contradicting flag). Megatron also takes these saved arguments, which are not part
# of the model's architecture: the sequence length (when absent), dropout and the tokenizer (forced).
USE_CHECKPOINT_ARGS_FORCED = frozenset({"num_query_groups", "rotary_base", "untie_embeddings_and_output_weights",
                                        "hidden_dropout", "attention_dropout", "tokenizer_type", "tokenizer_model"})
USE_CHECKPOINT_ARGS_EXTRA = ("seq_length", "hidden_dropout", "attention_dropout", "tokenizer_type",
                             "tokenizer_model")

# Architecture fields an explicit flag may change on load: with RoPE (or no positions) no weight depends on the
# longest position, so a longer context is a fine-tuning choice (only the model's recorded limit changes). With
# learned absolute positions it is the size of the position table, fixed like any other shape.
CHANGEABLE_ON_LOAD = frozenset({"max_position_embeddings"})


def _changeable_on_load(name: str, model: dict) -> bool:
    return name in CHANGEABLE_ON_LOAD and model.get("position_embedding_type") != "learned_absolute"


def model_architecture(config, tokenizer_vocab_size: Optional[int],
                       make_vocab_size_divisible_by: Optional[int]) -> dict:
    """What defines the model, for ``slung_state.pt``: every GPTConfig field outside ``gpt.RUN_SETTINGS``
    (so a field added to GPTConfig is recorded without a change here) and the vocabulary."""
    from megatron_slung.model.gpt import architecture_fields

    values = config.to_dict()
    return {
        "version": ARCHITECTURE_VERSION,
        "model": {name: values[name] for name in architecture_fields() if name != "vocab_size"},
        "padded_vocab_size": int(config.vocab_size),
        "tokenizer_vocab_size": None if tokenizer_vocab_size is None else int(tokenizer_vocab_size),
        "make_vocab_size_divisible_by": None if make_vocab_size_divisible_by is None else int(make_vocab_size_divisible_by),
    }


def layout(tensor_model_parallel_size: int, pipeline_model_parallel_size: int, data_parallel_size: int,
           zero_stage: int, sequence_parallel: bool) -> dict:
    """The parallel layout a checkpoint is saved at (keys: ``LAYOUT_KEYS``, the trainer's argument names)."""
    tp, pp, dp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size), int(data_parallel_size)
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": dp,
            "world_size": tp * pp * dp, "zero_stage": int(zero_stage), "sequence_parallel": bool(sequence_parallel)}


@dataclass
class CheckpointMetadata:
    """What a checkpoint says about itself, read without touching a weight."""

    path: str  # the checkpoint directory (SAVE/TAG)
    iteration: int
    architecture: dict  # model_architecture(); for an older checkpoint rebuilt from its saved arguments
    layout: dict  # layout(); idem
    args: dict  # the arguments of the run (or the converter) that saved it
    recorded: bool  # False: an older checkpoint without these records
    saved_optimizer: bool = True  # False: saved with --no-save-optim (or a weights-only import)
    saved_rng: bool = True  # False: saved with --no-save-rng (or a weights-only import)
    release: bool = False  # weights only, not written by a training run (tools/convert_from_hf.py)

    def model(self) -> dict:
        """The architecture fields the checkpoint's model has. A field it does not name did not exist when it
        was written: it has that field's default (the behaviour before the field existed)."""
        from dataclasses import MISSING, fields

        from megatron_slung.model.gpt import GPTConfig, architecture_fields

        saved = self.architecture.get("model", {})
        defaults = {f.name: f.default for f in fields(GPTConfig)}
        out = {}
        for name in architecture_fields():
            if name == "vocab_size":
                continue
            if name in saved:
                out[name] = saved[name]
            elif defaults[name] is not MISSING and defaults[name] is not None:
                out[name] = defaults[name]
        return out


# The architecture fields of the first record format. A checkpoint written before a later field existed was
# that field's GPTConfig default (RoPE, RMSNorm, SwiGLU, no biases): its record, or its saved arguments, say
# nothing of it. Its arguments may name a later field's flag, accepted then and ignored (--swiglu absent:
# swiglu false, yet the model was SwiGLU), so an older checkpoint's arguments are read for these fields only.
ARCHITECTURE_V1_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_query_groups",
                          "kv_channels", "max_position_embeddings", "rotary_base", "norm_epsilon",
                          "untie_embeddings_and_output_weights")


def _architecture_from_args(args: dict) -> dict:
    """An older checkpoint's architecture, from the arguments it saved (Megatron names = GPTConfig fields)."""
    tokenizer_vocab = args.get("vocab_size") if args.get("tokenizer_type") == "NullTokenizer" else None
    return {"version": ARCHITECTURE_VERSION,
            "model": {k: args[k] for k in ARCHITECTURE_V1_FIELDS if args.get(k) is not None},
            "padded_vocab_size": args.get("padded_vocab_size"), "tokenizer_vocab_size": tokenizer_vocab,
            "make_vocab_size_divisible_by": args.get("make_vocab_size_divisible_by")}


def read_checkpoint_metadata(path: str, step: Optional[int] = None) -> Optional[CheckpointMetadata]:
    """The metadata of the checkpoint ``path`` names (a save directory's ``latest``, its iteration ``step``,
    or one checkpoint directory); None when there is none. Reads ``slung_state.pt`` only."""
    found = find_checkpoint(path, step)
    if found is None:
        return None
    ckpt = os.path.join(*found)
    state = load_train_state(ckpt)
    args = state["args"]
    arch, lay = state.get("model_architecture"), state.get("layout")
    recorded = arch is not None
    if arch is None:
        arch = _architecture_from_args(args)
    elif arch.get("version") != ARCHITECTURE_VERSION:
        raise RuntimeError(f"{os.path.join(ckpt, STATE_FILE)}: model architecture version {arch.get('version')!r}, "
                           f"this version of megatron-slung reads {ARCHITECTURE_VERSION}")
    if lay is None:
        lay = {k: args.get(k) for k in LAYOUT_KEYS}
    # A checkpoint no training run wrote (an import: no LR-schedule state) is a "release" one, as in Megatron.
    release = bool(state.get("release", "scheduler" not in state))
    # Before these records every trainer checkpoint held both (--no-save-optim was accepted and ignored).
    saved_optimizer = bool(state.get("saved_optimizer", not release))
    saved_rng = bool(state.get("saved_rng", not release))
    return CheckpointMetadata(ckpt, int(state["iteration"]), arch, lay, args, recorded, saved_optimizer, saved_rng,
                              release)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Switches whose flag turns the field off (Megatron's --disable-bias-linear sets add_bias_linear false).
_NEGATED_SWITCHES = {"add_bias_linear": "disable_bias_linear"}


def _flag_text(name: str, value) -> str:
    if name in _NEGATED_SWITCHES:
        return _flag_text(_NEGATED_SWITCHES[name], not value)
    if isinstance(value, bool):
        return _flag(name) if value else f"no {_flag(name)}"
    return f"{_flag(name)} {value}"


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    return a == b


def resolve_load(args, explicit) -> Tuple[Optional[CheckpointMetadata], List[str]]:
    """Before anything is built: the checkpoint ``args.load`` names, with its model settings adopted for
    flags not given (``explicit``: the flags the user set) and refused where a flag contradicts them.

    Returns (metadata or None, lines to print). No checkpoint is an error, except for a run whose ``--load``
    is its ``--save`` (a job that resumes itself: it starts fresh, with a warning) that neither asks for
    weights (``WANTS_WEIGHTS``, ``--ckpt-step``) nor has ``--exit-on-missing-checkpoint``. A checkpoint saved
    without the optimizer or RNG state this run would load is refused naming the flag; a weights-only
    ("release") checkpoint is loaded as ``--finetune``. Changes ``args`` in place; ``resolve_padded_vocab`` does the vocabulary once
    the tokenizer exists, ``check_model_config`` the model config built from ``args``."""
    from megatron_slung.training.arguments import ArgumentError

    load, notes = args.load, []
    step = getattr(args, "ckpt_step", None)
    if step is not None and not os.path.isdir(load):
        raise ArgumentError(f"--load {load} does not exist (or is not a directory), but --ckpt-step {step} asks for "
                            "one of its checkpoints")
    try:
        meta = read_checkpoint_metadata(load, step) if os.path.isdir(load) else None
    except Exception as e:  # `latest` naming a partial checkpoint, an unreadable or foreign slung_state.pt
        raise ArgumentError(f"--load {load}: {e}") from None
    if meta is None:
        if not os.path.exists(load):
            what = "does not exist"
        elif not os.path.isdir(load):
            what = "is not a directory"
        else:
            what = f"holds no checkpoint (no {LATEST_FILE} file, no {STATE_FILE})"
        wants = [_flag(n) for n in WANTS_WEIGHTS if getattr(args, n, False)]
        if wants:
            raise ArgumentError(f"--load {load} {what}, but {' '.join(wants)} asks to start from its weights")
        if getattr(args, "exit_on_missing_checkpoint", False):
            raise ArgumentError(f"--load {load} {what}, and --exit-on-missing-checkpoint is set")
        if args.save is not None and os.path.realpath(args.save) == os.path.realpath(load):
            notes.append(f"WARNING: --load {load} {what} (it is also --save): starting from scratch, "
                         "with random weights")
            return None, notes
        raise ArgumentError(f"--load {load} {what}; give a checkpoint, or to start a run that resumes itself later "
                            f"give --save {load} as well")

    where = f"--load {meta.path}"
    check_layout_possible(meta, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, where)

    if meta.release and not args.finetune:  # Megatron: a release checkpoint is always loaded as --finetune
        args.finetune = True
        notes.append(f"{where} holds weights only (a release checkpoint: no optimizer, schedule or position): "
                     "loading it as --finetune")
    if not args.finetune:  # Megatron refuses to go on when a part it was asked to load is not there
        if not meta.saved_optimizer and not args.no_load_optim:
            raise ArgumentError(f"{where} was saved without its optimizer state (--no-save-optim); pass "
                                "--no-load-optim to resume with a fresh optimizer (and LR schedule), or --finetune")
        if not meta.saved_rng and not args.no_load_rng:
            raise ArgumentError(f"{where} was saved without its RNG states (--no-save-rng); pass --no-load-rng to "
                                "resume with fresh RNG streams (dropout then differs from an unbroken run), or "
                                "--finetune")

    from megatron_slung.model.gpt import architecture_fields

    unknown = sorted(set(meta.architecture.get("model", {})) - set(architecture_fields()))
    if unknown:
        raise ArgumentError(f"{where}: the checkpoint's model has settings this version does not know: {unknown}")
    adopted, refused, overridden = [], [], []
    use_ckpt_args = getattr(args, "use_checkpoint_args", False)
    saved_model = meta.model()
    settings = dict(saved_model)
    if use_ckpt_args:  # Megatron's load_args_from_checkpoint: also these saved arguments
        settings.update({k: meta.args[k] for k in USE_CHECKPOINT_ARGS_EXTRA if meta.args.get(k) is not None})
        tok = settings.get("tokenizer_model")
        beside = os.path.join(os.path.dirname(meta.path), tok) if tok and not os.path.isabs(tok) else None
        if beside and os.path.exists(beside):  # an import keeps its tokenizer beside the checkpoint: SAVE/tokenizer
            settings["tokenizer_model"] = beside
    for name, saved in settings.items():
        if not hasattr(args, name):  # no flag sets it: check_model_config compares the built model
            continue
        ours = getattr(args, name)
        if _same(ours, saved):
            continue
        if name not in explicit:
            setattr(args, name, saved)
            adopted.append(_flag_text(name, saved))
        elif use_ckpt_args and name in USE_CHECKPOINT_ARGS_FORCED:
            setattr(args, name, saved)
            if name == "num_query_groups":  # the checkpoint's grouped-query attention, as when adopted
                args.group_query_attention = saved != saved_model.get("num_attention_heads", saved)
            overridden.append(f"{_flag_text(name, ours)} -> {_flag_text(name, saved)}")
        elif name not in saved_model:  # a run setting --use-checkpoint-args takes only when absent (seq_length)
            continue
        elif _changeable_on_load(name, saved_model):
            notes.append(f"note: {_flag_text(name, ours)} (the checkpoint's model has {saved})")
        else:
            refused.append(f"{_flag_text(name, ours)} contradicts the checkpoint, whose model has {name} = {saved!r}")
    if refused:
        raise ArgumentError(f"{where}: " + "; ".join(refused) + " (leave a model flag out to use the checkpoint's value)")
    if adopted:
        notes.append(f"model settings from the checkpoint {meta.path} (flags not given): " + ", ".join(adopted))
    for line in overridden:
        notes.append(f"--use-checkpoint-args: {line} (the checkpoint's value replaces the flag given)")
    # Dropout is a setting of the run, not adopted; but its default is now Megatron's 0.1 where it was 0, so
    # a run that continues a checkpoint without saying so is told what changed.
    for name in ("hidden_dropout", "attention_dropout"):
        saved = meta.args.get(name)
        if name not in explicit and saved is not None and hasattr(args, name) and float(saved) != getattr(args, name):
            notes.append(f"note: {_flag_text(name, getattr(args, name))} (the default), the checkpoint's run had "
                         f"{saved}; give {_flag_text(name, saved)} to continue with it")
    if not meta.recorded:
        notes.append(f"note: {meta.path} is an older checkpoint without a model-architecture record; "
                     "its saved arguments were compared instead")
    return meta, notes


def check_layout_possible(meta: CheckpointMetadata, tp: int, pp: int, where: str) -> None:
    """The checkpoint's model can be split over ``tp`` x ``pp`` (any layout it was saved at is converted on
    load): refused naming the value otherwise, before any weight is read."""
    from megatron_slung.training.arguments import ArgumentError

    model = meta.model()
    rows = meta.architecture.get("padded_vocab_size")
    checks = [("num-attention-heads", model.get("num_attention_heads"), tp, "tensor"),
              ("num-query-groups", model.get("num_query_groups"), tp, "tensor"),
              ("ffn-hidden-size", model.get("ffn_hidden_size"), tp, "tensor"),
              ("padded vocabulary size", rows, tp, "tensor"),
              ("num-layers", model.get("num_layers"), pp, "pipeline")]
    for what, value, size, kind in checks:
        if value is not None and int(value) % size != 0:
            raise ArgumentError(f"{where}: --{kind}-model-parallel-size {size} cannot hold the checkpoint's model: its "
                                f"{what} ({value}) is not divisible by {size}")


def resolve_padded_vocab(meta: Optional[CheckpointMetadata], args, explicit,
                         tokenizer_vocab_size: int) -> Tuple[int, Optional[str]]:
    """The padded vocabulary size of the model to build, and a line to print (or None).

    Without a checkpoint: Megatron's padding of the tokenizer's size. With one: the checkpoint's row count,
    which an explicit ``--make-vocab-size-divisible-by`` must reproduce; a tokenizer larger than the rows, or
    smaller than the checkpoint's tokenizer, is refused (it is another tokenizer)."""
    from megatron_slung.model.gpt import pad_vocab_size
    from megatron_slung.training.arguments import ArgumentError

    tp, divisor = args.tensor_model_parallel_size, args.make_vocab_size_divisible_by
    ours = pad_vocab_size(tokenizer_vocab_size, tp, divisor)
    if meta is None or meta.architecture.get("padded_vocab_size") is None:
        return ours, None
    arch, where, tok = meta.architecture, f"--load {meta.path}", tokenizer_vocab_size
    rows, saved_tok, saved_div = int(arch["padded_vocab_size"]), arch.get("tokenizer_vocab_size"), arch.get(
        "make_vocab_size_divisible_by")
    if tok > rows:
        raise ArgumentError(f"{where}: the tokenizer has {tok} tokens, more than the checkpoint's {rows} vocabulary "
                            "rows (another --tokenizer-model or --vocab-size?)")
    if saved_tok is not None and tok < saved_tok:
        raise ArgumentError(f"{where}: the tokenizer has {tok} tokens, the checkpoint's model was made for "
                            f"{saved_tok} (another --tokenizer-model or --vocab-size?)")
    lines = []
    if saved_tok is not None and tok > saved_tok:
        lines.append(f"note: the tokenizer has {tok} tokens, the checkpoint's had {saved_tok}: the new tokens use "
                     "padding rows of its vocabulary")
    if ours != rows:
        saved_with = f" (saved with --make-vocab-size-divisible-by {saved_div})" if saved_div else ""
        if "make_vocab_size_divisible_by" in explicit:
            fix = f"pass --make-vocab-size-divisible-by {saved_div}, or " if saved_div else ""
            raise ArgumentError(f"{where}: --make-vocab-size-divisible-by {divisor} pads the tokenizer's {tok} tokens "
                                f"to {ours} rows at TP {tp}, but the checkpoint has {rows}{saved_with}; {fix}leave "
                                "the flag out to use the checkpoint's vocabulary")
        lines.append(f"vocabulary: the checkpoint's {rows} rows{saved_with} for the tokenizer's {tok} tokens "
                     f"(--make-vocab-size-divisible-by {divisor} would pad to {ours})")
        if saved_div:
            args.make_vocab_size_divisible_by = int(saved_div)
    return rows, "; ".join(lines) or None


def check_model_config(meta: Optional[CheckpointMetadata], config) -> None:
    """The model about to be built is the checkpoint's, field by field (catches a field no flag sets, or a
    flag ``gpt_config_from_args`` does not pass on)."""
    if meta is None:
        return
    from megatron_slung.training.arguments import ArgumentError

    built, saved_model = config.to_dict(), meta.model()
    diffs = [f"{name}: the checkpoint's {saved!r}, this run's {built[name]!r}" for name, saved in saved_model.items()
             if not _changeable_on_load(name, saved_model) and not _same(built[name], saved)]
    rows = meta.architecture.get("padded_vocab_size")
    if rows is not None and built["vocab_size"] != rows:
        diffs.append(f"padded vocabulary: the checkpoint's {rows}, this run's {built['vocab_size']}")
    if diffs:
        raise ArgumentError(f"--load {meta.path}: the model this run would build is not the checkpoint's: "
                            + "; ".join(diffs))


def load_checkpoint(engine, load: str, *, load_optimizer: bool = True, load_rng: bool = True,
                    finetune: bool = False, log=print) -> Optional[dict]:
    """Load the checkpoint ``load`` names into ``engine``; return our train state (None: no checkpoint).

    ``finetune``: the weights only (no optimizer, RNG or position). Collective: every rank calls it.
    A checkpoint saved at another layout (``reshard.needs_conversion``) is converted (``_load_converted``).
    """
    found = find_checkpoint(load)
    if found is None:
        log(f"WARNING: no checkpoint found in {load} (no {LATEST_FILE} file): starting from scratch")
        return None
    load_dir, tag = found
    path = os.path.join(load_dir, tag)
    meta = read_checkpoint_metadata(path)
    now = current_layout(engine)
    from megatron_slung.training import reshard

    if reshard.needs_conversion(meta.layout, now):
        return _load_converted(engine, meta, now, load_optimizer=load_optimizer and not finetune,
                               load_rng=load_rng, finetune=finetune, log=log)
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


def current_layout(engine) -> dict:
    """The layout of the running job (the ``layout`` record's keys), from the process groups and the engine."""
    from megatron_slung.parallel import state as parallel_state

    config = getattr(engine.module, "config", None)
    return layout(parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_data_parallel_world_size(), engine.zero_optimization_stage(),
                  bool(getattr(config, "sequence_parallel", False)))


def _load_converted(engine, meta: CheckpointMetadata, now: dict, *, load_optimizer: bool, load_rng: bool,
                    finetune: bool, log=print) -> dict:
    """Load a checkpoint saved at another layout: read it as full tensors (``reshard.read_full_state``), put
    this rank's slices into the engine. The per-rank RNG states belong to the old layout's ranks: instead the
    streams (python, numpy, torch, the model-parallel tracker) are re-seeded from the saved ``--seed``, this
    rank's pipeline stage and the iteration, as Megatron-DeepSpeed does after a universal-checkpoint load."""
    from megatron_slung.training import reshard

    path = meta.path
    if meta.args.get("fp16"):
        raise reshard.ReshardError(f"{path} was saved with --fp16 at {reshard.describe(meta.layout)}: converting its "
                                   "state (loss scaler included) to another layout is not supported; resume it at "
                                   "that layout")
    log(f"converting checkpoint {path}: {reshard.describe(meta.layout)} -> {reshard.describe(now)}")
    config = engine.module.config
    with_optimizer = load_optimizer and meta.saved_optimizer
    full = reshard.read_full_state(path, config, meta.layout, meta.args.get("pipeline_partition_method") or "uniform",
                                   optimizer=with_optimizer, decoupled_lr=meta.args.get("decoupled_lr") is not None)
    reshard.apply_full_state(engine, config, full, optimizer=with_optimizer)
    state = load_train_state(path)
    if finetune:
        log(f"loaded the weights of {path} (--finetune: iteration, optimizer and data position start afresh)")
        return {"iteration": 0, "finetune_from": path, "args": state["args"]}
    engine.global_steps = int(state["iteration"])
    engine.global_samples = int(state.get("consumed_train_samples", 0))
    if load_rng:
        from megatron_slung.parallel import state as parallel_state
        from megatron_slung.parallel.random import model_parallel_manual_seed

        seed = int(meta.args.get("seed", 1234)) + 100 * parallel_state.get_pipeline_model_parallel_rank() \
            + int(state["iteration"])
        random.seed(seed)
        np.random.seed(seed)
        model_parallel_manual_seed(seed)
        log(f"RNG: the saved per-rank states belong to the old layout; re-seeded from --seed, the pipeline stage "
            f"and iteration {state['iteration']} (dropout masks differ from an unbroken run)")
    log(f"loaded checkpoint {path} at iteration {state['iteration']}")
    return state
