"""Text generation for the evaluations: seeded sampling (top-k / top-p / temperature) and beam search.

Both are written out here rather than delegated to ``model.generate`` so that what an evaluation
measures is visible in one short file, and so that:

- sampling is reproducible per sample: sample j of prompt i draws from its own generator, seeded from
  (seed, i, j), so results do not depend on the batch size or on which other prompts are in the run;
- beam search can drop beams (safe beam search, `megatron_slung.eval.safe_beam`).

Batches are left-padded, with position ids counted from each sequence's first real token, and decode
with the model's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from megatron_slung.eval import common


@dataclass
class SamplingConfig:
    num_samples: int = 1          # continuations per prompt
    max_new_tokens: int = 20
    top_k: int = 50               # 0 = no top-k filter
    top_p: float = 1.0            # 1.0 = no nucleus filter
    temperature: float = 1.0      # 0 = greedy
    seed: int = 0
    stop_at_eos: bool = True


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of one sample: distinct for every (seed, prompt, sample), stable across runs."""
    return (seed * 1_000_003 + prompt_index) * 10_007 + sample_index


@torch.no_grad()
def _decode_batch(model, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], cfg: SamplingConfig,
                  pad_id: int, eos_id: int | None) -> list[list[int]]:
    device = common.model_device(model)
    ids, mask, positions = common.pad_batch(prompt_ids, pad_id, side="left", device=device)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    next_pos = positions[:, -1:] + 1
    new_tokens = [[] for _ in prompt_ids]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    for step in range(cfg.max_new_tokens):
        if cfg.temperature == 0:
            tokens = logits.float().argmax(-1).cpu()
        else:
            probs = filter_logits(logits, cfg.top_k, cfg.top_p, cfg.temperature).softmax(-1).cpu()
            tokens = torch.stack([torch.multinomial(probs[r], 1, generator=generators[r])[0]
                                  for r in range(len(prompt_ids))])
        for r, t in enumerate(tokens.tolist()):
            if not done[r]:
                new_tokens[r].append(t)
                if cfg.stop_at_eos and eos_id is not None and t == eos_id:
                    done[r] = True
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        tokens = tokens.masked_fill(done, pad_id).to(device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return new_tokens


@dataclass
class Generations:
    """Continuations of each prompt: ``texts[i][j]`` is sample j of prompt i (special tokens removed);
    ``token_ids[i][j]`` its token ids (special tokens kept, e.g. a harmfulness tag)."""
    prompts: list[str]
    texts: list[list[str]] = field(default_factory=list)
    token_ids: list[list[list[int]]] = field(default_factory=list)


def sample(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig | None = None, batch_size: int = 8,
           desc: str = "generating") -> Generations:
    """Sample ``cfg.num_samples`` continuations of every prompt (seeded per sample)."""
    cfg = cfg or SamplingConfig()
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {cfg.num_samples}")
    common.prepare_tokenizer(tokenizer)
    limit = common.max_length(model) - cfg.max_new_tokens
    encoded = [ids[-limit:] if limit > 0 else ids[-1:] for ids in common.encode(tokenizer, prompts)]
    for i, ids in enumerate(encoded):
        if not ids:
            raise common.EvalInputError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
    rows = [(i, j) for i in range(len(prompts)) for j in range(cfg.num_samples)]
    result = [[None] * cfg.num_samples for _ in prompts]
    bar = common.progress(total=len(rows), desc=desc, unit="sample")
    for _, chunk in common.batches(rows, batch_size):
        new = _decode_batch(model, [encoded[i] for i, _ in chunk], [sample_seed(cfg.seed, i, j) for i, j in chunk],
                            cfg, tokenizer.pad_token_id, tokenizer.eos_token_id if cfg.stop_at_eos else None)
        for (i, j), ids in zip(chunk, new):
            result[i][j] = ids
        bar.update(len(chunk))
    bar.close()
    texts = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in per_prompt] for per_prompt in result]
    return Generations(prompts=list(prompts), texts=texts, token_ids=result)


# ---------------------------------------------------------------------------------------------
# Beam search (plain, or dropping beams about to emit a banned token: safe beam search)
# ---------------------------------------------------------------------------------------------


@dataclass
class BeamStats:
    dropped_beams: int = 0        # beams removed because they were about to emit the banned token
    fallback_steps: int = 0       # steps where every beam would have been dropped (kept, token masked)


@torch.no_grad()
def beam_search_one(model, prompt_ids: Sequence[int], num_beams: int = 4, max_new_tokens: int = 20,
                    eos_id: int | None = None, banned_id: int | None = None, drop_threshold: float | None = None,
                    length_penalty: float = 1.0) -> tuple[list[int], BeamStats]:
    """Beam search for one prompt; returns the best continuation's token ids and drop statistics.

    ``banned_id=None``: plain beam search. Otherwise *safe* beam search: at each step the best
    ``num_beams`` (beam, token) candidates are chosen; if one of them extends a beam with the banned
    token, that whole beam is dropped (all of its candidates are removed) and the choice is made again.
    With ``drop_threshold`` a beam is also dropped as soon as p(banned) >= threshold. If every beam would
    be dropped, they are kept with the banned token masked instead (counted in ``fallback_steps``), so
    there is always an output and the banned token is never emitted.
    Finished hypotheses (EOS) are ranked by score / length**length_penalty.
    """
    device = common.model_device(model)
    stats = BeamStats()
    ids = torch.as_tensor([list(prompt_ids)], device=device)
    out = model(input_ids=ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    beams = [[]]                                   # generated tokens of each live beam
    scores = torch.zeros(1, device=device)         # summed log-probs of each live beam
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(logits.float(), dim=-1)            # [beams, vocab]
        vocab = logprobs.size(-1)
        cand = scores[:, None] + logprobs
        alive = torch.ones(len(beams), dtype=torch.bool, device=device)
        if banned_id is not None:
            if drop_threshold is not None:
                alive &= logprobs[:, banned_id].exp() < drop_threshold
            while True:
                masked = cand.masked_fill(~alive[:, None], float("-inf"))
                top = torch.topk(masked.flatten(), min(num_beams, masked.numel())).indices
                about_to_emit = {int(i) // vocab for i in top if int(i) % vocab == banned_id
                                 and torch.isfinite(masked.flatten()[i])}
                if not about_to_emit:
                    break
                for b in about_to_emit:
                    alive[b] = False
            if bool(alive.any()):
                stats.dropped_beams += int((~alive).sum())
            else:  # every beam would go: all are kept (the banned token masked), so none is dropped
                stats.fallback_steps += 1
                alive[:] = True
            cand = cand.masked_fill(~alive[:, None], float("-inf"))
            cand[:, banned_id] = float("-inf")
        flat = cand.flatten()
        order = torch.topk(flat, min(2 * num_beams, flat.numel())).indices.tolist()
        new_beams, new_scores, parents = [], [], []
        for idx in order:
            score = float(flat[idx])
            if score == float("-inf"):
                break
            b, t = divmod(idx, vocab)
            if eos_id is not None and t == eos_id:
                tokens = beams[b] + [t]
                finished.append((score / len(tokens) ** length_penalty, tokens))
            else:
                new_beams.append(beams[b] + [t])
                new_scores.append(score)
                parents.append(b)
            if len(new_beams) == num_beams:
                break
        best_live = max(new_scores) / (len(new_beams[0]) ** length_penalty) if new_beams else float("-inf")
        if not new_beams or (len(finished) >= num_beams and max(f[0] for f in finished) >= best_live):
            beams, scores = new_beams, torch.tensor(new_scores, device=device) if new_scores else scores[:0]
            break
        beams, scores = new_beams, torch.tensor(new_scores, device=device)
        if step == max_new_tokens - 1:
            break
        cache.reorder_cache(torch.as_tensor(parents, device=device))
        tokens = torch.as_tensor([b[-1] for b in beams], device=device)[:, None]
        out = model(input_ids=tokens, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    for s, b in zip(scores.tolist(), beams):
        finished.append((s / max(len(b), 1) ** length_penalty, b))
    best = max(finished, key=lambda f: f[0])[1] if finished else []
    return best, stats


def beam_search(model, tokenizer, prompts: Sequence[str], num_beams: int = 4, max_new_tokens: int = 20,
                banned_id: int | None = None, drop_threshold: float | None = None, length_penalty: float = 1.0,
                desc: str = "beam search") -> tuple[Generations, list[BeamStats]]:
    """Beam search over every prompt (one at a time; the beams form the batch)."""
    common.prepare_tokenizer(tokenizer)
    limit = max(common.max_length(model) - max_new_tokens, 1)
    texts, ids_out, stats = [], [], []
    for i, ids in enumerate(common.progress(common.encode(tokenizer, prompts), desc=desc, unit="prompt")):
        if not ids:
            raise common.EvalInputError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
        best, st = beam_search_one(model, ids[-limit:], num_beams=num_beams, max_new_tokens=max_new_tokens,
                                   eos_id=tokenizer.eos_token_id, banned_id=banned_id,
                                   drop_threshold=drop_threshold, length_penalty=length_penalty)
        ids_out.append([best])
        texts.append([tokenizer.decode(best, skip_special_tokens=True)])
        stats.append(st)
    return Generations(prompts=list(prompts), texts=texts, token_ids=ids_out), stats
