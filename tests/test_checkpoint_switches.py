"""Megatron's load/save switches without the trainer: --ckpt-step, keep-last-K / --save-retain-interval
(deletion after the new checkpoint is complete, atomic against a crash), checkpoints saved without optimizer
or RNG state, --exit-on-missing-checkpoint, --use-checkpoint-args, and the flags' start-up checks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_slung.training import checkpointing as ckpt
from megatron_slung.training.arguments import ArgumentError, parse_args
from tests.test_checkpointing import FIELDS, FIXED, RUN, FakeEngine, _checkpoint_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer_save(save_dir, iteration, **kw):
    """A checkpoint as the trainer writes it (it has an LR-schedule state: not a weights-only import)."""
    state = {"consumed_train_samples": 8 * iteration, "scheduler": {"num_steps": iteration}}
    return ckpt.save_checkpoint(FakeEngine(iteration), str(save_dir), iteration, state, {"lr": 0.1}, **kw)


def _iterations(save_dir):
    return [it for it, _tag in ckpt.list_checkpoints(str(save_dir))]


# --------------------------------------------------------------------------- --ckpt-step
def test_ckpt_step_picks_an_iteration_or_names_those_there(tmp_path):
    for it in (2, 4, 6):
        _trainer_save(tmp_path, it)
    assert ckpt.find_checkpoint(str(tmp_path)) == (str(tmp_path), "iter_0000006")
    assert ckpt.find_checkpoint(str(tmp_path), step=4) == (str(tmp_path), "iter_0000004")
    assert ckpt.read_checkpoint_metadata(str(tmp_path), step=2).iteration == 2
    with pytest.raises(RuntimeError, match=r"no complete checkpoint of iteration 5 in .*; it has iterations \[2, 4, 6\]"):
        ckpt.find_checkpoint(str(tmp_path), step=5)
    os.makedirs(tmp_path / "iter_0000005")  # a directory without slung_state.pt is not a checkpoint
    with pytest.raises(RuntimeError, match="no complete checkpoint of iteration 5"):
        ckpt.find_checkpoint(str(tmp_path), step=5)
    # the same iteration saved twice while `latest` named it: the one `latest` names
    _trainer_save(tmp_path, 6)
    assert ckpt.read_latest(str(tmp_path)) == "iter_0000006_1"
    assert ckpt.find_checkpoint(str(tmp_path), step=6) == (str(tmp_path), "iter_0000006_1")


def test_ckpt_step_through_the_flags(tmp_path):
    _checkpoint_with(tmp_path)  # iteration 3 in tmp_path/ckpt
    args = parse_args(RUN + ["--load", str(tmp_path / "ckpt"), "--ckpt-step", "3", "--finetune"], world_size=1)
    assert args.load_metadata.path.endswith("iter_0000003")
    with pytest.raises(ArgumentError, match=r"--ckpt-step 7: there is no complete checkpoint of iteration 7 .* \[3\]"):
        parse_args(RUN + ["--load", str(tmp_path / "ckpt"), "--ckpt-step", "7"], world_size=1)
    # asking for an iteration of a directory that is not there is an error even when --load is --save
    with pytest.raises(ArgumentError, match="does not exist .* --ckpt-step 1 asks for one of its checkpoints"):
        parse_args(FIXED + ["--load", str(tmp_path / "new"), "--save", str(tmp_path / "new"), "--ckpt-step", "1"],
                   world_size=1)


# --------------------------------------------------------------------------- keep-last-K, --save-retain-interval
@pytest.mark.parametrize("retain, keep, kept", [
    (None, 2, [5, 6]), (4, None, [4, 6]), (4, 2, [4, 5, 6]), (None, None, [1, 2, 3, 4, 5, 6])])
def test_old_checkpoints_are_deleted_by_policy(tmp_path, retain, keep, kept):
    for it in range(1, 7):
        _trainer_save(tmp_path, it)
        ckpt.prune_checkpoints(str(tmp_path), it, retain_interval=retain, keep_last=keep)
    assert _iterations(tmp_path) == kept and ckpt.read_latest(str(tmp_path)) == "iter_0000006"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(ckpt.TMP_PREFIX)]


def test_pruning_never_touches_latest_nor_newer_checkpoints(tmp_path):
    for it in (2, 4, 6):
        _trainer_save(tmp_path, it)
    # a run rolled back to iteration 2 (--ckpt-step 2) saves iteration 3: 4 and 6 are newer, they stay
    _trainer_save(tmp_path, 3)
    assert ckpt.prune_checkpoints(str(tmp_path), 3, keep_last=1) == ["iter_0000002"]
    assert _iterations(tmp_path) == [3, 4, 6]
    # `latest` naming an older one (a save that crashed before updating it): that one is kept
    ckpt.write_text_atomic(str(tmp_path / "latest"), "iter_0000003\n")
    assert ckpt.prune_checkpoints(str(tmp_path), 6, keep_last=1) == ["iter_0000004"]
    assert _iterations(tmp_path) == [3, 6]


def test_a_crash_while_deleting_leaves_nothing_that_looks_like_a_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from tests.test_checkpoint_switches import _trainer_save
        from megatron_slung.training import checkpointing as ckpt
        for it in (1, 2, 3):
            _trainer_save({str(tmp_path)!r}, it)
            ckpt.prune_checkpoints({str(tmp_path)!r}, it, keep_last=1)   # dies deleting iteration 1
        print("not reached")
    """)
    env = dict(os.environ, SLUNG_CHECKPOINT_CRASH_AT="while_deleting", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr
    assert sorted(os.listdir(tmp_path)) == [".tmp-deleting-iter_0000001", "iter_0000002", "latest"]
    assert _iterations(tmp_path) == [2] and ckpt.read_latest(str(tmp_path)) == "iter_0000002"
    with pytest.raises(RuntimeError, match=r"iteration 1 .* it has iterations \[2\]"):  # not loadable by --ckpt-step
        ckpt.find_checkpoint(str(tmp_path), step=1)
    _trainer_save(tmp_path, 3)  # the next save removes the leftover
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000003", "latest"]


def test_retention_flags_are_checked_at_start(tmp_path):
    save = ["--save", str(tmp_path)]
    with pytest.raises(ArgumentError, match=r"--save-retain-interval \(3\) must be a multiple of --save-interval \(2\)"):
        parse_args(FIXED + save + ["--save-interval", "2", "--save-retain-interval", "3"], world_size=1)
    with pytest.raises(ArgumentError, match=r"must be a multiple of --save-interval \(None\)"):
        parse_args(FIXED + save + ["--save-retain-interval", "4"], world_size=1)
    with pytest.raises(ArgumentError, match="--keep-last-checkpoints must be >= 1, got 0"):
        parse_args(FIXED + save + ["--keep-last-checkpoints", "0"], world_size=1)
    with pytest.raises(ArgumentError, match="--keep-last-checkpoints needs --save DIR"):
        parse_args(FIXED + ["--keep-last-checkpoints", "2"], world_size=1)
    args = parse_args(FIXED + save + ["--save-interval", "2", "--save-retain-interval", "4", "--keep-last-checkpoints",
                                      "3"], world_size=1)
    assert (args.save_retain_interval, args.keep_last_checkpoints) == (4, 3)


# --------------------------------------------------------------------------- saved without optimizer / RNG
class FakeZeroEngine(FakeEngine):
    """Writes the optimizer state the way DeepSpeed does: into the model-states file (no ZeRO) and a ZeRO file."""

    def __init__(self, value):
        super().__init__(value)
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        self.save_zero_checkpoint = True

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        super().save_checkpoint(save_dir, tag, save_latest)
        torch.save({"optimizer": self.optimizer.state_dict()}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        if self.save_zero_checkpoint:
            torch.save({"optimizer_state_dict": self.optimizer.state_dict()},
                       os.path.join(save_dir, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def test_no_save_optim_and_no_save_rng_leave_them_out_and_say_so(tmp_path):
    engine = FakeZeroEngine(1)
    state = {"consumed_train_samples": 8, "scheduler": {"num_steps": 1}}
    full = ckpt.save_checkpoint(engine, str(tmp_path / "full"), 1, state, {})
    bare = ckpt.save_checkpoint(engine, str(tmp_path / "bare"), 1, state, {}, save_optim=False, save_rng=False)
    assert sorted(os.listdir(full)) == ["args.json", "model.pt", "mp_rank_00_model_states.pt", "rng_state_rank00000.pt",
                                        "slung_state.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert sorted(os.listdir(bare)) == ["args.json", "model.pt", "mp_rank_00_model_states.pt", "slung_state.pt"]
    assert torch.load(os.path.join(bare, "mp_rank_00_model_states.pt"), weights_only=True)["optimizer"] is None
    assert "state_dict" not in vars(engine.optimizer) and engine.save_zero_checkpoint  # the engine is as it was
    meta_full, meta_bare = (ckpt.read_checkpoint_metadata(str(tmp_path / d)) for d in ("full", "bare"))
    assert (meta_full.saved_optimizer, meta_full.saved_rng, meta_full.release) == (True, True, False)
    assert (meta_bare.saved_optimizer, meta_bare.saved_rng, meta_bare.release) == (False, False, False)


def test_loading_what_was_not_saved_is_refused_naming_the_flags(tmp_path):
    save = tmp_path / "ckpt"
    _checkpoint_with(tmp_path)  # writes tmp_path/ckpt (iteration 3); now a trainer checkpoint without optimizer/RNG
    state = {"consumed_train_samples": 0, "scheduler": {"num_steps": 3},
             **{k: v for k, v in ckpt.load_train_state(str(save / "iter_0000003")).items()
                if k in ("model_architecture", "layout")}}
    ckpt.save_checkpoint(FakeZeroEngine(1), str(save), 4, state, {}, save_optim=False, save_rng=False)
    load = ["--load", str(save)]
    with pytest.raises(ArgumentError, match=r"iter_0000004 was saved without its optimizer state \(--no-save-optim\); "
                                            "pass --no-load-optim .*, or --finetune"):
        parse_args(RUN + load, world_size=1)
    with pytest.raises(ArgumentError, match=r"saved without its RNG states \(--no-save-rng\); pass --no-load-rng"):
        parse_args(RUN + load + ["--no-load-optim"], world_size=1)
    args = parse_args(RUN + load + ["--no-load-optim", "--no-load-rng"], world_size=1)
    assert args.load_metadata.iteration == 4 and not args.finetune
    assert parse_args(RUN + load + ["--finetune"], world_size=1).load_metadata.iteration == 4


def test_a_weights_only_import_loads_as_finetune(tmp_path):
    """Megatron: a release checkpoint is loaded as --finetune. (Before, it went on to read an LR schedule and
    data position it does not have.)"""
    _checkpoint_with(tmp_path)  # like tools/convert_from_hf.py: no LR-schedule state
    args = parse_args(RUN + ["--load", str(tmp_path / "ckpt")], world_size=1)
    assert args.finetune and args.load_metadata.release
    assert any("holds weights only (a release checkpoint" in n and "loading it as --finetune" in n
               for n in args.load_notes)


# --------------------------------------------------------------------------- --exit-on-missing-checkpoint
def test_exit_on_missing_checkpoint_also_refuses_a_job_that_resumes_itself(tmp_path):
    new = str(tmp_path / "new")
    assert parse_args(FIXED + ["--load", new, "--save", new], world_size=1).load_metadata is None  # fresh, warned
    with pytest.raises(ArgumentError, match=f"--load {new} does not exist, and --exit-on-missing-checkpoint is set"):
        parse_args(FIXED + ["--load", new, "--save", new, "--exit-on-missing-checkpoint"], world_size=1)
    with pytest.raises(ArgumentError, match="--exit-on-missing-checkpoint needs --load"):
        parse_args(FIXED + ["--exit-on-missing-checkpoint"], world_size=1)


# --------------------------------------------------------------------------- --use-checkpoint-args
def _replace_saved_args(save_dir, saved_args: dict) -> None:
    """Make the checkpoint's slung_state.pt say these were the arguments of the run that saved it."""
    path = ckpt.find_checkpoint(str(save_dir))
    state = ckpt.load_train_state(os.path.join(*path))
    state["args_json"] = json.dumps(saved_args)
    del state["args"]
    torch.save(state, os.path.join(*path, ckpt.STATE_FILE))


def test_use_checkpoint_args_overrides_megatrons_forced_settings_one_line_each(tmp_path):
    _checkpoint_with(tmp_path)
    # the checkpoint's arguments (as a trainer run saves them) give the sequence length and dropout too
    _replace_saved_args(tmp_path / "ckpt", {"seq_length": 48, "hidden_dropout": 0.1})
    run = [a for a in RUN if a not in ("--seq-length", "32")]
    given = ["--rotary-base", "10000", "--num-query-groups", "2", "--hidden-dropout", "0.2"]
    with pytest.raises(ArgumentError, match="contradicts the checkpoint"):  # without the switch: refused
        parse_args(run + ["--seq-length", "32", "--load", str(tmp_path / "ckpt"), "--finetune"] + given, world_size=1)
    args = parse_args(run + ["--load", str(tmp_path / "ckpt"), "--finetune", "--use-checkpoint-args"] + given,
                      world_size=1)
    for name, (_flag, saved) in FIELDS.items():
        assert getattr(args, name) == saved, name
    assert (args.seq_length, args.hidden_dropout) == (48, 0.1)
    overridden = [n for n in args.load_notes if n.startswith("--use-checkpoint-args:")]
    assert sorted(overridden) == sorted(
        f"--use-checkpoint-args: {a} -> {b} (the checkpoint's value replaces the flag given)"
        for a, b in [("--rotary-base 10000.0", "--rotary-base 500000.0"), ("--num-query-groups 2", "--num-query-groups 3"),
                     ("--hidden-dropout 0.2", "--hidden-dropout 0.1")])
    # Megatron keeps a given --num-layers (its force=False set); here a contradicting one is still refused
    with pytest.raises(ArgumentError, match="--num-layers 4 contradicts the checkpoint"):
        parse_args(run + ["--load", str(tmp_path / "ckpt"), "--finetune", "--use-checkpoint-args", "--num-layers", "4"],
                   world_size=1)
    with pytest.raises(ArgumentError, match="--use-checkpoint-args needs --load"):
        parse_args(FIXED + ["--use-checkpoint-args"], world_size=1)


def test_use_checkpoint_args_finds_an_imports_tokenizer_beside_the_checkpoint(tmp_path):
    """tools/convert_from_hf.py saves --tokenizer-model as "tokenizer", a directory beside the checkpoint."""
    _checkpoint_with(tmp_path)
    _replace_saved_args(tmp_path / "ckpt", {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "tokenizer"})
    (tmp_path / "ckpt" / "tokenizer").mkdir()
    args = parse_args([a for a in RUN if a not in ("--vocab-size", "256")] + ["--load", str(tmp_path / "ckpt"),
                                                                             "--use-checkpoint-args"], world_size=1)
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.tokenizer_model == str(tmp_path / "ckpt" / "tokenizer")


# --------------------------------------------------------------------------- exit flags
def test_exit_flags_are_checked_at_start(tmp_path):
    args = parse_args(FIXED + ["--exit-signal-handler", "--exit-signal", "usr1", "--exit-duration-in-mins", "0.5"],
                      world_size=1)
    assert (args.exit_signal_handler, args.exit_signal, args.exit_duration_in_mins) == (True, "SIGUSR1", 0.5)
    assert parse_args(FIXED + ["--exit-signal-handler"], world_size=1).exit_signal == "SIGTERM"  # Megatron's default
    with pytest.raises(ArgumentError, match="'SIGKILL' is not a signal a process can catch"):
        parse_args(FIXED + ["--exit-signal-handler", "--exit-signal", "SIGKILL"], world_size=1)
    with pytest.raises(ArgumentError, match="--exit-signal SIGUSR1 has no effect without --exit-signal-handler"):
        parse_args(FIXED + ["--exit-signal", "SIGUSR1"], world_size=1)
    with pytest.raises(ArgumentError, match="--exit-duration-in-mins must be > 0"):
        parse_args(FIXED + ["--exit-duration-in-mins", "0"], world_size=1)
    with pytest.raises(ArgumentError, match="--no-save-optim cannot be used with ZeRO stage 3"):
        parse_args(FIXED + ["--no-save-optim", "--zero-stage", "3"], world_size=1)
