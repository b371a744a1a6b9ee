"""Training logs: per-level loss report, interval averages, throughput/MFU, JSONL and TensorBoard output."""

import io
import json
import math

import pytest
import torch

from megatron_slung.data.risk import NUM_LEVELS
from megatron_slung.loss import LossPolicy, masked_cross_entropy_reference
from megatron_slung.training.logging import StepStats, TrainingLogger, level_report, peak_tflops

POLICY = "0:ce,1:ce,2:ignore,3:unlikelihood,7:ce@0.5"


def test_level_report_is_the_mean_plain_ce_of_each_level_masked_ones_included():
    torch.manual_seed(0)
    logits = torch.randn(40, 11)
    labels = torch.randint(0, 11, (40,))
    labels[:3] = -100  # ignored labels count for no level
    risk = torch.tensor([0, 1, 2, 3, 7] * 8, dtype=torch.uint8)
    out = masked_cross_entropy_reference(logits, labels, risk, POLICY)
    report = level_report(out.level_count, out.level_ce_sum, LossPolicy.parse(POLICY))
    ce = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    valid = labels != -100
    assert set(report) == {"0", "1", "2", "3", "7"}
    for level in (0, 1, 2, 3, 7):
        sel = valid & (risk == level)
        assert report[str(level)]["tokens"] == int(sel.sum())
        assert report[str(level)]["ce"] == pytest.approx(float(ce[sel].mean()), rel=1e-5)
    assert report["2"]["mode"] == "ignore" and report["2"]["name"] == "ambiguous"
    assert report["3"]["mode"] == "unlikelihood" and report["3"]["name"] == "toxic"
    assert report["7"]["mode"] == "ce@0.5" and report["7"]["name"] == "level7"


def _stats(loss, tokens, levels, lr=1e-3, grad_norm=1.0, skipped=False):
    count = torch.zeros(NUM_LEVELS)
    ce = torch.zeros(NUM_LEVELS)
    for level, (n, total) in levels.items():
        count[level], ce[level] = n, total
    return StepStats(loss=loss, num_tokens=tokens, level_count=count, level_ce_sum=ce, lr=lr, grad_norm=grad_norm,
                     skipped=skipped)


def test_logger_averages_the_interval_and_writes_jsonl_and_tensorboard(tmp_path):
    stream = io.StringIO()
    jsonl = tmp_path / "m" / "metrics.jsonl"
    logger = TrainingLogger(enabled=True, policy="masked", train_iters=5, log_interval=2, tokens_per_iteration=1000,
                            flops_per_token=6e9, world_size=2, device_name="NVIDIA H100 80GB HBM3",
                            tensorboard_dir=str(tmp_path / "tb"), metrics_jsonl=str(jsonl), stream=stream)
    assert logger.peak == 989.0
    assert logger.log_iteration(1, _stats(2.0, 10, {1: (8, 16.0), 3: (2, 10.0)}), 8) is None
    rec = logger.log_iteration(2, _stats(4.0, 30, {1: (2, 2.0), 3: (2, 2.0)}, grad_norm=3.0), 16)
    assert rec["loss"] == pytest.approx(3.0)  # mean of the iterations' losses
    assert rec["grad_norm"] == pytest.approx(2.0) and rec["loss_tokens"] == 40
    assert rec["levels"]["1"] == {"name": "benign", "mode": "ce", "tokens": 10, "ce": pytest.approx(1.8)}
    assert rec["levels"]["3"] == {"name": "toxic", "mode": "ignore", "tokens": 4, "ce": pytest.approx(3.0)}
    assert rec["tokens_per_s"] > 0
    assert rec["tflops_per_device"] == pytest.approx(6e9 * rec["tokens_per_s"] / 2 / 1e12)
    assert rec["mfu"] == pytest.approx(rec["tflops_per_device"] / 989.0)
    # a NaN iteration does not poison the average; the last iteration is always written
    logger.log_iteration(3, _stats(float("nan"), 5, {1: (5, 5.0)}, skipped=True), 24)
    logger.log_iteration(4, _stats(1.0, 5, {1: (5, 5.0)}), 32)
    rec5 = logger.log_iteration(5, _stats(1.5, 5, {1: (5, 5.0)}), 40)
    logger.log_eval(5, "valid", 1.25, 100, torch.ones(NUM_LEVELS), torch.full((NUM_LEVELS,), 2.0))
    logger.close()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["kind"], r["iteration"]) for r in lines] == [("train", 2), ("train", 4), ("train", 5), ("valid", 5)]
    assert lines[1]["loss"] == pytest.approx(1.0) and lines[1]["skipped_iterations"] == 1
    assert rec5["loss"] == pytest.approx(1.5) and rec5["eta_s"] == 0
    assert lines[3]["policy_loss"] == 1.25 and lines[3]["ce"] == pytest.approx(2.0)
    assert lines[3]["ppl"] == pytest.approx(math.exp(2.0)) and lines[3]["ppl_tokens"] == NUM_LEVELS
    text = stream.getvalue()
    assert "iter 2/5 | loss 3.0000" in text and "3:toxic[ignore]=3.0000" in text and "MFU" in text
    assert "valid at iter 5 | policy loss 1.2500 | ce 2.0000 | ppl 7.389 (256 tokens)" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    # TensorBoard gets each iteration's own loss (Megatron's --tensorboard-log-interval 1), the NaN left out;
    # the log line and the JSONL average over --log-interval.
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 4, 5] and [e.value for e in loss] == pytest.approx([2.0, 4.0, 1.0, 1.5])
    assert [e.step for e in events.Scalars("train/tokens_per_s")] == [2, 4, 5]  # timing: per log interval
    assert "train/ce_level/3_toxic" in events.Tags()["scalars"]
    assert {"valid/policy_loss", "valid/ce", "valid/ppl"} <= set(events.Tags()["scalars"])
    assert "valid/loss" not in events.Tags()["scalars"]


def test_disabled_logger_writes_nothing_and_cpu_has_no_mfu(tmp_path):
    stream = io.StringIO()
    logger = TrainingLogger(enabled=False, policy="ce", train_iters=2, log_interval=1, tokens_per_iteration=10,
                            flops_per_token=1.0, world_size=1, metrics_jsonl=str(tmp_path / "x.jsonl"), stream=stream)
    logger.log_iteration(1, _stats(1.0, 1, {0: (1, 1.0)}), 1)
    logger.close()
    assert stream.getvalue() == "" and not (tmp_path / "x.jsonl").exists()
    cpu = TrainingLogger(enabled=True, policy="ce", train_iters=1, log_interval=1, tokens_per_iteration=10,
                         flops_per_token=1.0, world_size=1, stream=stream)
    assert cpu.log_iteration(1, _stats(1.0, 1, {0: (1, 1.0)}), 1)["mfu"] is None
    assert "MFU" not in stream.getvalue() and "TFLOP/s" in stream.getvalue()


def test_peak_table():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops(None) is None and peak_tflops("Some CPU") is None


def test_eval_perplexity_is_that_of_the_plain_cross_entropy_not_of_the_policy_loss():
    """Unlikelihood and weights make the policy loss no cross-entropy: ppl = exp(mean plain CE over every token
    whose label is kept, all levels), the policy loss is reported apart."""
    torch.manual_seed(1)
    logits = torch.randn(64, 13) * 3
    labels = torch.randint(0, 13, (64,))
    labels[:5] = -100  # loss-masked: in neither number
    risk = torch.tensor([0, 1, 2, 3] * 16, dtype=torch.uint8)
    policy = "0:ce,1:ce@0.5,2:ignore,3:unlikelihood"
    out = masked_cross_entropy_reference(logits, labels, risk, policy)
    policy_loss = float(out.loss_sum / out.num_tokens)
    logger = TrainingLogger(enabled=True, policy=policy, train_iters=1, log_interval=1, tokens_per_iteration=1,
                            flops_per_token=1.0, world_size=1, stream=io.StringIO())
    rec = logger.log_eval(1, "valid", policy_loss, int(out.num_tokens), out.level_count, out.level_ce_sum)
    kept = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[kept].double(), labels[kept])
    assert rec["ppl_tokens"] == int(kept.sum()) == 59
    assert rec["ce"] == pytest.approx(float(ce), rel=1e-6)
    assert rec["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-6)
    assert rec["policy_loss"] == policy_loss and rec["loss_tokens"] == int(out.num_tokens)
    assert abs(math.log(rec["ppl"]) - policy_loss) > 0.1  # exp(policy loss) would be a different number
