"""Tensor parallelism with real gloo processes: layers and the GPT model at TP=2 equal TP=1.

Each test computes the single-process (TP=1) reference here, runs the TP=2 version in two
processes and compares forward outputs and gradients (shards merged back to full size).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_slung.model.gpt import GPTConfig, GPTModel, merge_tensor_parallel_state_dicts, tensor_parallel_layout
from megatron_slung.parallel import state
from megatron_slung.parallel.layers import merge_tensor_parallel_shards
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- layers
def _full_weight(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _init_from(full):
    def init(t):
        t.copy_(full)

    return init


def _layers_body(rank, world_size, w_col, w_qkv, w_row, w_emb, x, ids, grad_col, grad_row, grad_emb):
    from megatron_slung.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron_slung.parallel.mappings import scatter_to_sequence_parallel_region

    state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    out = {}
    for sp in (False, True):
        # column (gather_output=False: my shard of the output) then row (input already split)
        col = ColumnParallelLinear(w_col.shape[1], w_col.shape[0], init_method=_init_from(w_col), sequence_parallel=sp)
        row = RowParallelLinear(w_row.shape[1], w_row.shape[0], init_method=_init_from(w_row), sequence_parallel=sp)
        xin = x.clone().requires_grad_(True)
        inp = scatter_to_sequence_parallel_region(xin) if sp else xin
        h = col(inp)
        y = row(torch.tanh(h))
        # y is replicated (or my sequence shard): the loss is sum(y * grad_row) over the full tensor
        g = grad_row.chunk(world_size, dim=0)[rank] if sp else grad_row
        (y * g).sum().backward()
        out[f"col_row_sp{sp}"] = (y.detach(), xin.grad, col.weight.grad, row.weight.grad)

    # fused QKV-style parts + gather_output
    qkv = ColumnParallelLinear(w_qkv.shape[1], w_qkv.shape[0], init_method=_init_from(w_qkv),
                               gather_output=True, output_parts=[8, 4, 4])
    xin = x.clone().requires_grad_(True)
    y = qkv(xin)
    (y * grad_col).sum().backward()
    out["qkv_gather"] = (y.detach(), xin.grad, qkv.weight.grad)

    # row parallel with a replicated input (split inside)
    row = RowParallelLinear(w_row.shape[1], w_row.shape[0], init_method=_init_from(w_row), input_is_parallel=False)
    xin = torch.tanh(x @ w_col.t()).detach().requires_grad_(True)
    y = row(xin)
    (y * grad_row).sum().backward()
    out["row_replicated"] = (y.detach(), xin.grad, row.weight.grad)

    for sp in (False, True):
        emb = VocabParallelEmbedding(w_emb.shape[0], w_emb.shape[1], init_method=_init_from(w_emb), sequence_parallel=sp)
        y = emb(ids)  # ids [S, B]
        g = grad_emb.chunk(world_size, dim=0)[rank] if sp else grad_emb
        (y * g).sum().backward()
        out[f"emb_sp{sp}"] = (y.detach(), emb.weight.grad)
    state.destroy_model_parallel()
    return out


def test_column_row_and_embedding_layers_at_tp2_equal_full_layers():
    torch.manual_seed(0)
    s, b, hin, hmid, hout, vocab = 6, 2, 8, 12, 10, 16
    w_col, w_row = _full_weight((hmid, hin), 1), _full_weight((hout, hmid), 2)
    w_qkv, w_emb = _full_weight((16, hin), 3), _full_weight((vocab, hout), 4)
    x = torch.randn(s, b, hin)
    ids = torch.randint(0, vocab, (s, b))
    grad_col, grad_row, grad_emb = torch.randn(s, b, 16), torch.randn(s, b, hout), torch.randn(s, b, hout)

    # references
    xr = x.clone().requires_grad_(True)
    wc, wr = w_col.clone().requires_grad_(True), w_row.clone().requires_grad_(True)
    y_ref = torch.tanh(xr @ wc.t()) @ wr.t()
    (y_ref * grad_row).sum().backward()
    xq, wq = x.clone().requires_grad_(True), w_qkv.clone().requires_grad_(True)
    yq = xq @ wq.t()
    (yq * grad_col).sum().backward()
    xrr = torch.tanh(x @ w_col.t()).detach().requires_grad_(True)
    wr2 = w_row.clone().requires_grad_(True)
    yrr = xrr @ wr2.t()
    (yrr * grad_row).sum().backward()
    we = w_emb.clone().requires_grad_(True)
    ye = F.embedding(ids, we)
    (ye * grad_emb).sum().backward()

    res = run_distributed(_layers_body, 2, args=(w_col, w_qkv, w_row, w_emb, x, ids, grad_col, grad_row, grad_emb))
    for sp in (False, True):
        ys, xgrads, colg, rowg = zip(*(r[f"col_row_sp{sp}"] for r in res))
        y_full = torch.cat(ys, 0) if sp else ys[0]
        torch.testing.assert_close(y_full, y_ref.detach(), **TOL)
        for xg in xgrads:  # the input gradient is complete on every rank (all-reduced / all-gathered)
            torch.testing.assert_close(xg, xr.grad, **TOL)
        torch.testing.assert_close(merge_tensor_parallel_shards(colg, 0), wc.grad, **TOL)
        torch.testing.assert_close(merge_tensor_parallel_shards(rowg, 1), wr.grad, **TOL)
        if not sp:
            torch.testing.assert_close(ys[1], y_ref.detach(), **TOL)

    for r in res:
        y, xg, _ = r["qkv_gather"]
        torch.testing.assert_close(y, yq.detach(), **TOL)
        torch.testing.assert_close(xg, xq.grad, **TOL)
    # rank shards are [part0_r; part1_r; part2_r]: merging by parts gives the full gradient back,
    # merging as one block would not
    shards = [r["qkv_gather"][2] for r in res]
    torch.testing.assert_close(merge_tensor_parallel_shards(shards, 0, [8, 4, 4]), wq.grad, **TOL)
    assert not torch.allclose(merge_tensor_parallel_shards(shards, 0), wq.grad)

    for r in res:
        y, xg, _ = r["row_replicated"]
        torch.testing.assert_close(y, yrr.detach(), **TOL)
        torch.testing.assert_close(xg, xrr.grad, **TOL)
    torch.testing.assert_close(merge_tensor_parallel_shards([r["row_replicated"][2] for r in res], 1), wr2.grad, **TOL)

    for sp in (False, True):
        ys, grads = zip(*(r[f"emb_sp{sp}"] for r in res))
        torch.testing.assert_close(torch.cat(ys, 0) if sp else ys[0], ye.detach(), **TOL)
        torch.testing.assert_close(torch.cat(grads, 0), we.grad, **TOL)


# --------------------------------------------------------------------------- GPT model
GPT3 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False, add_bias_linear=True)
CONFIGS = {
    "gqa_tied": dict(num_query_groups=2),
    "gqa_tied_sp": dict(num_query_groups=2, sequence_parallel=True),
    "mha_untied_sp": dict(num_query_groups=4, untie_embeddings_and_output_weights=True, sequence_parallel=True),
    "gqa_untied_recompute": dict(num_query_groups=2, untie_embeddings_and_output_weights=True, recompute_activations=True),
    # the loss fused with the head (return_hidden): vocab-parallel, no logits
    "gqa_tied_sp_fused": dict(num_query_groups=2, sequence_parallel=True),
    "gqa_untied_fused": dict(num_query_groups=2, untie_embeddings_and_output_weights=True),
    # GPT-3 style (Megatron's defaults): learned positions (under SP each rank adds its own block of
    # positions), LayerNorm with betas, GeLU, biases (column-parallel split, row-parallel added once)
    "gpt3_tied": dict(GPT3, num_query_groups=4),
    "gpt3_tied_sp": dict(GPT3, num_query_groups=2, sequence_parallel=True),
    "gpt3_untied_sp_fused": dict(GPT3, num_query_groups=2, untie_embeddings_and_output_weights=True,
                                 sequence_parallel=True),
    # q/k/v bias, q/k norms (heads split across ranks: their gradients summed), partial RoPE, 1p, tanh GeLU
    "qwen2_qknorm_partial_rope_sp": dict(num_query_groups=2, add_qkv_bias=True, qk_layernorm=True, rotary_percent=0.5,
                                         sequence_parallel=True),
    "layernorm_1p_qknorm_nope_openai_gelu": dict(num_query_groups=2, normalization="LayerNorm", apply_layernorm_1p=True,
                                                 qk_layernorm=True, position_embedding_type="none", swiglu=False,
                                                 openai_gelu=True, add_bias_linear=True),
}


def _config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=64,
                max_position_embeddings=32, init_seed=7)
    base.update(overrides)
    return GPTConfig(**base)


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 8), generator=g)
    labels = torch.randint(0, 64, (2, 8), generator=g)
    risk = torch.randint(0, 4, (2, 8), generator=g).to(torch.uint8)
    return tokens, labels, risk


def _loss_and_grads(model, tokens, labels, risk, fused=False):
    from megatron_slung.model.pipeline import fused_linear_masked_cross_entropy_tp, masked_cross_entropy_tp

    policy = "0:ce,1:ce,2:ignore,3:unlikelihood"
    if fused:
        hidden, weight = model(tokens, return_hidden=True)
        out = fused_linear_masked_cross_entropy_tp(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                                   risk.reshape(-1), policy)
        logits = hidden @ weight.t()
    else:
        logits = model(tokens)
        out = masked_cross_entropy_tp(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), risk.reshape(-1), policy)
    loss = out.loss_sum / out.num_tokens
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _perturb_vectors(model, cfg):
    """Biases, norm weights and betas start at 0 or 1, where a wrong split would not show: give them
    values drawn per name at full size, each rank taking its shard as the layout says."""
    from megatron_slung.model.gpt import tensor_parallel_layout
    from megatron_slung.parallel.layers import split_for_tensor_parallel

    tp, rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
    layout = tensor_parallel_layout(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            dim, parts = layout[name]
            full_len = p.numel() * (tp if dim == 0 else 1)
            gen = torch.Generator().manual_seed(sum(map(ord, name)))
            full = torch.randn(full_len, generator=gen) * 0.2
            p.add_(full if dim is None else split_for_tensor_parallel(full, tp, rank, 0, parts))
    return model


def _gpt_body(rank, world_size, batch):
    state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    out = {}
    for name, overrides in CONFIGS.items():
        model = _perturb_vectors(GPTModel(_config(**overrides)), _config(**overrides))
        logits, loss, grads = _loss_and_grads(model, *batch, fused="fused" in name)
        out[name] = (logits, loss, grads, {n: p.detach().clone() for n, p in model.state_dict().items()})
    state.destroy_model_parallel()
    return out


def test_gpt_model_at_tp2_equals_tp1_logits_loss_and_gradients():
    batch = _batch()
    res = run_distributed(_gpt_body, 2, args=(batch,))
    for name, overrides in CONFIGS.items():
        cfg = _config(**overrides)
        model = _perturb_vectors(GPTModel(cfg), cfg)  # TP=1, same init seed (the unfused loss: one reference for both)
        logits, loss, grads = _loss_and_grads(model, *batch)
        shards = [r[name] for r in res]
        # weights: the TP=2 shards merge into exactly the TP=1 weights (layout-independent init)
        merged_weights = merge_tensor_parallel_state_dicts([s[3] for s in shards], cfg)
        for n, w in model.state_dict().items():
            assert torch.equal(merged_weights[n], w), f"{name}: weight {n} differs"
        torch.testing.assert_close(torch.cat([s[0] for s in shards], dim=-1), logits, **TOL, msg=name)
        for s in shards:
            torch.testing.assert_close(s[1], loss, **TOL)
        merged = merge_tensor_parallel_state_dicts([s[2] for s in shards], cfg)
        for n, g in grads.items():
            torch.testing.assert_close(merged[n], g, **TOL, msg=f"{name}: grad of {n}")
            if tensor_parallel_layout(cfg)[n][0] is None:  # replicated parameters: the same gradient on both ranks
                torch.testing.assert_close(shards[0][2][n], shards[1][2][n], **TOL)


# --------------------------------------------------------------------------- DeepSpeed engine, state as mpu
def _engine_body(rank, world_size, batches, n_tokens, variant):
    import deepspeed

    from megatron_slung.model.pipeline import PipelineLoss, loss_scale_for_global_batch

    state.init_deepspeed_comm()
    state.initialize_model_parallel(tensor_model_parallel_size=2)  # 4 ranks: tp 2 x dp 2
    model = GPTModel(_engine_config(variant))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=state, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": len(batches), "gradient_clipping": 0.05,
        "steps_per_print": 10**9, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
    dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    loss_fn = PipelineLoss("0:ce,1:ce,2:ignore,3:unlikelihood")
    loss_fn.set_scale(loss_scale_for_global_batch(n_tokens, len(batches), dp))
    for tokens, labels, risk in batches:  # each micro-batch holds one sequence per DP rank
        mine = slice(dp_rank, dp_rank + 1)
        engine.backward(loss_fn(engine(tokens[mine]), (labels[mine], risk[mine])))
        engine.step()
    result = (state.get_tensor_model_parallel_rank(), dp_rank, float(engine.get_global_grad_norm()),
              {k: v.detach().clone() for k, v in model.state_dict().items()})
    state.destroy_model_parallel()
    return result


def _engine_config(variant):
    extra = GPT3 if variant == "gpt3" else {}
    return _config(num_query_groups=2, sequence_parallel=True, **extra)


@pytest.mark.parametrize("variant", ["llama", "gpt3"])
def test_deepspeed_engine_with_parallel_state_as_mpu_matches_one_process(variant):
    """TP=2 x DP=2, sequence parallel, ZeRO-1, clipping: DeepSpeed reduces over our DP group and counts
    each parameter once in the gradient norm (replicated biases, betas and learned positions too), so one
    step equals the single-process step."""
    from megatron_slung.model.pipeline import PipelineLoss

    g = torch.Generator().manual_seed(9)
    batches = [(torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g),
                torch.randint(0, 4, (2, 8), generator=g).to(torch.uint8)) for _ in range(2)]
    n_tokens = sum(int((risk != 2).sum()) for _, _, risk in batches)
    results = run_distributed(_engine_body, 4, args=(batches, n_tokens, variant))

    cfg = _engine_config(variant)
    model = GPTModel(cfg)
    loss_fn = PipelineLoss("0:ce,1:ce,2:ignore,3:unlikelihood")
    loss_fn.set_scale(1.0 / n_tokens)
    sum(loss_fn(model(tokens), (labels, risk)) for tokens, labels, risk in batches).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert norm > 0.1
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    for dp_rank in (0, 1):
        ranks = sorted((r for r in results if r[1] == dp_rank), key=lambda r: r[0])
        for r in ranks:
            assert r[2] == pytest.approx(norm.item(), rel=1e-5)
        merged = merge_tensor_parallel_state_dicts([r[3] for r in ranks], cfg)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(merged[k], v, **TOL, msg=k)
