"""Refusal-style training documents (Safety Pretraining's refusal data): an unsafe request, then a refusal
and its reason.

A *request* comes from each selected record: its whole text (``request_unit="document"``; a prompt file
with ``select="all"``), or its risky spans, level >= ``min_level``, joined (``request_unit="span"``). It is
cut to ``max_request_chars`` at a word boundary. Each document takes a template (``{request}``,
``{reason}``, ``{reason_lower}``) and a reason (a line of the reasons file; ``LEVEL: reason`` lines apply to
that level only), both chosen by a hash of (seed, file, line). With a generator, the reason is written by
the model after the template's text up to ``{reason}`` (sampled, seeded per batch); an empty generation
keeps the template reason and says so in the provenance.

Each document's ``risk_spans`` give the request its source level and the rest level 1 (benign), so the
risk-aware losses can still tell them apart; ``refusal`` holds the provenance. The blend: a share
``ratio`` of the training tokens from the refusal dataset, the rest from the base blend scaled by
``1 - ratio`` (:func:`blend_weights`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from megatron_slung.data.corpus import atomic_text_output, check_output_name
from megatron_slung.safety.generator import GenerationConfig
from megatron_slung.safety.records import iter_input, risky_runs, spans_of, text_of, unit_random
from megatron_slung.safety.rephrase import TEMPLATES, load_templates


def load_reasons(path: str | None) -> list[tuple[int | None, str]]:
    path = path or os.path.join(TEMPLATES, "refusal_reasons.txt")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            level, sep, rest = line.partition(":")
            if sep and level.strip().isdigit():
                out.append((int(level), rest.strip()))
            else:
                out.append((None, line))
    if not any(level is None for level, _ in out):
        raise ValueError(f"--reasons {path}: needs at least one reason without a level (for every level)")
    return out


def cut_words(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit] + " ..."


@dataclass
class RefusalConfig:
    inputs: list
    output: str
    select: str = "risky"          # risky: records with a span >= min_level; all: every record (a prompt file)
    request_unit: str = "span"     # span | document
    min_level: int = 3
    request_level: int = 3         # level of requests from records without spans (select=all)
    text_key: str = "text"
    risk_key: str = "risk_spans"
    templates: tuple = ()
    reasons: str | None = None
    max_request_chars: int = 400
    max_documents: int | None = None
    generator: str | None = None
    engine: str = "auto"
    gen: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=48))
    seed: int = 1234
    device: str | None = None


def _requests(cfg: RefusalConfig):
    """``(file_index, path, line, request, level)`` for each selected record."""
    n = 0
    for file_index, path, line, record in iter_input(cfg.inputs):
        text = text_of(record, cfg.text_key, path, line)
        spans = spans_of(record, cfg.risk_key, text, path, line)
        runs = risky_runs(spans, cfg.min_level)
        if cfg.select == "risky" and not runs:
            continue
        level = max((lv for _, _, lv in runs), default=cfg.request_level)
        if cfg.request_unit == "span" and runs:
            request = " ".join(text[s:e].strip() for s, e, _ in runs)
        else:
            request = text
        request = cut_words(request, cfg.max_request_chars)
        if not request:
            continue
        yield file_index, path, line, request, level
        n += 1
        if cfg.max_documents is not None and n >= cfg.max_documents:
            return


def make_refusals(cfg: RefusalConfig, log=print) -> dict:
    if cfg.select not in ("risky", "all") or cfg.request_unit not in ("span", "document"):
        raise ValueError("--select is risky or all; --request-unit is span or document")
    check_output_name(cfg.output)
    templates = load_templates(cfg.templates, "refusal")
    for name, t in templates:
        if "{request}" not in t or ("{reason}" not in t and "{reason_lower}" not in t):
            raise ValueError(f"--template {name}: a refusal template needs {{request}} and {{reason}} (or {{reason_lower}})")
    reasons = load_reasons(cfg.reasons)
    gen = None
    if cfg.generator:
        from megatron_slung.safety.generator import build_generator

        gen = build_generator(cfg.generator, cfg.engine, cfg.gen, cfg.device)
    counts = {"documents": 0, "generated_reasons": 0, "template_reasons": 0, "characters": 0}
    with atomic_text_output(cfg.output) as out:
        batch: list = []
        for item in _requests(cfg):
            batch.append(item)
            if len(batch) >= cfg.gen.batch_size:
                _write_batch(batch, cfg, templates, reasons, gen, counts, out)
                batch = []
        if batch:
            _write_batch(batch, cfg, templates, reasons, gen, counts, out)
    if counts["documents"] == 0:
        log("note: no record was selected (no span at --min-level; --select all takes every record)")
    return {**counts, "output": cfg.output}


def _write_batch(batch, cfg, templates, reasons, gen, counts, out) -> None:
    docs = []
    for file_index, path, line, request, level in batch:
        name, template = templates[int(unit_random(cfg.seed, "template", file_index, line) * len(templates))]
        pool = [r for lv, r in reasons if lv == level] or [r for lv, r in reasons if lv is None]
        reason = pool[int(unit_random(cfg.seed, "reason", file_index, line) * len(pool))]
        docs.append([file_index, path, line, request, level, name, template, reason, "template"])
    if gen is not None:
        prompts = []
        for d in docs:
            head = d[6].replace("{request}", d[3])
            cut = min(i for i in (head.find("{reason}"), head.find("{reason_lower}")) if i >= 0)
            prompts.append(head[:cut])
        fits = [i for i, p in enumerate(prompts) if gen.fits(p)]
        seed = int(unit_random(cfg.seed, "batch", counts["documents"]) * 2 ** 31)
        texts = gen.generate([prompts[i] for i in fits], seed) if fits else []
        for i, t in zip(fits, texts):
            t = " ".join(t.split())
            if t:
                docs[i][7], docs[i][8] = t, "generator"
    for file_index, path, line, request, level, name, template, reason, source in docs:
        lower = reason[:1].lower() + reason[1:]
        text = template.replace("{reason_lower}", lower).replace("{reason}", reason)
        start = text.find("{request}")
        text = text.replace("{request}", request, 1)
        spans = [[0, start, 1]] if start > 0 else []
        spans.append([start, start + len(request), level])
        if start + len(request) < len(text):
            spans.append([start + len(request), len(text), 1])
        rec = {"text": text, "risk_spans": spans,
               "refusal": {"source_file": path, "source_line": line, "template": name, "reason": source,
                           "request_span": [start, start + len(request)], "level": level}}
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        counts["documents"] += 1
        counts["characters"] += len(text)
        counts["generated_reasons" if source == "generator" else "template_reasons"] += 1


def parse_blend(items: list[str]) -> list[tuple[float, str]]:
    """``["0.7", "A", "0.3", "B"]`` or ``["A"]`` (one dataset, weight 1) as ``[(weight, prefix), ...]``."""
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ValueError(f"--base-data-path: a blend is weight/prefix pairs (0.7 A 0.3 B); got {len(items)} items")
    out = []
    for w, p in zip(items[::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--base-data-path: {w!r} is not a weight") from None
        if weight < 0:
            raise ValueError(f"--base-data-path: weight {w} must be >= 0")
        out.append((weight, p))
    if sum(w for w, _ in out) <= 0:
        raise ValueError("--base-data-path: the weights add up to 0")
    return out


def blend_weights(base: list[tuple[float, str]], refusal_prefix: str, ratio: float) -> list[str]:
    """A ``--data-path`` blend with a share ``ratio`` of the samples (so of the tokens) from the refusal
    dataset and the base blend's own proportions for the rest."""
    if not 0 < ratio < 1:
        raise ValueError(f"--ratio {ratio}: must be in (0, 1)")
    total = sum(w for w, _ in base)
    out = []
    for w, p in base:
        out += [f"{(1 - ratio) * w / total:.6f}", p]
    return out + [f"{ratio:.6f}", refusal_prefix]
