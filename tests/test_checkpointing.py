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


# --------------------------------------------------------------------------- metadata: architecture and layout
from megatron_slung.model.gpt import GPTConfig, architecture_fields  # noqa: E402
from megatron_slung.training.arguments import ArgumentError, parse_args  # noqa: E402

# The run's flags besides the model's (NullTokenizer with 256 tokens, mock data).
RUN = ["--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3", "--mock-data",
       "--vocab-size", "256"]
# A model flag set for every architecture field: (flag value for the run, the checkpoint's different value).
# A field added to GPTConfig is recorded and checked without any change in checkpointing.py; it needs a row here.
FIELDS = {
    "num_layers": ("4", 2), "hidden_size": ("64", 48), "num_attention_heads": ("4", 6),
    "ffn_hidden_size": ("96", 80), "num_query_groups": ("2", 3), "kv_channels": ("16", 10),
    "max_position_embeddings": ("64", 96), "rotary_base": ("10000", 500000.0), "norm_epsilon": ("1e-5", 1e-6),
    "untie_embeddings_and_output_weights": (None, True),  # a switch: its absence cannot contradict
    "position_embedding_type": ("none", "rope"), "rotary_percent": ("1.0", 0.4), "normalization": ("RMSNorm", "LayerNorm"),
    "apply_layernorm_1p": (None, True), "qk_layernorm": (None, True), "swiglu": (None, False),
    "openai_gelu": (None, True), "add_bias_linear": (None, False), "add_qkv_bias": (None, True),
}
# What a checkpoint written before a field existed holds: the model this project built then (Llama style).
LEGACY = {"position_embedding_type": "rope", "rotary_percent": 1.0, "normalization": "RMSNorm",
          "apply_layernorm_1p": False, "qk_layernorm": False, "swiglu": True, "openai_gelu": False,
          "add_bias_linear": False, "add_qkv_bias": False}


def _checkpoint_with(tmp_path, recorded=True, tokenizer_vocab=256, divisor=128, tp=1, **model):
    values = {name: saved for name, (_flag, saved) in FIELDS.items()}
    values.update(model)
    config = GPTConfig(vocab_size=256, **values)
    state = {"consumed_train_samples": 0}
    args = {"num_layers": 99}  # what an older checkpoint's arguments would say, to tell them apart
    if recorded:
        state["model_architecture"] = ckpt.model_architecture(config, tokenizer_vocab, divisor)
        state["layout"] = ckpt.layout(tp, 1, 1, 1, False)
    else:
        args = {**values, "padded_vocab_size": 256, "make_vocab_size_divisible_by": divisor,
                "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1}
    return ckpt.save_checkpoint(FakeEngine(1), str(tmp_path / "ckpt"), 3, state, args)


def test_metadata_records_the_architecture_and_layout_without_reading_weights(tmp_path):
    path = _checkpoint_with(tmp_path)
    os.remove(os.path.join(path, "model.pt"))  # no weight is needed to read it
    meta = ckpt.read_checkpoint_metadata(str(tmp_path / "ckpt"))
    assert meta.path == path and meta.iteration == 3 and meta.recorded
    arch = meta.architecture
    assert arch["version"] == ckpt.ARCHITECTURE_VERSION and arch["padded_vocab_size"] == 256
    assert arch["tokenizer_vocab_size"] == 256 and arch["make_vocab_size_divisible_by"] == 128
    assert set(arch["model"]) == set(architecture_fields()) - {"vocab_size"}
    assert arch["model"]["rotary_base"] == 500000.0 and "init_method_std" not in arch["model"]
    assert meta.layout == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                           "data_parallel_size": 1, "world_size": 1, "zero_stage": 1, "sequence_parallel": False}
    assert ckpt.read_checkpoint_metadata(str(tmp_path / "empty")) is None


def test_every_architecture_field_is_covered():
    assert set(FIELDS) == set(architecture_fields()) - {"vocab_size"}


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-checkpoint"])
def test_model_flags_not_given_are_adopted_from_the_checkpoint(tmp_path, recorded):
    _checkpoint_with(tmp_path, recorded=recorded)
    args = parse_args(RUN + ["--load", str(tmp_path / "ckpt"), "--finetune"], world_size=1)
    for name, (_flag, saved) in FIELDS.items():
        # An older checkpoint's saved arguments are not read for fields that came later (their flags were
        # accepted and ignored then): it is the model of that time.
        expected = LEGACY[name] if name in LEGACY and not recorded else saved
        assert getattr(args, name) == expected, name
    assert len([n for n in args.load_notes if n.startswith("model settings from the checkpoint")]) == 1
    assert "--rotary-base 500000.0" in args.load_notes[0] and "--untie-embeddings-and-output-weights" in args.load_notes[0]
    assert any("older checkpoint" in n for n in args.load_notes) == (not recorded)
    assert args.load_metadata.path.endswith("iter_0000003")


@pytest.mark.parametrize("name", [n for n, (flag, _) in FIELDS.items() if flag is not None])
def test_a_model_flag_that_contradicts_the_checkpoint_is_refused(tmp_path, name):
    _checkpoint_with(tmp_path)
    value = FIELDS[name][0]
    argv = RUN + ["--load", str(tmp_path / "ckpt"), "--finetune", "--" + name.replace("_", "-"), value]
    if name == "max_position_embeddings":  # RoPE: a longer (or other) context is a fine-tuning choice
        assert any(n.startswith("note: --max-position-embeddings 64") for n in parse_args(argv, world_size=1).load_notes)
        return
    with pytest.raises(ArgumentError) as e:
        parse_args(argv, world_size=1)
    assert f"--{name.replace('_', '-')} {type(FIELDS[name][1])(value)} contradicts the checkpoint" in str(e.value)
    assert f"whose model has {name} = {FIELDS[name][1]!r}" in str(e.value)


def test_a_switch_that_contradicts_the_checkpoint_and_a_config_file_count_as_given(tmp_path):
    _checkpoint_with(tmp_path, untie_embeddings_and_output_weights=False)
    with pytest.raises(ArgumentError, match="--untie-embeddings-and-output-weights contradicts the checkpoint"):
        parse_args(RUN + ["--load", str(tmp_path / "ckpt"), "--untie-embeddings-and-output-weights"], world_size=1)
    config = tmp_path / "flags.yaml"
    config.write_text("rotary-base: 10000\n")
    with pytest.raises(ArgumentError, match="--rotary-base 10000.0 contradicts"):
        parse_args(RUN + ["--config", str(config), "--load", str(tmp_path / "ckpt")], world_size=1)


def test_a_longer_context_is_refused_for_learned_positions(tmp_path):
    _checkpoint_with(tmp_path, position_embedding_type="learned_absolute", rotary_percent=1.0)
    argv = RUN + ["--load", str(tmp_path / "ckpt"), "--max-position-embeddings", "64"]
    with pytest.raises(ArgumentError, match="--max-position-embeddings 64 contradicts the checkpoint, whose model "
                                            "has max_position_embeddings = 96"):
        parse_args(argv, world_size=1)


def test_the_bias_switch_is_named_by_its_megatron_flag(tmp_path):
    _checkpoint_with(tmp_path, add_bias_linear=True)
    with pytest.raises(ArgumentError, match="--disable-bias-linear contradicts the checkpoint, whose model has "
                                            "add_bias_linear = True"):
        parse_args(RUN + ["--load", str(tmp_path / "ckpt"), "--disable-bias-linear"], world_size=1)
    _checkpoint_with(tmp_path / "nobias", add_bias_linear=False)
    args = parse_args(RUN + ["--load", str(tmp_path / "nobias" / "ckpt")], world_size=1)
    adopted = [n for n in args.load_notes if n.startswith("model settings from the checkpoint")]
    assert args.add_bias_linear is False and len(adopted) == 1 and "--disable-bias-linear" in adopted[0]


def test_a_checkpoint_recorded_before_the_architecture_switches_loads_as_the_llama_model_it_was(tmp_path):
    """A version-1 record names only the sizes. With today's (Megatron, GPT-3 style) flag defaults the run
    adopts what that model was: RoPE, RMSNorm, SwiGLU, no biases; the built model has its tensors."""
    from megatron_slung.model.gpt import GPTModel
    from megatron_slung.training.pretrain import gpt_config_from_args

    config = GPTConfig(vocab_size=256, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                       max_position_embeddings=32)
    record = ckpt.model_architecture(config, 256, 128)
    for name in LEGACY:
        del record["model"][name]
    state = {"consumed_train_samples": 0, "model_architecture": record, "layout": ckpt.layout(1, 1, 1, 1, False)}
    ckpt.save_checkpoint(FakeEngine(1), str(tmp_path / "ckpt"), 3, state, {"num_layers": 99, "hidden_dropout": 0.0})
    args = parse_args(RUN + ["--load", str(tmp_path / "ckpt")], world_size=1)
    # dropout is the run's (Megatron's default now), said in a note: the old run had 0
    assert "note: --hidden-dropout 0.1 (the default), the checkpoint's run had 0.0; give --hidden-dropout 0.0" in \
        " ".join(args.load_notes)
    assert args.position_embedding_type == "rope" and args.normalization == "RMSNorm" and args.swiglu
    assert not args.add_bias_linear and args.ffn_hidden_size == 48
    built = gpt_config_from_args(args, 256)
    ckpt.check_model_config(args.load_metadata, built)  # the same model, field by field
    names = set(GPTModel(built).state_dict())
    assert names == set(GPTModel(config).state_dict())
    assert not any(n.endswith(".bias") or "position_embeddings" in n for n in names)


def test_another_layout_is_accepted_and_one_that_cannot_hold_the_model_refused_before_loading(tmp_path):
    """A checkpoint saved at TP 2 resumes at TP 1 (converted on load, tests/test_reshard.py); a layout whose
    sizes do not divide the checkpoint's model is refused naming the value, with no weight file there at all."""
    path = _checkpoint_with(tmp_path, tp=2, num_attention_heads=4, num_query_groups=2, num_layers=2)
    os.remove(os.path.join(path, "model.pt"))
    parse_args(RUN + ["--load", str(tmp_path / "ckpt")], world_size=1)
    for flags, world, message in [
        (["--tensor-model-parallel-size", "4"], 4, "--tensor-model-parallel-size 4 cannot hold the checkpoint's "
                                                   r"model: its num-query-groups \(2\) is not divisible by 4"),
        (["--tensor-model-parallel-size", "3"], 3, r"its num-attention-heads \(4\) is not divisible by 3"),
        (["--pipeline-model-parallel-size", "4"], 4, r"--pipeline-model-parallel-size 4 cannot hold the "
                                                     r"checkpoint's model: its num-layers \(2\) is not divisible"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            parse_args(RUN + ["--load", str(tmp_path / "ckpt")] + flags, world_size=world)


def test_the_padded_vocabulary_is_the_checkpoints_or_refused(tmp_path):
    _checkpoint_with(tmp_path, tokenizer_vocab=250, divisor=1)  # 256 rows for 250 tokens

    def resolve(vocab, *extra):
        args = parse_args(RUN + ["--load", str(tmp_path / "ckpt"), *extra], world_size=1)
        return ckpt.resolve_padded_vocab(args.load_metadata, args, args.explicit_flags, vocab), args

    (rows, note), args = resolve(250)
    assert rows == 256 and note is None  # pad(250, divisor 128) = 256 as well
    (rows, note), args = resolve(252)  # two added tokens take padding rows
    assert rows == 256 and "the tokenizer has 252 tokens, the checkpoint's had 250" in note
    with pytest.raises(ArgumentError, match="the tokenizer has 257 tokens, more than the checkpoint's 256"):
        resolve(257)
    with pytest.raises(ArgumentError, match="the tokenizer has 200 tokens, the checkpoint's model was made for 250"):
        resolve(200)
    with pytest.raises(ArgumentError, match="--make-vocab-size-divisible-by 1 pads the tokenizer's 250 tokens to 250 "
                                            "rows at TP 1, but the checkpoint has 256"):
        resolve(250, "--make-vocab-size-divisible-by", "1")
    assert ckpt.resolve_padded_vocab(None, args, frozenset(), 250) == (256, None)  # no checkpoint: Megatron's padding


def test_a_built_model_that_is_not_the_checkpoints_is_refused(tmp_path):
    """The last check, on the GPTConfig about to be built: catches a field no flag sets."""
    _checkpoint_with(tmp_path)
    meta = ckpt.read_checkpoint_metadata(str(tmp_path / "ckpt"))
    values = {name: saved for name, (_flag, saved) in FIELDS.items()}
    ckpt.check_model_config(meta, GPTConfig(vocab_size=256, **values))
    with pytest.raises(ArgumentError, match="rotary_base: the checkpoint's 500000.0, this run's 10000.0"):
        ckpt.check_model_config(meta, GPTConfig(vocab_size=256, **{**values, "rotary_base": 10000.0}))
    with pytest.raises(ArgumentError, match="padded vocabulary: the checkpoint's 256, this run's 384"):
        ckpt.check_model_config(meta, GPTConfig(vocab_size=384, **values))


# --------------------------------------------------------------------------- --load naming no checkpoint
def test_load_without_a_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArgumentError, match=f"--load {empty} holds no checkpoint .*--finetune asks to start from"):
        parse_args(FIXED + ["--load", str(empty), "--finetune"], world_size=1)
    with pytest.raises(ArgumentError, match=f"--load {empty} holds no checkpoint .*; give a checkpoint, or .* --save {empty} as well"):
        parse_args(FIXED + ["--load", str(empty), "--save", str(tmp_path / "other")], world_size=1)
    with pytest.raises(ArgumentError, match=f"--load {tmp_path / 'missing'} does not exist"):
        parse_args(FIXED + ["--load", str(tmp_path / "missing")], world_size=1)
    with pytest.raises(ArgumentError, match="--no-load-optim asks to start from its weights"):  # load == save, but
        parse_args(FIXED + ["--load", str(empty), "--save", str(empty), "--no-load-optim"], world_size=1)
    # A job that resumes itself (--load = --save) starts fresh the first time, with a warning.
    for load in (empty, tmp_path / "not-yet"):
        args = parse_args(FIXED + ["--load", str(load), "--save", str(load) + "/"], world_size=1)
        assert args.load_metadata is None and args.load_notes[0].startswith(f"WARNING: --load {load}")
        assert "starting from scratch" in args.load_notes[0]


FIXED = RUN + ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
