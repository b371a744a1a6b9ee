"""Model exchange on disk: megatron-slung checkpoints <-> Hugging Face Llama / Qwen2 / GPT-2 directories.

The tensor-name mappings live in `megatron_slung.model.hf_llama` (Llama style: LlamaForCausalLM, with or
without biases, and Qwen2ForCausalLM for q/k/v biases) and `megatron_slung.model.hf_gpt2` (GPT-2 style:
GPT2LMHeadModel), both on TP=1 state dicts; `hf_adapter` picks the one that holds a model, and refuses a
model neither holds naming what stands in the way. The TP split/merge rules are in `megatron_slung.model.gpt`;
this module only reads and writes files, and is what
``tools/convert_to_hf.py``, ``tools/convert_from_hf.py`` and the evaluations (``--model CKPT``) use.

Checkpoint layout (DeepSpeed's, so the trainer loads what ``convert_from_hf`` writes)::

    CKPT/latest                                         the tag of the newest checkpoint, e.g. "release"
    CKPT/TAG/mp_rank_{t:02d}_model_states.pt            PP = 1: {"module": TP rank t's GPTModel state dict, ...}
    CKPT/TAG/layer_{i:02d}-model_{t:02d}-model_states.pt PP > 1: pipeline layer i (names inside the layer,
                                                        see `megatron_slung.model.pipeline`) of TP rank t
    CKPT/TAG/mp_rank_{r:02d}_model_states.pt            PP > 1: {"module": None, ...}, one per model-parallel rank

    CKPT/TAG/slung_state.pt, args.json                  the trainer's own state: iteration, arguments (JSON)

The model configuration is read from the ``model_architecture`` record in ``slung_state.pt`` (written by
the trainer and by ``convert_from_hf``; see ``megatron_slung.training.checkpointing``), else, for older
checkpoints, from ``model_config`` in the ``mp_rank`` files or the trainer's arguments in ``slung_state.pt``
(Megatron's names: num_layers, hidden_size, ...; the vocabulary size from ``padded_vocab_size`` or the
embedding's shape);
the tokenizer from ``tokenizer`` (``{"type", "model"}``) or the ``tokenizer_type``/``tokenizer_model``
arguments. How many vocabulary rows are real tokens (an export keeps only those, `export_vocab_size`):
``unpadded_vocab_size`` in the ``mp_rank`` files (written by ``convert_from_hf``), else ``vocab_size`` of
a NullTokenizer run, else the tokenizer's size. ``convert_from_hf`` writes both, with ``iteration`` 0, so the trainer's ``--load CKPT
--finetune`` starts from it. Files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch

from megatron_slung.model import hf_gpt2, hf_llama
from megatron_slung.model.gpt import (
    GPTConfig,
    merge_tensor_parallel_state_dicts,
    split_state_dict_for_tensor_parallel,
)

StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint or HF directory that cannot be read: the message names the path."""


# --------------------------------------------------------------------------- pipeline layer names
def pipeline_layer_prefixes(config: GPTConfig):
    """GPTModel name prefix of each DeepSpeed pipeline layer (None: no parameters of its own).

    The same list as `megatron_slung.model.pipeline.pipeline_layer_prefixes`, repeated here so that
    converting needs no DeepSpeed import."""
    prefixes = ["embedding."] + [f"decoder.layers.{i}." for i in range(config.num_layers)]
    prefixes.append("decoder.final_layernorm.")
    prefixes.append("output_layer." if config.untie_embeddings_and_output_weights else None)
    return prefixes


def _layer_file(tag_dir: str, layer: int, tp_rank: int) -> str:
    return os.path.join(tag_dir, f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")


def _mp_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"mp_rank_{rank:02d}_model_states.pt")


# --------------------------------------------------------------------------- reading checkpoints
def resolve_tag_dir(path: str, tag: Optional[str] = None) -> str:
    """CKPT (with ``latest``), CKPT + ``tag``, or a tag directory itself -> the tag directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if tag is not None:
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"{path}: no checkpoint with tag {tag!r} ({tag_dir} does not exist)")
        return tag_dir
    if glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")) or glob.glob(os.path.join(path, "layer_*-model_states.pt")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"{latest} names tag {tag!r}, but {tag_dir} does not exist")
        return tag_dir
    raise CheckpointError(f"{path}: not a megatron-slung checkpoint (no 'latest' file, no mp_rank_*_model_states.pt)")


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing checkpoint file") from None
    except Exception as e:  # a truncated file, a foreign pickle
        raise CheckpointError(f"{path}: cannot load as a weights-only torch file: {e}") from None


# Trainer arguments (Megatron's flag names, with underscores) that are GPTConfig fields.
_ARG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "max_position_embeddings", "rotary_base", "norm_epsilon", "init_method_std",
               "untie_embeddings_and_output_weights")
TRAIN_STATE_FILE = "slung_state.pt"  # the trainer's own state (megatron_slung.training.checkpointing)


def _read_train_state(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, TRAIN_STATE_FILE)
    return _load(path) if os.path.isfile(path) else {}


def read_train_args(tag_dir: str) -> dict:
    """The trainer's arguments stored beside DeepSpeed's files (``slung_state.pt``: ``args_json``), or {}."""
    state = _read_train_state(tag_dir)
    try:
        return json.loads(state.get("args_json") or "{}")
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{os.path.join(tag_dir, TRAIN_STATE_FILE)}: 'args_json' is not JSON: {e}") from None


def config_values(meta: dict, args: dict, where: str) -> dict:
    """GPTConfig fields from the ``model_architecture`` record of ``slung_state.pt`` (every field that
    defines the model; run settings such as init_method_std from the arguments), else ``model_config``
    (older converters) or the trainer's arguments (older checkpoints).

    ``vocab_size`` may be missing (it is then read off the embedding's shape)."""
    args = args or (meta.get("args") if isinstance(meta.get("args"), dict) else {})
    # The architecture switches (positions, norms, MLP, biases) come from the record only: an older checkpoint
    # without one was built Llama style whatever its arguments say (the flags were accepted and ignored then),
    # which are GPTConfig's defaults.
    arch = meta.get("model_architecture")
    if isinstance(arch, dict):
        values = {k: args[k] for k in _ARG_FIELDS if args and args.get(k) is not None}
        values.update(arch["model"])
        values["vocab_size"] = int(arch["padded_vocab_size"])
        return values
    cfg = meta.get("model_config")
    if isinstance(cfg, dict):
        return dict(cfg)
    if "num_layers" not in args:
        raise CheckpointError(f"{where}: no model configuration in the checkpoint (no 'model_config' in the "
                              f"mp_rank files, no arguments in {TRAIN_STATE_FILE})")
    values = {k: args[k] for k in _ARG_FIELDS if args.get(k) is not None}
    if args.get("padded_vocab_size"):
        values["vocab_size"] = int(args["padded_vocab_size"])
    return values


def read_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[StateDict, GPTConfig, dict]:
    """Any TP/PP checkpoint -> (TP=1 GPTModel state dict, GPTConfig, metadata of mp_rank 0 + ``args``)."""
    tag_dir = resolve_tag_dir(path, tag)
    meta = dict(_load(_mp_file(tag_dir, 0)))
    args = read_train_args(tag_dir)
    if args:
        meta["args"] = args
    arch = _read_train_state(tag_dir).get("model_architecture")
    if arch is not None:  # what defines the model, the tokenizer's vocabulary size (trainer and converter)
        meta["model_architecture"] = arch
    values = config_values(meta, args, tag_dir)
    num_layers = int(values["num_layers"])
    untied = bool(values.get("untie_embeddings_and_output_weights", False))
    prefixes = ["embedding."] + [f"decoder.layers.{i}." for i in range(num_layers)]
    prefixes += ["decoder.final_layernorm.", "output_layer." if untied else None]
    layer_files = glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt"))
    if layer_files:
        tp = len(glob.glob(os.path.join(tag_dir, "layer_00-model_*-model_states.pt"))) or 1
        shards = [{} for _ in range(tp)]
        for layer, prefix in enumerate(prefixes):
            if prefix is None:
                continue
            for t in range(tp):
                f = _layer_file(tag_dir, layer, t)
                plain = os.path.join(tag_dir, f"layer_{layer:02d}-model_states.pt")  # a topology without a model axis
                if tp == 1 and not os.path.exists(f) and os.path.exists(plain):
                    f = plain
                for name, tensor in _load(f).items():
                    shards[t][prefix + name] = tensor
    else:
        shards = []
        for t in range(len(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))):
            state = meta if t == 0 else _load(_mp_file(tag_dir, t))
            module = state.get("module")
            if not isinstance(module, dict):
                raise CheckpointError(f"{_mp_file(tag_dir, t)}: no 'module' state dict")
            shards.append({k[len("module."):] if k.startswith("module.") else k: v for k, v in module.items()})
    embedding = shards[0].get("embedding.word_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{tag_dir}: no embedding.word_embeddings.weight in the weights")
    values.setdefault("vocab_size", int(embedding.shape[0]) * len(shards))
    try:
        config = GPTConfig.from_dict(values)
        full = merge_tensor_parallel_state_dicts(shards, config)
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{tag_dir}: the weights do not match the stored model configuration: {e}") from None
    return full, config, meta


def train_args(config: GPTConfig, tensor_parallel: int, pipeline_parallel: int, tokenizer: dict) -> dict:
    """The model's trainer arguments (Megatron names), for ``slung_state.pt`` / ``args.json``."""
    from megatron_slung.model.gpt import architecture_fields

    # every field that defines the model (for people; the model_architecture record is what is read) + init std
    args = {k: getattr(config, k) for k in architecture_fields() if k != "vocab_size"}
    args["init_method_std"] = config.init_method_std
    args.update(padded_vocab_size=config.vocab_size, tensor_model_parallel_size=tensor_parallel,
                pipeline_model_parallel_size=pipeline_parallel)
    if tokenizer:
        args.update(tokenizer_type=tokenizer.get("type"), tokenizer_model=tokenizer.get("model"))
    return args


# --------------------------------------------------------------------------- writing checkpoints
def _atomic_dir(final: str, overwrite: bool):
    """A fresh temporary directory beside ``final``; `_commit_dir` renames it into place."""
    if os.path.exists(final) and os.listdir(final) and not overwrite:
        raise FileExistsError(f"{final} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(final))}.", suffix=".tmp", dir=parent)


def _commit_dir(tmp: str, final: str) -> None:
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(path: str, full: StateDict, config: GPTConfig, tensor_parallel: int = 1,
                     pipeline_parallel: int = 1, tag: str = "release", tokenizer: Optional[dict] = None,
                     tokenizer_dir: Optional[str] = None, overwrite: bool = False,
                     tokenizer_vocab_size: Optional[int] = None,
                     make_vocab_size_divisible_by: Optional[int] = None,
                     unpadded_vocab_size: Optional[int] = None) -> str:
    """Write a TP=1 state dict as a checkpoint split for ``tensor_parallel`` x ``pipeline_parallel``.

    ``tokenizer_dir`` (optional) is copied to ``CKPT/tokenizer`` and recorded as the checkpoint's
    tokenizer (``HuggingFaceTokenizer``). The whole directory appears at once (written beside, renamed).
    ``slung_state.pt`` records the model architecture and layout as the trainer's checkpoints do
    (``training.checkpointing.model_architecture``), with the tokenizer's vocabulary size and the
    ``--make-vocab-size-divisible-by`` the rows were padded with when known, so that the trainer's
    ``--load CKPT`` adopts them. ``unpadded_vocab_size`` (optional) records how many vocabulary rows are
    real tokens (the rest is padding, left out again on export).
    """
    from megatron_slung.training import checkpointing

    config.validate_parallel(tensor_parallel, pipeline_parallel)
    if unpadded_vocab_size is not None and not 0 < unpadded_vocab_size <= config.vocab_size:
        raise ValueError(f"unpadded vocabulary size {unpadded_vocab_size} is not in 1..{config.vocab_size} "
                         "(the padded vocabulary)")
    tmp = _atomic_dir(path, overwrite)
    try:
        tag_dir = os.path.join(tmp, tag)
        os.makedirs(tag_dir)
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
            tokenizer = {"type": "HuggingFaceTokenizer", "model": "tokenizer"}
        meta = {"model_config": config.to_dict(), "tensor_model_parallel_size": tensor_parallel,
                "pipeline_model_parallel_size": pipeline_parallel, "iteration": 0, "global_steps": 0,
                "global_samples": 0, "skipped_steps": 0, "dp_world_size": 1,
                "mp_world_size": tensor_parallel * (pipeline_parallel if pipeline_parallel > 1 else 1),
                "tokenizer": tokenizer or {}}
        if unpadded_vocab_size is not None:
            meta["unpadded_vocab_size"] = int(unpadded_vocab_size)
        shards = [split_state_dict_for_tensor_parallel(full, config, tensor_parallel, t) for t in range(tensor_parallel)]
        if pipeline_parallel == 1:
            for t, shard in enumerate(shards):
                torch.save({"module": shard, **meta}, _mp_file(tag_dir, t))
        else:
            for layer, prefix in enumerate(pipeline_layer_prefixes(config)):
                if prefix is None:
                    continue
                for t, shard in enumerate(shards):
                    torch.save({k[len(prefix):]: v for k, v in shard.items() if k.startswith(prefix)},
                               _layer_file(tag_dir, layer, t))
            for r in range(tensor_parallel * pipeline_parallel):
                torch.save({"module": None, **meta}, _mp_file(tag_dir, r))
        # The trainer's own files, so that `--load CKPT --finetune` accepts the checkpoint.
        args = train_args(config, tensor_parallel, pipeline_parallel, tokenizer or {})
        if make_vocab_size_divisible_by is not None:
            args["make_vocab_size_divisible_by"] = int(make_vocab_size_divisible_by)
        state = {"format_version": checkpointing.FORMAT_VERSION, "iteration": 0, "consumed_train_samples": 0,
                 "args_json": json.dumps(args),
                 "model_architecture": checkpointing.model_architecture(config, tokenizer_vocab_size,
                                                                        make_vocab_size_divisible_by),
                 "layout": checkpointing.layout(tensor_parallel, pipeline_parallel, 1, 0, False)}
        torch.save(state, os.path.join(tag_dir, TRAIN_STATE_FILE))
        with open(os.path.join(tag_dir, "args.json"), "w", encoding="utf-8") as f:
            json.dump(args, f, indent=1, sort_keys=True)
        with open(os.path.join(tmp, "latest"), "w", encoding="utf-8") as f:
            f.write(tag + "\n")
        _commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# --------------------------------------------------------------------------- Hugging Face directories
def hf_adapter(config: GPTConfig):
    """The adapter module (``hf_llama`` or ``hf_gpt2``) whose Hugging Face class holds ``config``'s model;
    ValueError naming, for each, what it cannot hold."""
    if hf_gpt2.is_gpt2(config):
        return hf_gpt2
    try:
        hf_llama.llama_model_type(config)
    except ValueError as e:
        raise ValueError(f"{e}; and {'; '.join(hf_gpt2.gpt2_problems(config))} for GPT2LMHeadModel: no Hugging "
                         "Face class holds this combination") from None
    return hf_llama


def hf_adapter_for(hf_cfg: dict):
    """The adapter for a ``config.json``: GPT-2 for model_type gpt2, else the Llama family's (which refuses
    the types it does not know)."""
    return hf_gpt2 if hf_cfg.get("model_type") == "gpt2" else hf_llama


def hf_model_from_state_dict(full: StateDict, config: GPTConfig, dtype: torch.dtype = torch.float32):
    """An in-memory ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``GPT2LMHeadModel`` with our weights (no files)."""
    import transformers

    try:
        adapter = hf_adapter(config)
        cfg_dict = adapter.hf_config_dict(config)
        sd = adapter.to_hf_state_dict(full, config)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    cls_name = cfg_dict["architectures"][0]
    hf_cfg = transformers.AutoConfig.for_model(
        cfg_dict["model_type"], **{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type", "torch_dtype")})
    model = getattr(transformers, cls_name)(hf_cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # A tied model has no lm_head.weight of its own: it is the embedding (tied by transformers).
    if unexpected or set(missing) - {"lm_head.weight"} or ("lm_head.weight" in missing and not hf_cfg.tie_word_embeddings):
        raise CheckpointError(f"weights do not fit {cls_name}: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval()


def export_tokenizer(out_dir: str, tokenizer_type: Optional[str], tokenizer_model: Optional[str]):
    """Write HF tokenizer files for a SentencePiece ``.model`` or an HF tokenizer directory into ``out_dir``.

    A SentencePiece model becomes a ``LlamaTokenizer`` (``tokenizer.model`` + converted ``tokenizer.json``)
    whose BOS and EOS are the end-of-document token: our documents are separated by it, so it is the
    natural start of a text. Returns the loaded tokenizer (or None without a tokenizer).
    """
    from transformers import AutoTokenizer

    if not tokenizer_model:
        return None
    if tokenizer_type in (None, "HuggingFaceTokenizer") and os.path.isdir(tokenizer_model):
        tok = AutoTokenizer.from_pretrained(tokenizer_model, local_files_only=True)
        tok.save_pretrained(out_dir)
        return tok
    if tokenizer_type in (None, "SentencePieceTokenizer") and os.path.isfile(tokenizer_model):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
        eod = "<|endoftext|>" if "<|endoftext|>" in pieces else sp.id_to_piece(sp.eos_id())
        specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)]
        cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": eod, "eos_token": eod,
               "unk_token": sp.id_to_piece(sp.unk_id()), "add_bos_token": False, "add_eos_token": False,
               "legacy": False, "additional_special_tokens": [s for s in specials if s not in (eod, "<s>", "</s>")]}
        if "<|pad|>" in pieces:
            cfg["pad_token"] = "<|pad|>"
        shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        tok.save_pretrained(out_dir)  # adds the converted tokenizer.json (fast loading)
        return tok
    raise CheckpointError(f"tokenizer {tokenizer_model!r}: expected a SentencePiece .model file or an HF tokenizer "
                          f"directory (type {tokenizer_type or 'auto'})")


# --------------------------------------------------------------------------- vocabulary padding
def pad_vocab(full: StateDict, config: GPTConfig, multiple: int) -> Tuple[StateDict, GPTConfig]:
    """Zero rows appended to the embedding (and output layer) up to a multiple of ``multiple``."""
    padded = -(-config.vocab_size // multiple) * multiple
    if padded == config.vocab_size:
        return full, config
    full = dict(full)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in full:
            w = full[name]
            full[name] = torch.cat([w, w.new_zeros(padded - w.size(0), w.size(1))])
    return full, GPTConfig.from_dict({**config.to_dict(), "vocab_size": padded})


def unpad_vocab(full: StateDict, config: GPTConfig, vocab_size: int) -> Tuple[StateDict, GPTConfig]:
    """The first ``vocab_size`` rows of the embedding (and output layer): the padding rows left out."""
    if vocab_size == config.vocab_size:
        return full, config
    full = dict(full)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in full:
            full[name] = full[name][:vocab_size]
    return full, GPTConfig.from_dict({**config.to_dict(), "vocab_size": vocab_size})


def export_vocab_size(meta: dict, rows: int, tokenizer_size: Optional[int] = None,
                      vocab_size: Optional[int] = None, where: str = "checkpoint") -> int:
    """How many of the ``rows`` (padded) vocabulary rows are real tokens: what an export keeps.

    From, in order: ``vocab_size`` (the user's ``--vocab-size``); the checkpoint's record
    (``unpadded_vocab_size`` in the mp_rank files, written by ``convert_from_hf``, or in the trainer's
    arguments; else the ``tokenizer_vocab_size`` of the ``model_architecture`` record; else ``vocab_size``
    of a NullTokenizer run); the tokenizer's size (``tokenizer_size``: what
    the trainer padded, checked against the run's padding). With none of these it refuses rather than
    guess: the padding rows would otherwise be sampled as ids that decode to nothing."""
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    recorded = meta.get("unpadded_vocab_size", args.get("unpadded_vocab_size"))
    source = "the checkpoint's unpadded_vocab_size"
    arch = meta.get("model_architecture") if isinstance(meta.get("model_architecture"), dict) else {}
    if recorded is None and arch.get("tokenizer_vocab_size"):  # the trainer's record (training.checkpointing)
        recorded, source = arch["tokenizer_vocab_size"], "the checkpoint's tokenizer_vocab_size"
    if recorded is None and args.get("tokenizer_type") == "NullTokenizer" and args.get("vocab_size"):
        recorded, source = args["vocab_size"], "the checkpoint's --vocab-size (NullTokenizer)"
    if vocab_size is not None:
        if recorded is not None and int(recorded) != vocab_size:
            raise CheckpointError(f"--vocab-size {vocab_size} contradicts {source} ({recorded}) in {where}")
        size, source = vocab_size, "--vocab-size"
    elif recorded is not None:
        size = int(recorded)
    elif tokenizer_size is not None:
        size, source = tokenizer_size, f"the tokenizer ({tokenizer_size} tokens)"
        divisible, tp = args.get("make_vocab_size_divisible_by"), args.get("tensor_model_parallel_size")
        if divisible and tp:
            expected = -(-size // (divisible * tp)) * divisible * tp
            if expected != rows:
                raise CheckpointError(
                    f"{where}: the tokenizer has {size} tokens, which pads to {expected} (--make-vocab-size-divisible-by "
                    f"{divisible} x TP {tp}), but the checkpoint has {rows} vocabulary rows: not the tokenizer the "
                    "model was trained with (pass --tokenizer-model, or --vocab-size N)")
    else:
        raise CheckpointError(f"{where}: the real vocabulary size is not known (the checkpoint records neither "
                              f"unpadded_vocab_size nor a tokenizer) and it has {rows} rows, padding included; pass "
                              "--tokenizer-model PATH or --vocab-size N")
    if not 0 < size <= rows:
        raise CheckpointError(f"{where}: vocabulary size {size} from {source} is not in 1..{rows} (the checkpoint's rows)")
    if tokenizer_size is not None and tokenizer_size > size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer_size} tokens, more than the model's vocabulary "
                              f"({size}, from {source})")
    return size


def save_hf_directory(out_dir: str, full: StateDict, config: GPTConfig, tokenizer_type: Optional[str] = None,
                      tokenizer_model: Optional[str] = None, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False, meta: Optional[dict] = None, vocab_size: Optional[int] = None,
                      where: str = "checkpoint") -> str:
    """Write config.json, model.safetensors and tokenizer files; the directory appears at once.

    Only the real vocabulary is written (`export_vocab_size` from ``meta``, the tokenizer or
    ``vocab_size``): HF's ``vocab_size`` is the tokenizer's, so sampling never emits a padding id."""
    from safetensors.torch import save_file

    tmp = _atomic_dir(out_dir, overwrite)
    try:
        tok = export_tokenizer(tmp, tokenizer_type, tokenizer_model)
        size = export_vocab_size(meta or {}, config.vocab_size, len(tok) if tok is not None else None, vocab_size, where)
        full, config = unpad_vocab(full, config, size)
        extra = {"torch_dtype": str(dtype).replace("torch.", "")}
        if tok is not None:
            extra.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        try:
            adapter = hf_adapter(config)
            tensors = {k: v.to(dtype).contiguous() for k, v in adapter.to_hf_state_dict(full, config).items()}
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(adapter.hf_config_dict(config, **extra), f, indent=2)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_hf_directory(path: str, vocab_divisible_by: int = 1, tensor_parallel: int = 1) -> Tuple[StateDict, GPTConfig, int]:
    """A local HF Llama / Mistral / Qwen2 / GPT-2 directory -> (TP=1 GPTModel state dict, GPTConfig, HF
    vocabulary size), fp32.

    The vocabulary is padded (new rows zero) to a multiple of ``vocab_divisible_by`` x ``tensor_parallel``
    (Megatron's rule, the trainer's) so that it splits across TP ranks; the returned HF size is what an
    export keeps. Every field of config.json and every tensor is used or refused (see
    `hf_llama` / `hf_gpt2`: ``config_from_hf``, ``from_hf_state_dict``).
    """
    from safetensors import safe_open

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
    with open(cfg_path, encoding="utf-8") as f:
        hf_cfg = json.load(f)
    adapter = hf_adapter_for(hf_cfg)
    try:
        config = adapter.config_from_hf(hf_cfg)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (convert .bin weights with transformers first)")
    hf_sd, origin = {}, {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                if name in origin:  # two files would silently overwrite one another
                    raise CheckpointError(f"{path}: tensor {name} is in both {os.path.basename(origin[name])} and "
                                          f"{os.path.basename(f)}")
                origin[name] = f
                hf_sd[name] = st.get_tensor(name).float()
    try:
        full = adapter.from_hf_state_dict(hf_sd, config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    hf_vocab = config.vocab_size
    # Megatron's rule, as the trainer pads: a multiple of divisible_by x TP (so the same flags give the same rows)
    full, config = pad_vocab(full, config, max(vocab_divisible_by, 1) * max(tensor_parallel, 1))
    return full, config, hf_vocab


# --------------------------------------------------------------------------- evaluations
def resolve_tokenizer(ckpt_path: str, meta: dict) -> Tuple[Optional[str], Optional[str]]:
    tok = meta.get("tokenizer") or {}
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}  # the trainer's --tokenizer-* flags
    kind = tok.get("type") or args.get("tokenizer_type")
    model = tok.get("model") or args.get("tokenizer_model")
    if model and not os.path.isabs(model) and os.path.exists(os.path.join(ckpt_path, model)):
        model = os.path.join(ckpt_path, model)
    return kind, model


def load_checkpoint_as_hf(path: str, dtype: torch.dtype = torch.float32, tokenizer_type: Optional[str] = None,
                          tokenizer_model: Optional[str] = None):
    """A checkpoint -> (in-memory Hugging Face model, HF tokenizer), for the evaluations' ``--model CKPT``."""
    full, config, meta = read_checkpoint(path)
    kind, model_path = resolve_tokenizer(path, meta)
    kind, model_path = tokenizer_type or kind, tokenizer_model or model_path
    if not model_path:
        raise CheckpointError(f"{path}: the checkpoint records no tokenizer; convert it with tools/convert_to_hf.py "
                              "--tokenizer-model PATH")
    with tempfile.TemporaryDirectory() as tmp:
        tok = export_tokenizer(tmp, kind, model_path)
    # The model's outputs range over the real vocabulary only, as in an export.
    full, config = unpad_vocab(full, config, export_vocab_size(meta, config.vocab_size, len(tok), where=path))
    return hf_model_from_state_dict(full, config, dtype), tok


_TAG_RE = re.compile(r"^[\w.\-]+$")


def check_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise ValueError(f"checkpoint tag {tag!r} must be letters, digits, '.', '-' or '_'")
    return tag
