"""Document-level attention (--reset-attention-mask), reset positions (--reset-position-ids), the loss mask of
--eod-mask-loss, and --attention-backend: fast paths against the plain references."""

import pytest
import torch

from megatron_slung.model import attention as A
from megatron_slung.model.gpt import GPTConfig, GPTModel

EOD = 7


def _tokens(b=3, s=40, seed=0, eod_prob=0.12):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (b, s), generator=g)  # ids 0..6: no accidental EOD
    tokens[torch.rand(b, s, generator=g) < eod_prob] = EOD
    tokens[0, 5] = tokens[0, 6] = EOD  # back-to-back EODs: a one-token document
    tokens[-1] = torch.randint(0, 7, (s,), generator=g)  # a sample with no EOD at all
    return tokens


def _ltor_reference(tokens_row, eod):
    """Megatron's semantics written out with loops: after an EOD at i, rows i+1.. lose columns ..i and
    positions restart at 0; the EOD itself stays with the document it ends."""
    s = len(tokens_row)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    pos = list(range(s))
    start = 0
    for i in range(s):
        pos[i] = i - start
        if int(tokens_row[i]) == eod:
            mask[i + 1:, :i + 1] = False
            start = i + 1
    return mask, torch.tensor(pos)


def test_document_ids_positions_and_mask_follow_megatron():
    tokens = _tokens()
    doc = A.document_ids(tokens, EOD)
    pos = A.document_position_ids(tokens, EOD)
    dense = A.document_causal_mask(doc)
    for b in range(tokens.shape[0]):
        mask, positions = _ltor_reference(tokens[b], EOD)
        assert torch.equal(dense[b, 0], mask)
        assert torch.equal(pos[b], positions)
    assert torch.equal(pos[-1], torch.arange(tokens.shape[1]))  # no EOD: nothing resets
    assert A.document_inputs(tokens, EOD, False, False) == (None, None)


def _qkv(b, h, g, s, d, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=gen, dtype=dtype).requires_grad_() for n in (h, g, g)]


@pytest.mark.parametrize("backend", ["auto", "flash", "unfused", "local"])
@pytest.mark.parametrize("groups", [4, 2])
def test_fast_path_matches_dense_reference_values_and_grads(backend, groups):
    tokens = _tokens()
    doc = A.document_ids(tokens, EOD)
    dtype = torch.float32 if backend == "flash" else torch.float64  # torch's CPU flash: no float64 backward
    q, k, v = _qkv(3, 4, groups, tokens.shape[1], 8, dtype=dtype)
    grad = torch.randn(3, 4, tokens.shape[1], 8, generator=torch.Generator().manual_seed(5), dtype=dtype)

    def run(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad)
        return out.detach(), [t.grad.clone() for t in (q, k, v)]

    out, grads = run(lambda: A.core_attention(q, k, v, backend=backend, doc_ids=doc))
    ref, ref_grads = run(lambda: A.reference_attention(q, k, v, doc))
    dense, dense_grads = run(lambda: A.core_attention(q, k, v, doc_ids=doc, dense_documents=True))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for a, b in [(out, ref), (dense, ref)] + list(zip(grads, ref_grads)) + list(zip(dense_grads, ref_grads)):
        torch.testing.assert_close(a, b, **tol)
    # and it is not plain causal attention (the documents matter)
    causal = A.reference_attention(q, k, v).detach()
    assert (causal - ref).abs().max() > 1e-3


def test_many_short_documents_use_the_dense_mask_and_agree(monkeypatch):
    tokens = _tokens(eod_prob=0.5)
    doc = A.document_ids(tokens, EOD)
    q, k, v = _qkv(3, 2, 2, tokens.shape[1], 4)
    ref = A.reference_attention(q, k, v, doc)
    monkeypatch.setattr(A, "MAX_SEGMENTS", 3)  # samples 0 and 1 now go through their dense masks
    torch.testing.assert_close(A.core_attention(q, k, v, doc_ids=doc), ref)


def _config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=16,
                ffn_hidden_size=48, max_position_embeddings=64, params_dtype=torch.float64)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("positions", ["rope", "learned_absolute"])
def test_no_attention_across_documents_in_the_model(positions):
    """Perturbing tokens of document A leaves every output of document B unchanged (and changes A's)."""
    torch.manual_seed(0)
    model = GPTModel(_config(position_embedding_type=positions))
    s = 24
    tokens = torch.randint(0, 7, (2, s))
    tokens[:, 9] = EOD  # document A = 0..9 (its EOD included), B = 10..
    pos, doc = A.document_inputs(tokens, EOD, True, True)
    out = model(tokens, pos, document_ids=doc)
    changed = tokens.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 7
    out2 = model(changed, pos, document_ids=doc)
    assert torch.equal(out[:, 10:], out2[:, 10:])
    assert (out[:, 2:10] - out2[:, 2:10]).abs().max() > 1e-6
    # document B alone, as a sample of its own at positions 0.., gives the same outputs
    alone = model(tokens[:, 10:])
    torch.testing.assert_close(out[:, 10:], alone, atol=1e-10, rtol=1e-10)
    # without the flags B does see A (so the test above means something)
    plain = model(tokens)
    assert (plain[:, 10:] - out[:, 10:]).abs().max() > 1e-6


def test_reset_positions_without_document_mask():
    """--reset-position-ids alone: positions restart, attention still crosses documents (Megatron's flags
    are independent)."""
    torch.manual_seed(0)
    model = GPTModel(_config(position_embedding_type="learned_absolute"))
    tokens = torch.randint(0, 7, (1, 16))
    tokens[0, 5] = EOD
    pos, doc = A.document_inputs(tokens, EOD, True, False)
    assert doc is None and pos[0].tolist() == list(range(6)) + list(range(10))
    torch.testing.assert_close(model(tokens, pos), model(tokens, pos, document_ids=torch.zeros_like(tokens)))
    assert (model(tokens, pos) - model(tokens)).abs()[:, 6:].max() > 1e-6


@pytest.mark.parametrize("backend", ["flash", "unfused", "local"])
def test_backends_agree_with_auto_in_the_model(backend):
    torch.manual_seed(0)
    cfg = _config(params_dtype=torch.float32)
    model = GPTModel(cfg)
    tokens = _tokens(b=2, s=20)
    doc = A.document_ids(tokens, EOD)
    ref = model(tokens, document_ids=doc)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for layer in model.decoder.layers:
        layer.self_attention.config = _config(params_dtype=torch.float32, attention_backend=backend)
    out = model(tokens, document_ids=doc)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=2e-4, rtol=2e-4)


def test_recompute_and_compile_with_documents():
    torch.manual_seed(0)
    tokens = _tokens(b=2, s=20)
    pos, doc = A.document_inputs(tokens, EOD, True, True)
    results = []
    for recompute, compiled in [(False, False), (True, False), (True, True)]:
        model = GPTModel(_config(recompute_activations=recompute))
        if compiled:
            from megatron_slung.model.gpt import compile_transformer_layers

            compile_transformer_layers(model)
        out = model(tokens, pos, document_ids=doc)
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    for (out, grads), tol in zip(results[1:], [1e-12, 1e-5]):  # compiled: the norms' float32 fuses differently
        torch.testing.assert_close(out, results[0][0], atol=tol, rtol=tol)
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0, atol=tol, rtol=tol)


def test_backend_that_cannot_run_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"--attention-backend fused: .*cpu"):
        A.check_attention_backend("fused", "cpu", torch.float32, 16)
    with pytest.raises(ValueError, match=r"--attention-backend flash: .*dropout"):
        A.check_attention_backend("flash", "cpu", torch.float32, 16, dropout=0.1)
    A.check_attention_backend("flash", "cpu", torch.float32, 16, documents=True)
    A.check_attention_backend("unfused", "cpu", torch.bfloat16, 16, dropout=0.1, gqa=True)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        _config(attention_backend="sdpa")


# --------------------------------------------------------------------------- pipeline (real gloo processes)
DOC_PP_CONFIGS = {
    "rope_recompute": (dict(recompute_activations=True), None),
    "gpt3_learned_positions": (dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
                                    swiglu=False, add_bias_linear=True), None),
}
DOC_TP_PP_CONFIGS = {"rope_sp": (dict(sequence_parallel=True), None)}


def _document_micro_batches():
    from tests import test_pipeline as P

    out = []
    for i, (tokens, labels) in enumerate(P._micro_batches()):
        tokens = tokens % EOD  # no accidental EOD
        tokens[:, 2 + i] = EOD
        tokens[0, 5] = EOD
        pos, doc = A.document_inputs(tokens, EOD, True, True)
        out.append(((tokens, pos, doc), labels))
    return out


def _check_pipeline_with_documents(results, configs, tp):
    from megatron_slung.model.gpt import tensor_parallel_layout
    from megatron_slung.model.pipeline import PipelineLoss
    from megatron_slung.parallel.layers import merge_tensor_parallel_shards
    from tests import test_pipeline as P

    batches = _document_micro_batches()
    n_tokens = P._num_loss_tokens([(t[0], lab) for t, lab in batches])
    for name, (overrides, _) in configs.items():
        cfg = P._config(**overrides)
        model = GPTModel(cfg)
        loss_fn = PipelineLoss(P.POLICY)
        loss_fn.set_scale(1.0 / n_tokens)
        total = sum(loss_fn(model(tokens, pos, document_ids=doc), labels) for (tokens, pos, doc), labels in batches)
        with torch.no_grad():
            plain = sum(loss_fn(model(tokens), labels) for (tokens, _, _), labels in batches)
        assert abs(float(plain) - total.item()) > 1e-4  # the documents change the loss
        total.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), P.CLIP))
        with torch.no_grad():
            for p in model.parameters():
                p -= p.grad
        expected, layout = model.state_dict(), tensor_parallel_layout(cfg)
        for stage in (0, 1):
            ranks = sorted((r[name] for r in results if r[name]["stage"] == stage), key=lambda r: r["tp_rank"])
            for r in ranks:
                assert r["loss"] == pytest.approx(total.item(), rel=1e-5), name
                assert r["norm"] == pytest.approx(norm, rel=1e-6), name
            for key in ranks[0]["params"]:
                dim, parts = layout[key]
                shards = [r["params"][key] for r in ranks]
                got = shards[0] if dim is None else merge_tensor_parallel_shards(shards, dim, parts)
                torch.testing.assert_close(got, expected[key], rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.distributed
def test_two_stage_pipeline_with_documents_matches_the_plain_model():
    from tests import test_pipeline as P
    from tests.distributed import run_distributed

    configs = {k: (o, P.NO_PARTITION) for k, (o, _) in DOC_PP_CONFIGS.items()}
    results = run_distributed(P._pipeline_body, 2, args=(1, configs, _document_micro_batches()))
    _check_pipeline_with_documents(results, configs, tp=1)


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_by_pp2_sequence_parallel_pipeline_with_documents_matches_the_plain_model():
    from tests import test_pipeline as P
    from tests.distributed import run_distributed

    configs = {k: (o, P.NO_PARTITION) for k, (o, _) in DOC_TP_PP_CONFIGS.items()}
    results = run_distributed(P._pipeline_body, 4, args=(2, configs, _document_micro_batches()))
    _check_pipeline_with_documents(results, configs, tp=2)


# --------------------------------------------------------------------------- the trainer (real processes)
DOC_FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


def _write_documents(prefix, eod=255, docs=120):
    """Short documents (5..20 tokens) each ending with the EOD, so a 32-token sample packs several."""
    import numpy as np

    from megatron_slung.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(str(prefix), vocab_size=256, with_risk=True) as builder:
        for _ in range(docs):
            n = int(rng.integers(5, 21))
            start, stride = int(rng.integers(0, 200)), int(rng.integers(1, 4))
            tokens = (start + stride * np.arange(n)) % 200  # learnable, never the EOD
            tokens[-1] = eod
            builder.add_document(tokens, rng.integers(0, 4, n))
    return str(prefix)


def _train(tmp_path, world_size, *extra):
    from tests.distributed import run_distributed
    from tests.pretrain_helpers import TINY, pretrain_body, train_records

    prefix = tmp_path / "docs"
    if not (tmp_path / "docs.idx").exists():
        _write_documents(prefix)
    args = [a for a in TINY if a != "--mock-data"] + ["--train-iters", "4", "--split", "1", "--data-path", str(prefix),
                                                      "--data-cache-path", str(tmp_path / "cache")]
    return train_records(run_distributed(pretrain_body, world_size, args=(args + list(extra),))[-1])


def _same(got, expected, tol=1e-4):
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        assert abs(g["loss"] - e["loss"]) <= tol and g["loss_tokens"] == e["loss_tokens"], (g, e)
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4, abs=1e-6)


@pytest.mark.distributed
def test_trainer_with_document_flags_tp2_sequence_parallel_fused_linear_ce_matches_one_process(tmp_path):
    # with the fused linear + loss too (the head's input is the hidden, documents applied before it)
    _same(_train(tmp_path, 2, *DOC_FLAGS, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                 "--fused-linear-ce"),
          _train(tmp_path, 1, *DOC_FLAGS))


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_with_document_flags_pp2_and_recompute_matches_one_process(tmp_path):
    single = _train(tmp_path, 1, *DOC_FLAGS)
    plain = _train(tmp_path, 1)
    # the flags act: other loss (attention, positions) and fewer loss tokens (the EOD positions)
    assert abs(single[0]["loss"] - plain[0]["loss"]) > 1e-3
    assert single[0]["loss_tokens"] < plain[0]["loss_tokens"]
    _same(_train(tmp_path, 2, *DOC_FLAGS, "--pipeline-model-parallel-size", "2", "--recompute-activations"), single)


# --------------------------------------------------------------------------- flags
def test_flags_have_megatrons_names_and_defaults_and_use_flash_attn_is_the_flash_backend():
    from megatron_slung.training.arguments import ArgumentError, parse_args

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--mock-data", "--vocab-size", "64"]
    a = parse_args(base, world_size=1)
    assert (a.attention_backend, a.reset_position_ids, a.reset_attention_mask, a.eod_mask_loss) == ("auto", False,
                                                                                                   False, False)
    assert parse_args(base + ["--use-flash-attn"], world_size=1).attention_backend == "flash"
    assert parse_args(base + ["--use-flash-attn", "--attention-backend", "flash"], world_size=1).attention_backend == "flash"
    with pytest.raises(ArgumentError, match="--use-flash-attn contradicts --attention-backend local"):
        parse_args(base + ["--use-flash-attn", "--attention-backend", "local"], world_size=1)
    with pytest.raises(ArgumentError, match="invalid choice"):
        parse_args(base + ["--attention-backend", "sdpa"], world_size=1)


def test_trainer_refuses_a_backend_the_cpu_cannot_run_in_one_line():
    from tests.pretrain_helpers import TINY, run_cli

    proc = run_cli(TINY + ["--train-iters", "2", "--attention-backend", "fused"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--attention-backend fused: torch has no such kernel for cpu float32" in proc.stderr
    assert "Traceback" not in proc.stderr
