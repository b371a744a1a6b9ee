"""The stages of the quickstart and the experiment (one implementation, two entry points).

    corpus -> pool -> tag risk -> tokenizer -> preprocess -> pretrain (per run) -> evaluate (per run) -> report

Each stage runs the project's real tools (``tools/tag_risk.py``, ``tools/train_tokenizer.py``,
``tools/preprocess_data.py``, ``python -m megatron_slung.pretrain``, the evaluation suite) and writes
into its own directory under the run directory, finishing with a ``stage.json`` stamp that holds a key
of everything the stage depends on (its settings and the keys of the stages before it). A stage whose
stamp matches is skipped, so a rerun reuses what is built and redoes only what changed; a stage that
died half-way has no stamp and is rebuilt from scratch.

Layout of ``run_dir``::

    corpus/            train_clean/toxic, heldout_clean, labelled, prompts (.jsonl), manifest.json
    data/pool/         the training pool (optionally subsampled) and the held-out texts to tag
    data/tagged/       the same with sentence-level risk_spans (alt-profanity-check)
    tokenizer/         spm.model (SentencePiece BPE with <|endoftext|>, <|pad|>, the harmfulness tag)
    data/bin/          {plain,filtered,tagged}_{clean,toxic}_text_document .bin/.idx (+ .risk)
    data/safety/       rephrased_{clean,toxic}.jsonl, refusals.jsonl and their datasets (rephrased, refusal)
    runs/NAME/         checkpoint/, train.log, metrics.jsonl, eval/ (each task's results), row.json
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

from megatron_slung.experiment.config import (
    SAFETY_TREATMENTS,
    TREATMENT_DATA,
    TREATMENT_POLICY,
    DataConfig,
    ExperimentConfig,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
TOOLS = os.path.join(REPO, "tools")
_print_lock = threading.Lock()


def log(msg: str) -> None:
    with _print_lock:
        print(msg, flush=True)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def show_path(path: str) -> str:
    """``path`` relative to the current directory when it is inside it, else as is."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


def make_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cached_stage(stage_dir: str, key: str, what: str, build) -> dict:
    """Run ``build(stage_dir) -> dict`` unless ``stage_dir/stage.json`` already holds ``key``."""
    stamp = os.path.join(stage_dir, "stage.json")
    if os.path.isfile(stamp):
        try:
            old = read_json(stamp)
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("key") == key:
            log(f"   reusing {what} ({show_path(stage_dir)}, built in {fmt_seconds(old.get('seconds', 0))})")
            return old["result"]
    if os.path.isdir(stage_dir):  # stale or half-built: start clean
        shutil.rmtree(stage_dir)
    os.makedirs(stage_dir)
    start = time.perf_counter()
    result = build(stage_dir)
    seconds = time.perf_counter() - start
    _write_json(stamp, {"key": key, "what": what, "seconds": round(seconds, 1), "result": result,
                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return result


def stage_seconds(stage_dir: str) -> float | None:
    try:
        return read_json(os.path.join(stage_dir, "stage.json"))["seconds"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def run_command(cmd: list[str], log_path: str, prefix: str = "", show=lambda line: True, env=None) -> None:
    """Run ``cmd``, teeing its output to ``log_path`` and (lines ``show`` accepts) to the console with ``prefix``.

    A failure raises with the last lines of the log, so the console says what went wrong."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=REPO, bufsize=1, errors="replace")
        tail: list[str] = []
        for line in proc.stdout:
            logf.write(line)
            line = line.rstrip("\n")
            for part in line.split("\r"):
                tail = (tail + [part])[-40:]
                if part.strip() and show(part):
                    log(f"{prefix}{part}")
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd[:4])} ...\n  full log: {log_path}\n  last lines:\n"
                           + "\n".join("    " + t for t in tail[-25:]))


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["SLUNG_NO_PROGRESS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, records) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Data stages

@dataclass
class DataArtifacts:
    """What the data stages produce, as the training and evaluation stages need it."""
    key: str                      # covers everything up to the preprocessed datasets
    corpus_dir: str
    tokenizer_model: str
    prefixes: dict                # {"plain": {"clean": prefix, "toxic": prefix}, "filtered": ..., "tagged": ...}
    tokens: dict                  # same shape: token counts
    heldout_clean: str            # tagged held-out clean JSONL (perplexity)
    heldout_toxic: str            # tagged held-out toxic JSONL (perplexity of toxic text)
    labelled: str
    prompts: str
    tagger: dict                  # how the risk tagger agrees with the ground-truth labels
    safety_key: str = ""          # the safety data stage's key (only the rephrased / refusal runs depend on it)
    safety: dict | None = None    # what the safety data stage did (rephrased units, refusal documents)


def stage_corpus(run_dir: str, input_path: str | None, seed: int) -> dict:
    from megatron_slung.experiment.corpora import SplitConfig, build_corpus

    corpus_dir = os.path.join(run_dir, "corpus")
    start = time.perf_counter()
    manifest = build_corpus(corpus_dir, input_path, SplitConfig(seed=seed))
    s = manifest["splits"]
    log(f"   corpus ({show_path(corpus_dir)}): {s['train_clean']['documents']} clean + {s['train_toxic']['documents']} toxic training documents, "
        f"held out {s['heldout_clean']['documents']} clean / {s['labelled']['documents']} labelled / "
        f"{s['prompts']['documents']} prompts ({time.perf_counter() - start:.1f} s)")
    return manifest


def _subsample(records: list[dict], max_chars: int | None, seed: int) -> list[dict]:
    if max_chars is None or sum(len(r["text"]) for r in records) <= max_chars:
        return records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        out.append(records[i])
        total += len(records[i]["text"])
    return sorted(out, key=lambda r: r["id"])


def stage_pool(run_dir: str, manifest: dict, dcfg: DataConfig, seed: int) -> tuple[str, dict]:
    """The training pool (clean and toxic, subsampled by the same fraction when max_train_chars is set) and
    the held-out texts that get risk spans (for per-level perplexity)."""
    corpus_dir = os.path.join(run_dir, "corpus")
    key = make_key("pool", manifest["key"], dcfg.max_train_chars, seed)

    def build(out):
        clean = _read_jsonl(os.path.join(corpus_dir, "train_clean.jsonl"))
        toxic = _read_jsonl(os.path.join(corpus_dir, "train_toxic.jsonl"))
        total = sum(len(r["text"]) for r in clean + toxic)
        frac = 1.0 if dcfg.max_train_chars is None else min(1.0, dcfg.max_train_chars / total)
        parts = {"clean": _subsample(clean, int(frac * sum(len(r["text"]) for r in clean)) if frac < 1 else None, seed),
                 "toxic": _subsample(toxic, int(frac * sum(len(r["text"]) for r in toxic)) if frac < 1 else None, seed)}
        parts["heldout_clean"] = _read_jsonl(os.path.join(corpus_dir, "heldout_clean.jsonl"))
        parts["heldout_toxic"] = [{"id": r["id"], "text": r["text"], "source": r["source"]}
                                  for r in _read_jsonl(os.path.join(corpus_dir, "labelled.jsonl")) if r["label"] == 1]
        for name, recs in parts.items():
            _write_jsonl(os.path.join(out, f"{name}.jsonl"), recs)
        return {name: {"documents": len(r), "characters": sum(len(x["text"]) for x in r)} for name, r in parts.items()}

    result = cached_stage(os.path.join(run_dir, "data", "pool"), key, "training pool", build)
    log(f"   pool: {result['clean']['documents']} clean + {result['toxic']['documents']} toxic documents, "
        f"{(result['clean']['characters'] + result['toxic']['characters']) / 1e6:.2f} M characters")
    return key, result


def _tagger_agreement(path: str) -> dict:
    """Share of documents with a toxic (level-3) sentence, by source and ground-truth label."""
    out: dict = {}
    for r in _read_jsonl(path):
        k = f"{r.get('source', '?')}/{'toxic' if r.get('toxic') else 'clean'}"
        e = out.setdefault(k, {"documents": 0, "with_level_3": 0})
        e["documents"] += 1
        e["with_level_3"] += int(any(level >= 3 for _, _, level in r.get("risk_spans", [])))
    for e in out.values():
        e["share_with_level_3"] = round(e["with_level_3"] / max(1, e["documents"]), 4)
    return out


def stage_tag(run_dir: str, pool_key: str, dcfg: DataConfig) -> tuple[str, dict]:
    """Sentence-level risk levels with alt-profanity-check (``tools/tag_risk.py --tagger classifier``)."""
    pool = os.path.join(run_dir, "data", "pool")
    key = make_key("tag", pool_key, dcfg.toxic_threshold, dcfg.ambiguous_threshold)

    def build(out):
        for name in ("clean", "toxic", "heldout_clean", "heldout_toxic"):
            cmd = [sys.executable, os.path.join(TOOLS, "tag_risk.py"), "--input", os.path.join(pool, f"{name}.jsonl"),
                   "--output", os.path.join(out, f"{name}.jsonl"), "--unit", "sentence", "--tagger", "classifier",
                   "--scorer", "profanity", "--toxic-threshold", str(dcfg.toxic_threshold), "--ambiguous-threshold",
                   str(dcfg.ambiguous_threshold), "--workers", str(dcfg.workers), "--log-interval", "5000"]
            run_command(cmd, os.path.join(out, f"{name}.log"), prefix=f"   tag {name}: ",
                        show=lambda line: line.startswith(("processed", "tagged")))
        return {"agreement": {**_tagger_agreement(os.path.join(out, "clean.jsonl")),
                              **_tagger_agreement(os.path.join(out, "toxic.jsonl"))}}

    result = cached_stage(os.path.join(run_dir, "data", "tagged"), key, "risk tags", build)
    for k, e in sorted(result["agreement"].items()):
        log(f"   tagger: {k:28s} {e['share_with_level_3']:6.1%} of {e['documents']} documents have a toxic sentence")
    return key, result


def stage_tokenizer(run_dir: str, pool_key: str, dcfg: DataConfig, seed: int) -> tuple[str, str]:
    pool = os.path.join(run_dir, "data", "pool")
    key = make_key("tokenizer", pool_key, dcfg.vocab_size, dcfg.tokenizer_max_sentences, dcfg.harm_tag, seed)

    def build(out):
        cmd = [sys.executable, os.path.join(TOOLS, "train_tokenizer.py"), "--input", os.path.join(pool, "clean.jsonl"),
               os.path.join(pool, "toxic.jsonl"), "--output-prefix", os.path.join(out, "spm"), "--vocab-size",
               str(dcfg.vocab_size), "--model-type", "bpe", "--harm-tag", dcfg.harm_tag, "--max-sentences",
               str(dcfg.tokenizer_max_sentences), "--seed", str(seed), "--threads", str(dcfg.workers)]
        run_command(cmd, os.path.join(out, "train_tokenizer.log"), prefix="   tokenizer: ",
                    show=lambda line: line.startswith("wrote"))
        return {"model": os.path.join(out, "spm.model")}

    result = cached_stage(os.path.join(run_dir, "tokenizer"), key, "tokenizer", build)
    return key, result["model"]


def _filtered(records: list[dict], min_level: int = 3) -> list[dict]:
    return [r for r in records if not any(level >= min_level for _, _, level in r.get("risk_spans", []))]


def stage_preprocess(run_dir: str, tag_key: str, tok_key: str, tokenizer_model: str, dcfg: DataConfig,
                     seed: int) -> tuple[str, dict]:
    """Megatron datasets with the risk channel: plain, filtered (documents with a toxic sentence dropped) and
    tagged (the harmfulness tag before toxic spans), each for the clean and the toxic pool."""
    tagged = os.path.join(run_dir, "data", "tagged")
    key = make_key("preprocess", tag_key, tok_key, dcfg.harm_tag, dcfg.harm_tag_prob, seed)

    def build(out):
        inputs = os.path.join(out, "inputs")
        os.makedirs(inputs)
        prefixes: dict = {}
        tokens: dict = {}
        documents: dict = {}
        for part in ("clean", "toxic"):
            recs = _read_jsonl(os.path.join(tagged, f"{part}.jsonl"))
            filtered = _filtered(recs)
            _write_jsonl(os.path.join(inputs, f"filtered_{part}.jsonl"), filtered)
            documents.setdefault("plain", {})[part] = documents.setdefault("tagged", {})[part] = len(recs)
            documents.setdefault("filtered", {})[part] = len(filtered)
        for variant in ("plain", "filtered", "tagged"):
            for part in ("clean", "toxic"):
                src = (os.path.join(inputs, f"filtered_{part}.jsonl") if variant == "filtered"
                       else os.path.join(tagged, f"{part}.jsonl"))
                name = f"{variant}_{part}"
                cmd = [sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", src, "--output-prefix",
                       os.path.join(out, name), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                       tokenizer_model, "--workers", str(dcfg.workers), "--append-eod", "--seed", str(seed),
                       "--summary-json", os.path.join(out, f"{name}.summary.json"), "--log-interval", "20000"]
                if variant == "tagged":
                    cmd += ["--harm-tag", dcfg.harm_tag, "--harm-tag-prob", str(dcfg.harm_tag_prob),
                            "--harm-tag-min-level", "3"]
                if documents[variant][part] == 0:
                    prefixes.setdefault(variant, {})[part] = None
                    tokens.setdefault(variant, {})[part] = 0
                    continue
                run_command(cmd, os.path.join(out, f"{name}.log"), prefix=f"   preprocess {name}: ",
                            show=lambda line: line.startswith(("done", "wrote", "summary")))
                summary = read_json(os.path.join(out, f"{name}.summary.json"))
                prefixes.setdefault(variant, {})[part] = os.path.join(out, f"{name}_text_document")
                tokens.setdefault(variant, {})[part] = summary["keys"]["text"]["tokens"]
                if variant == "tagged":
                    tokens.setdefault("tags_inserted", {})[part] = summary["keys"]["text"]["tags_inserted"]
                tokens.setdefault("risk_counts", {})[name] = summary["keys"]["text"]["risk_counts"]
        shutil.rmtree(inputs)
        return {"prefixes": prefixes, "tokens": tokens, "documents": documents}

    result = cached_stage(os.path.join(run_dir, "data", "bin"), key, "preprocessed datasets", build)
    t = result["tokens"]
    log(f"   datasets: plain {t['plain']['clean']:,} clean + {t['plain']['toxic']:,} toxic tokens; filtered "
        f"{t['filtered']['clean']:,} + {t['filtered']['toxic']:,}; tagged with {sum(t['tags_inserted'].values()):,} "
        f"harmfulness tags")
    return key, result


def _preprocess(src: str, out: str, name: str, tokenizer_model: str, dcfg: DataConfig, seed: int) -> tuple[str, dict]:
    cmd = [sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", src, "--output-prefix",
           os.path.join(out, name), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
           "--workers", str(dcfg.workers), "--append-eod", "--seed", str(seed), "--summary-json",
           os.path.join(out, f"{name}.summary.json"), "--log-interval", "20000"]
    run_command(cmd, os.path.join(out, f"{name}.log"), prefix=f"   preprocess {name}: ",
                show=lambda line: line.startswith(("done", "wrote", "summary")))
    return os.path.join(out, f"{name}_text_document"), read_json(os.path.join(out, f"{name}.summary.json"))


def stage_safety(run_dir: str, tag_key: str, tok_key: str, tokenizer_model: str, dcfg: DataConfig,
                 seed: int) -> tuple[str, dict]:
    """Safety Pretraining's data: the pools with their level-3 spans rewritten (``tools/rephrase_risky.py``;
    a generator, or narrative templates without one) and refusal documents built from the level-3 spans
    of both pools (``tools/make_refusal_data.py``), each preprocessed like the other datasets."""
    tagged = os.path.join(run_dir, "data", "tagged")
    generator = os.path.abspath(dcfg.generator) if dcfg.generator else "none"
    gen_id = generator
    if dcfg.generator:
        with open(os.path.join(generator, "config.json"), encoding="utf-8") as f:
            gen_id = [generator, f.read()]
    key = make_key("safety", tag_key, tok_key, gen_id, dcfg.rephrase_max_new_tokens if dcfg.generator else None,
                   dcfg.refusal_max_documents, seed)

    def build(out):
        prefixes, tokens, counts = {"rephrased": {}, "refusal": {}}, {"rephrased": {}, "refusal": {}}, {}
        for part in ("clean", "toxic"):
            dst = os.path.join(out, f"rephrased_{part}.jsonl")
            cmd = [sys.executable, os.path.join(TOOLS, "rephrase_risky.py"), "--input", os.path.join(tagged, f"{part}.jsonl"),
                   "--output", dst, "--generator", generator, "--min-level", "3", "--unit", "span", "--seed", str(seed),
                   "--summary-json", os.path.join(out, f"rephrased_{part}.summary.json")]
            if dcfg.generator:
                cmd += ["--max-new-tokens", str(dcfg.rephrase_max_new_tokens)]
            run_command(cmd, os.path.join(out, f"rephrase_{part}.log"), prefix=f"   rephrase {part}: ",
                        show=lambda line: "records:" in line or line.startswith(("generator", "error")))
            counts[f"rephrased_{part}"] = read_json(os.path.join(out, f"rephrased_{part}.summary.json"))
            if not os.path.getsize(dst):
                prefixes["rephrased"][part], tokens["rephrased"][part] = None, 0
                continue
            prefix, summary = _preprocess(dst, out, f"rephrased_{part}", tokenizer_model, dcfg, seed)
            prefixes["rephrased"][part], tokens["rephrased"][part] = prefix, summary["keys"]["text"]["tokens"]
        dst = os.path.join(out, "refusals.jsonl")
        cmd = [sys.executable, os.path.join(TOOLS, "make_refusal_data.py"), "--input", os.path.join(tagged, "toxic.jsonl"),
               os.path.join(tagged, "clean.jsonl"), "--output", dst, "--min-level", "3", "--seed", str(seed),
               "--max-documents", str(dcfg.refusal_max_documents), "--summary-json", os.path.join(out, "refusals.summary.json")]
        run_command(cmd, os.path.join(out, "refusals.log"), prefix="   refusal data: ",
                    show=lambda line: line.startswith(("wrote", "error", "note")))
        counts["refusals"] = read_json(os.path.join(out, "refusals.summary.json"))
        if counts["refusals"]["documents"]:
            prefix, summary = _preprocess(dst, out, "refusals", tokenizer_model, dcfg, seed)
            prefixes["refusal"]["all"], tokens["refusal"]["all"] = prefix, summary["keys"]["text"]["tokens"]
        else:
            prefixes["refusal"]["all"], tokens["refusal"]["all"] = None, 0
        return {"prefixes": prefixes, "tokens": tokens, "counts": counts, "generator": generator}

    result = cached_stage(os.path.join(run_dir, "data", "safety"), key, "safety data (rephrased, refusals)", build)
    c = result["counts"]
    log(f"   safety data: {c['rephrased_clean']['units'] + c['rephrased_toxic']['units']:,} toxic spans rephrased "
        f"({'narrative templates' if result['generator'] == 'none' else result['generator']}); "
        f"{c['refusals']['documents']:,} refusal documents, {result['tokens']['refusal']['all']:,} tokens")
    return key, result


def prepare_data(cfg: ExperimentConfig, run_dir: str, input_path: str | None = None, timings: dict | None = None
                 ) -> DataArtifacts:
    """All the data stages, each reused when up to date."""
    timings = {} if timings is None else timings
    dcfg = cfg.data

    def timed(name, fn):
        start = time.perf_counter()
        log(f"== {name}")
        out = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        return out

    manifest = timed("corpus", lambda: stage_corpus(run_dir, input_path, cfg.seed))
    pool_key, _ = timed("pool", lambda: stage_pool(run_dir, manifest, dcfg, cfg.seed))
    tag_key, tag = timed("tag risk", lambda: stage_tag(run_dir, pool_key, dcfg))
    tok_key, model = timed("tokenizer", lambda: stage_tokenizer(run_dir, pool_key, dcfg, cfg.seed))
    key, pre = timed("preprocess", lambda: stage_preprocess(run_dir, tag_key, tok_key, model, dcfg, cfg.seed))
    prefixes, tokens, safety_key, safety = dict(pre["prefixes"]), dict(pre["tokens"]), "", None
    if set(SAFETY_TREATMENTS) & set(cfg.treatments):
        safety_key, res = timed("safety data", lambda: stage_safety(run_dir, tag_key, tok_key, model, dcfg, cfg.seed))
        prefixes.update(res["prefixes"])
        tokens.update(res["tokens"])
        safety = {"generator": res["generator"], **res["counts"]}
    corpus = os.path.join(run_dir, "corpus")
    tagged = os.path.join(run_dir, "data", "tagged")
    return DataArtifacts(key=key, corpus_dir=corpus, tokenizer_model=model, prefixes=prefixes, safety_key=safety_key,
                         safety=safety, tokens=tokens, heldout_clean=os.path.join(tagged, "heldout_clean.jsonl"),
                         heldout_toxic=os.path.join(tagged, "heldout_toxic.jsonl"),
                         labelled=os.path.join(corpus, "labelled.jsonl"), prompts=os.path.join(corpus, "prompts.jsonl"),
                         tagger=tag["agreement"])


# ----------------------------------------------------------------------------------------------------
# Runs: pretrain and evaluate one (treatment, toxic share)

@dataclass
class Run:
    treatment: str
    share: float

    @property
    def name(self) -> str:
        return f"{self.treatment}_{round(self.share * 100):02d}pct"

    @property
    def label(self) -> str:
        return f"{self.treatment}@{self.share:.0%}"


def blend(run: Run, data: DataArtifacts, refusal_ratio: float = 0.05) -> list[str]:
    """``--data-path`` for the run: the clean and toxic datasets weighted so that a share ``s`` of the
    training tokens comes from toxic documents. Filtering drops documents before mixing (and rephrasing
    changes their length), so each side is weighted by the share of its tokens that remain (the mix the
    treatment leaves). ``refusal`` adds the refusal documents as a share ``refusal_ratio`` of the tokens."""
    if run.treatment == "refusal":
        from megatron_slung.safety.refusal import blend_weights

        base = blend(Run("ce", run.share), data)
        pairs = [(1.0, base[0])] if len(base) == 1 else [(float(w), p) for w, p in zip(base[::2], base[1::2])]
        refusal = data.prefixes["refusal"]["all"]
        return blend_weights(pairs, refusal, refusal_ratio) if refusal else base
    variant = TREATMENT_DATA[run.treatment]
    prefixes = data.prefixes[variant]
    plain = data.tokens["plain"]
    kept = {p: (data.tokens[variant][p] / plain[p] if plain[p] else 0.0) for p in ("clean", "toxic")}
    w_clean, w_toxic = (1.0 - run.share) * kept["clean"], run.share * kept["toxic"]
    if prefixes["toxic"] is None or w_toxic <= 0:
        return [prefixes["clean"]]
    total = w_clean + w_toxic
    return [f"{w_clean / total:.6f}", prefixes["clean"], f"{w_toxic / total:.6f}", prefixes["toxic"]]


def run_key(run: Run, cfg: ExperimentConfig, data: DataArtifacts) -> str:
    if run.treatment in SAFETY_TREATMENTS:  # the other runs keep their keys (and checkpoints) when these are added
        return make_key("train", data.key, run.treatment, run.share, asdict(cfg.model), cfg.seed, data.safety_key,
                        cfg.data.refusal_ratio if run.treatment == "refusal" else None)
    return make_key("train", data.key, run.treatment, run.share, asdict(cfg.model), cfg.seed)


def train_run(run: Run, cfg: ExperimentConfig, data: DataArtifacts, run_dir: str, threads: int) -> dict:
    """``python -m megatron_slung.pretrain`` on the run's blend with the treatment's loss policy."""
    out_dir = os.path.join(run_dir, "runs", run.name, "train")
    key = run_key(run, cfg, data)

    def build(out):
        cmd = [sys.executable, "-m", "megatron_slung.pretrain", *cfg.model.flags(),
               "--data-path", *blend(run, data, cfg.data.refusal_ratio), "--split", "100,0,0", "--data-cache-path", os.path.join(out, "cache"),
               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data.tokenizer_model,
               "--risk-loss-policy", TREATMENT_POLICY[run.treatment], "--seed", str(cfg.seed),
               "--eval-iters", "0", "--num-workers", "0", "--no-progress-bar",
               "--save", os.path.join(out, "checkpoint"), "--metrics-jsonl", os.path.join(out, "metrics.jsonl")]
        start = time.perf_counter()
        run_command(cmd, os.path.join(out, "train.log"), prefix=f"   [{run.label}] ", env=thread_env(threads),
                    show=lambda line: line.startswith(("iter ", "megatron-slung pretrain", "done:", "error")))
        records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") if x.strip()]
        train = [r for r in records if r.get("kind") == "train"]
        shutil.rmtree(os.path.join(out, "cache"), ignore_errors=True)
        return {"checkpoint": os.path.join(out, "checkpoint"), "final_loss": train[-1]["loss"] if train else None,
                "train_seconds": round(time.perf_counter() - start, 1), "tokens": cfg.model.tokens_per_run,
                "data_path": blend(run, data, cfg.data.refusal_ratio)}

    return {**cached_stage(out_dir, key, f"{run.label} checkpoint", build), "key": key}


def evaluate_run(run: Run, cfg: ExperimentConfig, data: DataArtifacts, run_dir: str, trained: dict,
                 threads: int) -> dict:
    """The evaluation suite on the run's checkpoint, in its own process (``megatron_slung.experiment.evaluate``)."""
    out_dir = os.path.join(run_dir, "runs", run.name, "eval")
    key = make_key("eval", trained["key"], asdict(cfg.eval), cfg.data.harm_tag, cfg.seed)

    def build(out):
        spec = {"checkpoint": trained["checkpoint"], "output_dir": out, "label": run.label,
                "heldout_clean": data.heldout_clean, "heldout_toxic": data.heldout_toxic, "labelled": data.labelled,
                "prompts": data.prompts, "eval": asdict(cfg.eval), "harm_tag": cfg.data.harm_tag, "seed": cfg.seed,
                "threads": threads}
        spec_path = os.path.join(out, "spec.json")
        _write_json(spec_path, spec)
        run_command([sys.executable, "-m", "megatron_slung.experiment.evaluate", spec_path],
                    os.path.join(out, "eval.log"), prefix=f"   [{run.label}] ", env=thread_env(threads),
                    show=lambda line: line.startswith("eval"))
        return read_json(os.path.join(out, "row.json"))

    return cached_stage(out_dir, key, f"{run.label} evaluation", build)


def run_all(runs: list[Run], cfg: ExperimentConfig, data: DataArtifacts, run_dir: str) -> list[dict]:
    """Train and evaluate every run, ``cfg.jobs`` at a time; returns one row per run (in ``runs`` order)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = max(1, min(cfg.jobs, len(runs)))
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // jobs)
    start = time.perf_counter()
    done = [0]
    lock = threading.Lock()
    log(f"== pretrain + evaluate: {len(runs)} runs, {jobs} at a time, {threads} thread(s) each; "
        f"{cfg.model.tokens_per_run:,} training tokens per run")

    def one(run: Run) -> dict:
        trained = train_run(run, cfg, data, run_dir, threads)
        row = evaluate_run(run, cfg, data, run_dir, trained, threads)
        row = {"run": run.name, "treatment": run.treatment, "toxic_share": run.share,
               "final_train_loss": trained.get("final_loss"), "train_seconds": trained.get("train_seconds"), **row}
        _write_json(os.path.join(run_dir, "runs", run.name, "row.json"), row)
        with lock:
            done[0] += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / done[0] * (len(runs) - done[0])
            log(f"== {done[0]}/{len(runs)} runs done ({run.label}: perplexity {row.get('perplexity', float('nan')):.1f}, "
                f"expected max toxicity {row.get('expected_max_toxicity', float('nan')):.3f}, probe F1 "
                f"{row.get('probe_f1', float('nan')):.3f}); elapsed {fmt_seconds(elapsed)}, ETA {fmt_seconds(eta)}")
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, runs))
