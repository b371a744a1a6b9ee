"""Flags: Megatron names, config files, validation messages, and the DeepSpeed config made from them."""

import json

import pytest

from megatron_slung.training.arguments import ArgumentError, args_to_dict, build_parser, parse_args
from megatron_slung.training.deepspeed_config import STEPS_PER_PRINT

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--vocab-size", "100"]


def parse(*extra, world_size=1):
    return parse_args(BASE + list(extra), world_size=world_size)


def test_defaults_and_derived_values():
    a = parse("--global-batch-size", "16", world_size=4)
    assert a.data_parallel_size == 4 and a.gradient_accumulation_steps == 2
    assert a.ffn_hidden_size == 256 and a.num_query_groups == 8 and a.kv_channels == 8
    assert a.max_position_embeddings == 32 and a.lr_decay_iters == 10 and a.lr_warmup_iters == 0
    assert a.zero_stage == 0 and a.params_dtype == "float32" and a.clip_grad == 1.0
    assert a.tokenizer_type == "NullTokenizer" and a.risk_loss_policy == "ce"
    b = parse(world_size=2)  # global batch defaults to micro x DP
    assert b.global_batch_size == 4 and b.gradient_accumulation_steps == 1
    c = parse("--lr-warmup-fraction", "0.25", "--lr-decay-iters", "8")
    # Megatron: the warmup is that fraction of the decay's samples (not rounded to whole iterations)
    from megatron_slung.training.schedules import schedule_steps

    assert c.lr_warmup_iters == 0 and schedule_steps(c)["warmup_steps"] == 0.25 * 8 * c.global_batch_size
    json.dumps(args_to_dict(a))  # everything saved with checkpoints is plain JSON


@pytest.mark.parametrize(
    "extra, world_size, message",
    [
        (["--tensor-model-parallel-size", "3"], 3, r"--num-attention-heads \(8\) is not divisible by --tensor-model-parallel-size \(3\)"),
        (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4, r"--num-query-groups \(2\) is not divisible"),
        (["--group-query-attention", "--num-query-groups", "3"], 1, r"multiple of --num-query-groups \(3\)"),
        (["--pipeline-model-parallel-size", "3"], 3, r"--num-layers \(4\) is not divisible by --pipeline-model-parallel-size \(3\)"),
        (["--global-batch-size", "6"], 2, r"--global-batch-size \(6\) is not divisible by --micro-batch-size \(2\) x data-parallel size \(2\)"),
        (["--tensor-model-parallel-size", "2"], 3, r"world size 3 is not divisible"),
        (["--zero-stage", "2", "--pipeline-model-parallel-size", "2"], 2, r"ZeRO stage 2 cannot be combined with pipeline"),
        (["--fp16", "--bf16"], 1, r"--fp16 and --bf16 cannot be used together"),
        (["--seq-length", "64", "--max-position-embeddings", "32"], 1, r"exceeds --max-position-embeddings"),
        (["--min-lr", "1"], 1, r"--min-lr \(1.0\) is larger than --lr"),
        (["--lr-warmup-iters", "20"], 1, r"--lr-warmup-iters \(20\) is larger than --lr-decay-iters \(10\)"),
        (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], 1, r"not both"),
        (["--risk-loss-policy", "3:forget"], 1, r"--risk-loss-policy: .*unknown mode 'forget'"),
        (["--data-path", "x"], 1, r"--data-path or --mock-data, not both"),
        (["--save-interval", "5"], 1, r"--save-interval needs --save"),
        (["--label-smoothing", "1.5"], 1, r"--label-smoothing must be in"),
        (["--fused-linear-ce", "--pipeline-model-parallel-size", "2"], 2, r"--fused-linear-ce is not supported with pipeline"),
        (["--fused-linear-ce", "--zero-stage", "3"], 1, r"--fused-linear-ce is not supported with ZeRO stage 3"),
        (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "33", "--max-position-embeddings", "64"], 2,
         r"--sequence-parallel needs --seq-length \(33\) divisible"),
    ],
)
def test_bad_combinations_fail_with_a_clear_message(extra, world_size, message):
    with pytest.raises(ArgumentError, match=message):
        parse(*extra, world_size=world_size)


def test_missing_required_and_data_flags():
    with pytest.raises(ArgumentError, match="--lr is required"):
        parse_args([x for x in BASE if x not in ("--lr", "1e-3")], world_size=1)
    no_data = [x for x in BASE if x != "--mock-data"]
    with pytest.raises(ArgumentError, match="give --data-path PREFIX"):
        parse_args(no_data, world_size=1)
    with pytest.raises(ArgumentError, match="needs --tokenizer-model"):
        parse_args(no_data + ["--data-path", "p", "--tokenizer-type", "SentencePieceTokenizer"], world_size=1)
    with pytest.raises(ArgumentError, match="a blend is weight/prefix pairs"):
        parse_args(no_data + ["--data-path", "0.5", "A", "0.5"], world_size=1)
    with pytest.raises(ArgumentError, match="invalid int value"):
        parse("--num-layers", "four")


def test_sequence_parallel_is_dropped_without_tensor_parallelism():
    with pytest.warns(UserWarning, match="no effect"):
        a = parse("--sequence-parallel")
    assert a.sequence_parallel is False


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_holds_flags_and_the_command_line_wins(tmp_path, suffix):
    values = {"num-layers": 4, "hidden_size": 64, "--num-attention-heads": 8, "seq-length": 32,
              "micro-batch-size": 2, "train-iters": 10, "lr": 1e-3, "mock-data": True, "vocab-size": 100,
              "bf16": True, "risk-loss-policy": "masked", "split": "98,1,1"}
    path = tmp_path / f"run.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    a = parse_args(["--config", str(path), "--lr", "5e-4", "--num-layers", "2"], world_size=1)
    assert a.lr == 5e-4 and a.num_layers == 2  # command line wins
    assert a.hidden_size == 64 and a.bf16 and a.risk_loss_policy == "masked" and a.split == "98,1,1"


def test_config_file_errors_name_the_file(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("num-layerz: 2\n")
    with pytest.raises(ArgumentError, match=r"a.yaml: unknown flag 'num-layerz'"):
        parse_args(["--config", str(bad_key)], world_size=1)
    bad_value = tmp_path / "b.json"
    bad_value.write_text('{"num-layers": "two"}')
    with pytest.raises(ArgumentError, match=r"b.json: argument --num-layers: invalid int value"):
        parse_args(["--config", str(bad_value)], world_size=1)
    bad_switch = tmp_path / "c.yaml"
    bad_switch.write_text("bf16: 1\n")
    with pytest.raises(ArgumentError, match=r"c.yaml: 'bf16' is a switch"):
        parse_args(["--config", str(bad_switch)], world_size=1)
    broken = tmp_path / "d.json"
    broken.write_text('{"num-layers": 2,,}')
    with pytest.raises(ArgumentError, match=r"d.json: cannot parse"):
        parse_args(["--config", str(broken)], world_size=1)


# --------------------------------------------------------------------------- DeepSpeed config
def test_generated_deepspeed_config():
    a = parse("--global-batch-size", "16", "--zero-stage", "1", "--bf16", "--clip-grad", "0.5", world_size=2)
    ds = a.deepspeed_config_dict
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # BF16_Optimizer with ZeRO 1
    assert ds["steps_per_print"] == STEPS_PER_PRINT
    assert "optimizer" not in ds and "scheduler" not in ds  # ours (see deepspeed_config.py)
    fp16 = parse("--fp16", "--initial-loss-scale", "65536").deepspeed_config_dict["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 16
    sp = parse("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
               world_size=4).deepspeed_config_dict
    assert sp["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}


def test_user_deepspeed_config_is_checked_and_completed(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7},
                                "gradient_clipping": 0.3, "train_batch_size": 8}))
    a = parse("--global-batch-size", "8", "--deepspeed-config", str(path), world_size=2)
    assert a.zero_stage == 2 and a.clip_grad == 0.3  # taken from the JSON when the flags are not given
    ds = a.deepspeed_config_dict
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7}  # passed through
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2

    for content, message in [
        ({"train_batch_size": 32}, r"ds.json: train_batch_size = 32 disagrees with --global-batch-size = 8"),
        ({"zero_optimization": {"stage": 1}}, r"zero_optimization.stage = 1 disagrees with --zero-stage 3"),
        ({"bf16": {"enabled": True}}, r"bf16.enabled = True disagrees with --bf16"),
        ({"optimizer": {"type": "Adam"}}, r"remove the 'optimizer' section"),
        ({"gradient_clipping": 2.0}, r"gradient_clipping = 2.0 disagrees with --clip-grad 1.0"),
    ]:
        path.write_text(json.dumps(content))
        extra = ["--zero-stage", "3"] if "zero_optimization" in content else []
        extra += ["--clip-grad", "1.0"] if "gradient_clipping" in content else []
        with pytest.raises(ArgumentError, match=message):
            parse("--global-batch-size", "8", "--deepspeed-config", str(path), *extra, world_size=2)
    path.write_text('{"train_batch_size": 8,\n "x": }')
    with pytest.raises(ArgumentError, match=r"ds.json: line 2"):
        parse("--deepspeed-config", str(path))


def test_shipped_example_deepspeed_configs_agree_with_their_flags():
    """examples/ds_config_zero{1,2,3}.json work with the flags the examples pass."""
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    for stage in (1, 2, 3):
        path = os.path.join(root, f"ds_config_zero{stage}.json")
        a = parse("--global-batch-size", "16", "--bf16", "--deepspeed-config", path, world_size=8)
        assert a.zero_stage == stage
        assert a.deepspeed_config_dict["bf16"]["enabled"]


def test_model_defaults_are_megatrons_gpt3_style():
    from megatron_slung.model.gpt import GPTModel
    from megatron_slung.training.pretrain import gpt_config_from_args

    a = parse()
    assert (a.position_embedding_type, a.normalization, a.swiglu, a.openai_gelu) == ("learned_absolute", "LayerNorm",
                                                                                      False, False)
    assert a.add_bias_linear and not a.add_qkv_bias and not a.qk_layernorm and not a.apply_layernorm_1p
    assert a.hidden_dropout == a.attention_dropout == 0.1 and a.init_method_std == 0.02 and a.rotary_percent == 1.0
    assert a.ffn_hidden_size == 4 * 64 and a.num_query_groups == 8 and not a.group_query_attention
    names = set(GPTModel(gpt_config_from_args(a, 128)).state_dict())
    assert {"embedding.position_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.bias",
            "decoder.layers.0.input_layernorm.bias"} <= names
    llama = parse("--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear")
    assert not llama.add_bias_linear and llama.ffn_hidden_size == 128  # int(4 x 64 x 2/3 / 64) x 64
    assert not any(n.endswith(".bias") or "position" in n for n in GPTModel(gpt_config_from_args(llama, 128)).state_dict())


def test_swiglu_mlp_size_default_is_megatrons():
    a = parse_args(["--num-layers", "2", "--hidden-size", "4096", "--num-attention-heads", "32", "--seq-length", "32",
                    "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size",
                    "100", "--swiglu"], world_size=1)
    assert a.ffn_hidden_size == 10880  # not 4h = 16384
    with pytest.raises(ArgumentError, match="give --ffn-hidden-size"):
        parse("--swiglu", "--hidden-size", "16", "--num-attention-heads", "2")


def test_grouped_query_attention_only_with_its_switch():
    assert parse("--group-query-attention").num_query_groups == 1  # Megatron's default number of groups
    b = parse("--group-query-attention", "--num-query-groups", "2")
    assert b.num_query_groups == 2 and b.group_query_attention
    assert parse("--num-query-groups", "8").num_query_groups == 8  # = heads: the model without GQA
    with pytest.raises(ArgumentError, match="--num-query-groups 2 needs --group-query-attention"):
        parse("--num-query-groups", "2")


def test_architecture_flag_combinations():
    assert parse("--use-rotary-position-embeddings").position_embedding_type == "rope"
    with pytest.raises(ArgumentError, match="contradicts --position-embedding-type none"):
        parse("--use-rotary-position-embeddings", "--position-embedding-type", "none")
    with pytest.raises(ArgumentError, match="--rotary-percent 0.5 has no effect with --position-embedding-type "
                                            "learned_absolute"):
        parse("--rotary-percent", "0.5")
    assert parse("--position-embedding-type", "rope", "--rotary-percent", "0.5").rotary_percent == 0.5
    with pytest.raises(ArgumentError, match="rotary dimension .* must be even"):
        parse("--position-embedding-type", "rope", "--rotary-percent", "0.2")
    with pytest.raises(ArgumentError, match="--openai-gelu .* and --swiglu .* exclude each other"):
        parse("--openai-gelu", "--swiglu")
    with pytest.raises(ArgumentError, match="invalid choice: 'yarn'"):
        parse("--position-embedding-type", "yarn")
    helps = build_parser().format_help()
    assert "flash kernel" in helps and "always does" in helps  # --use-flash-attn, --deepspeed: what they mean here
