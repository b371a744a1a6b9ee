"""Rewrite the risky documents or spans of tagged JSONL (Safety Pretraining's "rephrase unsafe text").

A *unit* is what gets rewritten: with ``unit="span"`` each maximal run of characters whose risk level is
>= ``min_level`` (from the record's ``risk_spans``), with ``unit="document"`` the whole text of a record
that has such a run. Each unit gets a prompt template (chosen by a hash of seed, file, line and unit
number), the generator rewrites it, and the rewrite replaces it (the unit's leading and trailing
whitespace kept). With ``generator="none"`` no model runs: the unit is replaced by a *narrative* template
(``{level_name}``, ``{level}``, ``{words}``), a redaction that says what was there.

Output records are the input records with ``text`` replaced, the spans of the untouched text shifted to
their new offsets (a rewritten unit is left without a span: unlabelled; re-tag the output to score it), and
a ``rephrase`` field with the provenance: source file and line, the units (original and new character
spans, level, template) and the generator. Records without a risky unit are written unchanged (with
``--emit all``). A record is dropped, and counted, when a prompt does not fit the generator's context or
the rewrite is empty, so that no risky text is kept by accident.

Batches are fixed by the input (records are taken until ``batch_size`` units are gathered) and each is
seeded by its number, so a rerun after a kill (:mod:`resumable`) writes the same bytes as one run.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import asdict, dataclass, field

from megatron_slung.data.risk import level_name
from megatron_slung.safety.generator import GenerationConfig
from megatron_slung.safety.records import iter_input, risky_runs, spans_of, text_of, unit_random
from megatron_slung.safety.resumable import ResumableOutput

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
UNITS = ("span", "document")


def load_templates(paths, default_dir: str) -> list[tuple[str, str]]:
    """``(name, text)`` of each template file (default: every ``*.txt`` of the shipped ``default_dir``)."""
    paths = list(paths) or sorted(glob.glob(os.path.join(TEMPLATES, default_dir, "*.txt")))
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--template {p!r}: no such file")
        with open(p, encoding="utf-8") as f:
            text = f.read().strip("\n")
        if not text.strip():
            raise ValueError(f"--template {p}: the file is empty")
        out.append((os.path.splitext(os.path.basename(p))[0], text))
    if len({name for name, _ in out}) != len(out):
        raise ValueError(f"--template: two templates share a file name ({[n for n, _ in out]}); names are the provenance")
    return out


def pick(templates, seed: int, *where):
    return templates[int(unit_random(seed, "template", *where) * len(templates))]


@dataclass
class RephraseConfig:
    inputs: list
    output: str
    generator: str = "none"        # an HF causal-LM directory, or "none" (narrative templates, no model)
    engine: str = "auto"
    unit: str = "span"
    min_level: int = 3
    text_key: str = "text"
    risk_key: str = "risk_spans"
    templates: tuple = ()
    emit: str = "all"              # all | rephrased
    seed: int = 1234
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    max_batches: int | None = None  # stop after this many batches (a rerun continues)
    device: str | None = None


def _split_ws(s: str) -> tuple[str, str, str]:
    core = s.strip()
    if not core:
        return s, "", ""
    lead = s[: len(s) - len(s.lstrip())]
    return lead, core, s[len(lead) + len(core):]


def _fingerprint(cfg: RephraseConfig, templates) -> dict:
    gen_id = "none"
    if cfg.generator != "none":
        with open(os.path.join(cfg.generator, "config.json"), "rb") as f:
            gen_id = {"path": os.path.abspath(cfg.generator), "config": f.read().decode("utf-8", "replace")}
    inputs = [(os.path.abspath(p), os.path.getsize(p)) for p in sorted(set(_expand(cfg.inputs)))]
    return {"tool": "rephrase_risky", "inputs": inputs, "generator": gen_id,
            "engine": cfg.engine if cfg.generator != "none" else None, "unit": cfg.unit, "min_level": cfg.min_level,
            "text_key": cfg.text_key, "risk_key": cfg.risk_key, "templates": templates, "emit": cfg.emit,
            "seed": cfg.seed, "generation": asdict(cfg.gen) if cfg.generator != "none" else None}


def _expand(inputs):
    from megatron_slung.data.corpus import expand_inputs

    return expand_inputs(inputs)


def rephrase(cfg: RephraseConfig, log=print) -> dict:
    if cfg.unit not in UNITS:
        raise ValueError(f"--unit {cfg.unit!r}: choose from {', '.join(UNITS)}")
    if cfg.emit not in ("all", "rephrased"):
        raise ValueError(f"--emit {cfg.emit!r}: choose all or rephrased")
    if not 1 <= cfg.min_level <= 255:
        raise ValueError(f"--min-level {cfg.min_level}: must be 1..255")
    if cfg.gen.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    templates = load_templates(cfg.templates, "narrative" if cfg.generator == "none" else "rephrase")
    if cfg.generator != "none":
        for name, text in templates:
            if "{text}" not in text:
                raise ValueError(f"--template {name}: a generator prompt needs the placeholder {{text}}")
    out = ResumableOutput(cfg.output, _fingerprint(cfg, templates), log)
    if out.done:
        return {**out.counts, "output": cfg.output, "resumed": True}
    gen = None
    if cfg.generator != "none":
        from megatron_slung.safety.generator import build_generator

        gen = build_generator(cfg.generator, cfg.engine, cfg.gen, cfg.device)
        log(f"generator {cfg.generator} ({gen.engine}), context {gen.context} tokens")
    counts = {"records": 0, "rephrased": 0, "unchanged": 0, "units": 0, "dropped_too_long": 0,
              "dropped_empty": 0, "without_spans": 0, "batches": 0, **out.counts}
    start, done_before = time.perf_counter(), out.consumed
    batch: list = []  # (file_index, path, line, record, text, spans, runs)
    units_in_batch = 0

    last_log = [start]

    def flush(final=False):
        nonlocal batch, units_in_batch
        lines = _rewrite_batch(batch, cfg, templates, gen, counts)
        counts["records"] += len(batch)
        counts["batches"] += 1
        out.append(lines, out.consumed + len(batch), counts)
        now = time.perf_counter()
        elapsed = now - start
        if now - last_log[0] < 10 and not final:
            batch, units_in_batch = [], 0
            return
        last_log[0] = now
        log(f"batch {counts['batches']}: {counts['records']:,} records, {counts['rephrased']:,} rephrased "
            f"({counts['units']:,} units), {counts['dropped_too_long'] + counts['dropped_empty']} dropped; "
            f"{(out.consumed - done_before) / max(elapsed, 1e-9):.1f} records/s")
        batch, units_in_batch = [], 0

    stopped, batches_now = False, 0
    for i, (file_index, path, line, record) in enumerate(iter_input(cfg.inputs)):
        if i < out.consumed:
            continue
        text = text_of(record, cfg.text_key, path, line)
        spans = spans_of(record, cfg.risk_key, text, path, line)
        runs = risky_runs(spans, cfg.min_level)
        if runs and cfg.unit == "document":
            runs = [(0, len(text), max(level for _, _, level in runs))]
        batch.append((file_index, path, line, record, text, spans, runs))
        units_in_batch += len(runs)
        if units_in_batch >= cfg.gen.batch_size or len(batch) >= 4 * cfg.gen.batch_size + 256:
            flush()
            batches_now += 1
            if cfg.max_batches is not None and batches_now >= cfg.max_batches:
                stopped = True
                break
    if batch and not stopped:
        flush(final=True)
    if stopped:
        log(f"stopped after {counts['batches']} batches (--max-batches); rerun the same command to continue")
        return {**counts, "output": cfg.output, "complete": False}
    out.finish()
    return {**counts, "output": cfg.output, "complete": True}


def _rewrite_batch(batch, cfg: RephraseConfig, templates, gen, counts) -> list[str]:
    # 1. every unit's template and prompt (or, without a generator, its narrative)
    jobs = []  # (record index, unit index, lead, trail, template name, prompt or rewrite)
    for r, (file_index, path, line, record, text, spans, runs) in enumerate(batch):
        for u, (s, e, level) in enumerate(runs):
            lead, core, trail = _split_ws(text[s:e])
            name, template = pick(templates, cfg.seed, file_index, line, u)
            if gen is None:
                body = (template.replace("{level_name}", level_name(level)).replace("{level}", str(level))
                        .replace("{words}", str(len(core.split()))))
            else:
                body = template.replace("{text}", core)
            jobs.append([r, u, lead, trail, name, body])
    # 2. generate (prompts that do not fit the context drop their record)
    too_long = set()
    if gen is not None:
        fits = [gen.fits(j[5]) for j in jobs]
        fit = [j for j, ok in zip(jobs, fits) if ok]
        too_long = {j[0] for j, ok in zip(jobs, fits) if not ok}
        seed = int(unit_random(cfg.seed, "batch", counts["batches"]) * 2 ** 31)
        texts = gen.generate([j[5] for j in fit], seed) if fit else []
        for j, t in zip(fit, texts):
            j[5] = t.strip()
    rewrites: dict = {}
    for j in jobs:
        rewrites.setdefault(j[0], []).append(j)
    # 3. the new records
    lines = []
    for r, (file_index, path, line, record, text, spans, runs) in enumerate(batch):
        prov = {"source_file": path, "source_line": line}
        if not record.get(cfg.risk_key):
            counts["without_spans"] += 1
        if not runs:
            counts["unchanged"] += 1
            if cfg.emit == "all":
                lines.append(json.dumps({**record, "rephrase": {**prov, "status": "unchanged"}}, ensure_ascii=False))
            continue
        if r in too_long:
            counts["dropped_too_long"] += 1
            continue
        js = rewrites[r]
        if any(not j[5] for j in js):
            counts["dropped_empty"] += 1
            continue
        pieces, units, pos, shift = [], [], 0, []  # shift: (original end of a unit, offset change after it)
        delta = 0
        for (s, e, level), (_, _, lead, trail, name, new) in zip(runs, js):
            pieces.append(text[pos:s])
            new_start = s + delta
            piece = lead + new + trail
            pieces.append(piece)
            units.append({"span": [s, e], "level": level, "new_span": [new_start, new_start + len(piece)],
                          "template": name})
            delta += len(piece) - (e - s)
            shift.append((e, delta))
            pos = e
        pieces.append(text[pos:])
        new_spans = []
        for s, e, level in spans:
            if any(us <= s and e <= ue for us, ue, _ in runs):
                continue  # rewritten
            d = 0
            for end, dd in shift:
                if end <= s:
                    d = dd
            new_spans.append([s + d, e + d, level])
        rec = dict(record)
        rec[cfg.text_key] = "".join(pieces)
        rec[cfg.risk_key] = new_spans
        rec["rephrase"] = {**prov, "status": "rephrased", "unit": cfg.unit, "units": units,
                           "generator": "none" if gen is None else os.path.basename(os.path.normpath(cfg.generator)),
                           "engine": None if gen is None else gen.engine}
        counts["rephrased"] += 1
        counts["units"] += len(units)
        lines.append(json.dumps(rec, ensure_ascii=False))
    return lines
