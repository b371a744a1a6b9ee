"""The job on several gloo processes: every parallel layout trains the same model as one process.

TP=2, PP=2, DP=2, TP x PP = 2 x 2 (with sequence parallelism) and TP=2 with the fused linear loss each give the
single-process losses within 1e-4 (fp32) for 10 iterations; ZeRO 1, 2 and 3 give ZeRO 0's; two "nodes" started by two torchrun commands
over 127.0.0.1 train like one process; the loss is normalised over the whole global batch; a NaN step is
skipped in a pipeline too.
"""

import subprocess
import sys

import pytest
import torch

from tests.distributed import free_port, run_distributed
from tests.pretrain_helpers import ROOT, TINY, TINY_GPT3, env, pretrain_body, read_jsonl, train_records

pytestmark = pytest.mark.distributed

ITERS = ["--train-iters", "10"]
TOL = 1e-4


def _run(world_size, *extra, base=TINY):
    records = run_distributed(pretrain_body, world_size, args=(base + ITERS + list(extra),))[-1]
    return train_records(records)


@pytest.fixture(scope="module")
def single():
    return _run(1)


@pytest.fixture(scope="module")
def data_parallel():
    return _run(2)


def _assert_same_training(got, expected, tol=TOL):
    assert [r["iteration"] for r in got] == list(range(1, 11))
    for g, e in zip(got, expected):
        assert abs(g["loss"] - e["loss"]) <= tol, (g["iteration"], g["loss"], e["loss"])
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4, abs=1e-6), g["iteration"]
        assert g["lr"] == e["lr"] and g["loss_tokens"] == e["loss_tokens"]
        assert {k: v["tokens"] for k, v in g["levels"].items()} == {k: v["tokens"] for k, v in e["levels"].items()}
        for level, info in g["levels"].items():
            assert abs(info["ce"] - e["levels"][level]["ce"]) <= tol
    losses = [e["loss"] for e in expected]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1  # it does learn


def test_data_parallel_matches_one_process(single, data_parallel):
    _assert_same_training(data_parallel, single)


def test_tensor_parallel_matches_one_process(single):
    _assert_same_training(_run(2, "--tensor-model-parallel-size", "2"), single)


def test_pipeline_parallel_matches_one_process(single):
    _assert_same_training(_run(2, "--pipeline-model-parallel-size", "2"), single)


def test_tensor_by_pipeline_parallel_with_sequence_parallel_matches_one_process(single):
    got = _run(4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel")
    _assert_same_training(got, single)


def test_fused_linear_loss_with_tensor_and_sequence_parallelism_matches_one_process(single):
    """The chunked output-layer + loss (no logits), vocab-parallel, against the plain single-process run."""
    got = _run(2, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--fused-linear-ce")
    _assert_same_training(got, single)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_zero_0(data_parallel, stage):
    _assert_same_training(_run(2, "--zero-stage", str(stage)), data_parallel)


# --------------------------------------------------------------------------- GPT-3 style (Megatron's defaults)
@pytest.fixture(scope="module")
def gpt3_single():
    return _run(1, base=TINY_GPT3)


@pytest.mark.parametrize("layout", [
    (2, "--tensor-model-parallel-size", "2", "--sequence-parallel"),
    (2, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--fused-linear-ce"),
    (2, "--pipeline-model-parallel-size", "2"),
    (2, "--zero-stage", "2"),
], ids=["tp2_sp", "tp2_sp_fused_linear_ce", "pp2", "zero2_dp2"])
def test_gpt3_style_matches_one_process_at_every_layout(gpt3_single, layout):
    """Learned positions (split over the sequence under SP), LayerNorm, GeLU and linear biases: each layout
    trains the single-process model."""
    world_size, *extra = layout
    _assert_same_training(_run(world_size, *extra, base=TINY_GPT3), gpt3_single)


def test_two_nodes_started_by_two_torchrun_commands(single, tmp_path):
    """`torchrun --nnodes 2 --node-rank R` twice on this machine: a 2-stage pipeline across the "nodes"."""
    port = free_port()
    jsonl = tmp_path / "metrics.jsonl"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "megatron_slung.pretrain"] + TINY + ITERS + [
               "--pipeline-model-parallel-size", "2", "--metrics-jsonl", str(jsonl)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "2 ranks (TP 1 x PP 2 x DP 1)" in outputs[1]  # the status lines come from the last rank
    _assert_same_training(train_records(read_jsonl(jsonl)), single)


# --------------------------------------------------------------------------- global-batch normalisation
GAS, MICRO, SEQ, VOCAB = 2, 2, 32, 256
POLICY = "0:ce,1:ce,2:ignore,3:unlikelihood"


def _hand_batches():
    """4 micro-batches (DP 2 x GAS 2) with very different loss-token counts; the first one is all masked."""
    g = torch.Generator().manual_seed(7)
    out = []
    for k in range(4):
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        risk = torch.randint(0, 4, (MICRO, SEQ), generator=g).to(torch.uint8)
        if k == 0:
            labels[:] = -100  # no loss at all
        elif k == 1:
            risk[:, : SEQ - 3] = 2  # only 3 tokens per row carry loss, all unlikelihood (a tiny loss each)
            risk[:, SEQ - 3:] = 3
        out.append((tokens, labels, risk))
    return out


def _normalisation_body(rank, world_size, argv):
    from megatron_slung.parallel import state
    from megatron_slung.training import pretrain as pt
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.training.data import MicroBatch
    from megatron_slung.training.distributed import initialize_distributed

    args = parse_args(argv, world_size=world_size)
    trainer = pt.setup(args, initialize_distributed())
    batches = _hand_batches()
    mine = [MicroBatch(*batches[rank * GAS + j]) for j in range(GAS)]  # rank 0 holds the all-masked one
    stats, skipped, lr = pt.train_step(trainer, mine)
    result = pt._stats_to_step(stats, lr, trainer.grad_norm, skipped)
    state.destroy_model_parallel()
    return result.loss, result.num_tokens, trainer.grad_norm


def test_loss_is_normalised_over_the_whole_global_batch():
    from megatron_slung.loss import masked_cross_entropy_reference
    from megatron_slung.model.gpt import GPTModel
    from megatron_slung.training.arguments import parse_args
    from megatron_slung.training.pretrain import gpt_config_from_args

    argv = TINY + ["--train-iters", "1", "--lr-warmup-iters", "0", "--micro-batch-size", str(MICRO), "--global-batch-size", str(2 * GAS * MICRO)]
    results = run_distributed(_normalisation_body, 2, args=(argv,))
    model = GPTModel(gpt_config_from_args(parse_args(argv, world_size=2), VOCAB))
    sums, counts = [], []
    for tokens, labels, risk in _hand_batches():
        out = masked_cross_entropy_reference(model(tokens).reshape(-1, VOCAB), labels.reshape(-1), risk.reshape(-1),
                                             POLICY)
        sums.append(out.loss_sum)
        counts.append(int(out.num_tokens))
    assert counts[0] == 0 and counts[1] == 2 * 3 and counts[2] > 30
    loss = sum(sums) / sum(counts)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    naive = sum(s.item() / c for s, c in zip(sums, counts) if c) / 3  # mean of micro-batch means: not the same
    assert abs(naive - loss.item()) > 0.5
    for got_loss, got_tokens, got_norm in results:
        assert got_tokens == sum(counts)
        assert got_loss == pytest.approx(loss.item(), rel=1e-5)
        assert got_norm == pytest.approx(norm, rel=1e-4)


# --------------------------------------------------------------------------- NaN in a pipeline
def _pipeline_nan_body(rank, world_size, argv):
    from megatron_slung.model import pipeline
    from megatron_slung.training import pretrain as pt

    calls = {"n": 0}
    original = pipeline.PipelineLoss.__call__
    seen = {}

    def poisoned(self, logits, labels):
        calls["n"] += 1
        loss = original(self, logits, labels)
        if self.scale is not None and (calls["n"] - 1) // 4 == 2:  # every micro-batch of iteration 3 (GAS 4)
            self._stats["loss_sum"] = self._stats["loss_sum"] * float("nan")
            loss = loss * float("nan")
        return loss

    pipeline.PipelineLoss.__call__ = poisoned
    original_step = pt.train_step

    def watched(trainer, micro):
        before = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
        out = original_step(trainer, micro)
        after = trainer.module.state_dict()
        seen[len(seen) + 1] = (out[1], all(torch.equal(before[k], after[k]) for k in before))
        return out

    pt.train_step = watched
    pt.pretrain(list(argv))
    return seen


def test_nan_step_is_skipped_on_every_pipeline_stage():
    argv = TINY + ["--train-iters", "4", "--pipeline-model-parallel-size", "2", "--skip-nan-steps"]
    for seen in run_distributed(_pipeline_nan_body, 2, args=(argv,)):
        assert seen[3] == (True, True)  # skipped, weights untouched, on both stages
        assert seen[2][1] is False and seen[4][1] is False
