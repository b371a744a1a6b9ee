#!/usr/bin/env python
"""Tag JSONL documents with risk spans: ``risk_spans: [[char_start, char_end, level], ...]``.

    # sentence-level toxicity (SLUNG's thresholds), plus e-mails/phones/names as level 4:
    python tools/tag_risk.py --input raw.jsonl --output tagged.jsonl --unit sentence \\
        --tagger classifier --scorer profanity --tagger pii --pii-names names.txt --workers 2

    # word lists per level, whole documents:
    python tools/tag_risk.py --input raw.jsonl --output tagged.jsonl --unit document \\
        --tagger lexicon --lexicon 3:toxic.txt --lexicon 2:ambiguous.txt

Levels: 0 unlabelled, 1 benign, 2 ambiguous, 3 toxic, 4.. user classes. Each character takes the highest
level any tagger gives it. Output records are the input records with the ``--risk-key`` field set (an
object ``{key: spans}`` when there are several ``--json-keys``), in input order, whatever ``--workers``;
the file appears only when everything succeeded, compressed as its name says (``.gz``, ``.zst``). See
megatron_slung/data/tagging.py for the rules and docs/data_tools.md for damaged inputs and killed runs.
"""

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.corpus import (  # noqa: E402
    InputError,
    Progress,
    atomic_text_output,
    check_output_name,
    expand_inputs,
    get_text,
    is_compressed,
    iter_records,
    ordered_pool_map,
    read_chunks,
)
from megatron_slung.data.risk import level_name  # noqa: E402
from megatron_slung.data.tagging import (  # noqa: E402
    UNITS,
    ClassifierTagger,
    LexiconTagger,
    PIITagger,
    RiskTagger,
    read_word_list,
    validate_given,
)


@dataclass
class TagConfig:
    unit: str = "sentence"
    taggers: tuple = ()
    json_keys: tuple = ("text",)
    risk_key: str = "risk_spans"
    lexicon: tuple = ()
    lexicon_default_level: int = 1
    scorer: str | None = None  # None: profanity, or the classifier directory --scorer-path names
    scorer_path: str | None = None
    scorer_label: str | None = None
    scorer_batch_size: int = 32
    scorer_device: str = "auto"  # --scorer hf: auto (a GPU when there is one), cpu, cuda, cuda:N
    toxic_threshold: float = 0.99
    ambiguous_threshold: float = 1e-4
    pii_level: int = 4
    pii_names: tuple = ()
    pii_emails: bool = True
    pii_phones: bool = True
    score_thresholds: tuple | None = None  # a classifier directory's 0-5 score -> levels
    thresholds_given: bool = False  # --toxic-threshold / --ambiguous-threshold given on the command line

    def check(self) -> None:
        """Validate flags and files without loading any model (the workers build the real taggers)."""
        if self.unit != "given" and not ({"lexicon", "classifier"} & set(self.taggers)):
            raise ValueError(f"unit {self.unit!r} needs a lexicon or classifier tagger (or use --unit given)")
        if self.unit == "given" and ({"lexicon", "classifier"} & set(self.taggers)):
            raise ValueError("unit 'given' keeps the input's spans; lexicon/classifier need sentence or document units")
        if "lexicon" in self.taggers:
            if not self.lexicon:
                raise ValueError("--tagger lexicon needs at least one --lexicon LEVEL:PATH")
            LexiconTagger.from_files(list(self.lexicon), self.lexicon_default_level)
        if "classifier" in self.taggers and _classifier_dir_tagger(self, load=False):
            pass  # a train_risk_classifier.py directory: checked there
        elif "classifier" in self.taggers:
            ClassifierTagger(None, self.toxic_threshold, self.ambiguous_threshold)
            if self.scorer_batch_size < 1:
                raise ValueError(f"--scorer-batch-size must be >= 1, got {self.scorer_batch_size}")
            if self.scorer in ("hf", "huggingface"):
                check_device_name(self.scorer_device)  # torch is asked in the workers (CUDA and fork do not mix)
            if self.scorer in ("hf", "huggingface") and not (self.scorer_path and os.path.isdir(self.scorer_path)):
                raise FileNotFoundError(f"--scorer hf needs --scorer-path DIR (a local model directory), got {self.scorer_path!r}")
            if self.scorer in (None, "profanity", "alt-profanity-check"):
                import importlib.util

                if importlib.util.find_spec("profanity_check") is None:
                    raise ImportError("--scorer profanity needs alt-profanity-check: pip install alt-profanity-check")
        if "pii" in self.taggers:
            PIITagger(self.pii_level, [n for path in self.pii_names for n in read_word_list(path)])

    def build(self) -> RiskTagger:
        from megatron_slung.data.scorers import build_scorer

        unit_taggers, span_taggers = [], []
        for name in self.taggers:
            if name == "lexicon":
                if not self.lexicon:
                    raise ValueError("--tagger lexicon needs at least one --lexicon LEVEL:PATH")
                unit_taggers.append(LexiconTagger.from_files(list(self.lexicon), self.lexicon_default_level))
            elif name == "classifier" and _classifier_dir_tagger(self, load=False):
                unit_taggers.append(_classifier_dir_tagger(self))
            elif name == "classifier":
                kw = {}
                if self.scorer in ("hf", "huggingface"):
                    kw = {"label": self.scorer_label, "batch_size": self.scorer_batch_size,
                          "device": resolve_device(self.scorer_device)}
                unit_taggers.append(ClassifierTagger(build_scorer(self.scorer or "profanity", self.scorer_path, **kw),
                                                     self.toxic_threshold, self.ambiguous_threshold))
            elif name == "pii":
                names = [n for path in self.pii_names for n in read_word_list(path)]
                span_taggers.append(PIITagger(self.pii_level, names, self.pii_emails, self.pii_phones))
            else:
                raise ValueError(f"unknown tagger {name!r}: use lexicon, classifier or pii")
        return RiskTagger(self.unit, unit_taggers, span_taggers)


def check_device_name(device: str) -> None:
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--scorer-device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_device(device: str) -> str:
    """``auto``: the first GPU when torch sees one, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` as given
    (a GPU asked for and absent is an error, not a silent CPU run)."""
    check_device_name(device)
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"--scorer-device {device}: torch sees no GPU here")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--scorer-device {device}: torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def _classifier_dir_tagger(cfg: TagConfig, load: bool = True):
    """``--scorer-path DIR`` naming a ``tools/train_risk_classifier.py`` directory (and no other --scorer): its
    0-5 score mapped to levels by ``--score-thresholds``. Returns None for any other scorer (and with
    ``load=False``, True after checking the flags without loading the model)."""
    from megatron_slung.safety.classifier import ScoreThresholdTagger, check_thresholds, is_classifier_dir, load_classifier

    if cfg.scorer not in (None, "risk-classifier") or not is_classifier_dir(cfg.scorer_path):
        if cfg.score_thresholds is not None:
            raise ValueError("--score-thresholds maps the 0-5 score of a tools/train_risk_classifier.py directory "
                             "(--scorer-path DIR); other scorers give [0, 1]: use --toxic-threshold/--ambiguous-threshold")
        return None
    if cfg.score_thresholds is None:
        raise ValueError(f"--scorer-path {cfg.scorer_path} is a 0-5 safety classifier: give --score-thresholds, "
                         "e.g. 2,3 (score >= 2: level 2 ambiguous, >= 3: level 3 toxic)")
    if cfg.thresholds_given:
        raise ValueError("--toxic-threshold/--ambiguous-threshold apply to [0, 1] scorers; this 0-5 classifier "
                         "takes --score-thresholds")
    check_thresholds(cfg.score_thresholds)
    if not load:
        return True
    return ScoreThresholdTagger(load_classifier(cfg.scorer_path), cfg.score_thresholds)


class ChunkTagger:
    def __init__(self, config: TagConfig):
        self.config = config
        self.tagger = config.build()

    def tag_chunk(self, chunk):
        pairs, chars = self.tag_records(chunk.path, iter_records(chunk))
        out = [json.dumps(record, ensure_ascii=False) for _, record in pairs]
        text = "\n".join(out) + ("\n" if out else "")
        return text, len(pairs), len(chunk.data), chars

    def tag_records(self, path, records):
        """Set the risk field of ``records`` (``(line_no, record)`` pairs in line order, lazy or a list);
        returns the pairs as a list and the characters per level."""
        cfg = self.config
        pairs = []
        texts = {key: [] for key in cfg.json_keys}
        given = {key: [] for key in cfg.json_keys} if cfg.unit == "given" else None
        for line_no, record in records:  # one pass in line order: the first bad line is reported
            pairs.append((line_no, record))
            for key in cfg.json_keys:
                text = get_text(record, key, path, line_no)
                texts[key].append(text)
                if given is not None:
                    raw = record.get(cfg.risk_key)
                    if isinstance(raw, dict):
                        raw = raw.get(key)
                    elif raw is not None and len(cfg.json_keys) > 1:
                        raise InputError(path, line_no, f"{cfg.risk_key!r} is a list but there are several "
                                                        "--json-keys; give an object {key: spans}")
                    try:
                        given[key].append(validate_given(raw, len(text)))
                    except ValueError as e:
                        raise InputError(path, line_no, f"{cfg.risk_key!r}: {e}") from None
        per_key = {key: self.tagger.tag(texts[key], None if given is None else given[key]) for key in cfg.json_keys}
        chars = collections.Counter()
        for i, (_, record) in enumerate(pairs):
            if len(cfg.json_keys) == 1:
                record[cfg.risk_key] = per_key[cfg.json_keys[0]][i]
            else:
                record[cfg.risk_key] = {key: per_key[key][i] for key in cfg.json_keys}
            for key in cfg.json_keys:
                for s, e, level in per_key[key][i]:
                    chars[level] += e - s
        return pairs, dict(chars)


_TAGGER = None


def _init(config: TagConfig) -> None:
    global _TAGGER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TAGGER = ChunkTagger(config)
    if "torch" in sys.modules:  # an HF scorer: one thread per worker, so results never depend on thread counts
        sys.modules["torch"].set_num_threads(1)


def _tag(chunk):
    return _TAGGER.tag_chunk(chunk)


def run(inputs, output: str, config: TagConfig, workers: int = 1, log_interval: int = 1000,
        chunk_bytes: int = 1 << 18) -> dict:
    files = expand_inputs(inputs)
    check_output_name(output)
    config.check()  # fail early on bad flags, missing word lists or scorers
    total = None if any(is_compressed(p) for p in files) else sum(os.path.getsize(p) for p in files)
    progress = Progress(log_interval, total)
    chars = collections.Counter()
    start = time.perf_counter()
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    with atomic_text_output(output) as out:
        chunks = (chunk for file_index, path in enumerate(files) for chunk in read_chunks(path, file_index, chunk_bytes))
        with contextlib.closing(ordered_pool_map(_tag, chunks, workers, initializer=_init,
                                                 initargs=(config,))) as results:
            for text, docs, nbytes, counts in results:
                out.write(text)
                chars.update(counts)
                progress.update(docs, nbytes)
    elapsed = time.perf_counter() - start
    return {"documents": progress.docs, "input_bytes": progress.bytes, "seconds": elapsed,
            "docs_per_s": progress.docs / max(elapsed, 1e-9),
            "characters_per_level": {int(k): v for k, v in sorted(chars.items())}, "output": output}


def add_tagger_args(p) -> None:
    """The tagger flags (shared with tools/pipeline.py)."""
    p.add_argument("--unit", choices=UNITS, default="sentence",
                   help="what one level is given to: a sentence, the whole document, or the spans already in the input")
    p.add_argument("--tagger", action="append", choices=("lexicon", "classifier", "pii"), default=[],
                   help="repeat to combine; each character takes the highest level")
    g = p.add_argument_group("lexicon tagger")
    g.add_argument("--lexicon", action="append", default=[], metavar="LEVEL:PATH",
                   help="a word list (one word or phrase a line, # comments) for a level; repeatable")
    g.add_argument("--lexicon-default-level", type=int, default=1, help="level of units with no listed word")
    g = p.add_argument_group("classifier tagger")
    g.add_argument("--scorer", default=None,
                   help="profanity (alt-profanity-check; the default), hf (a local sequence-classification dir), "
                        "or module:callable; a --scorer-path made by tools/train_risk_classifier.py needs none")
    g.add_argument("--scorer-path", default=None,
                   help="the model directory for --scorer hf, or a tools/train_risk_classifier.py directory")
    g.add_argument("--score-thresholds", default=None, metavar="T1,T2,...",
                   help="a train_risk_classifier.py directory: ascending 0-5 thresholds; score >= Ti gives level "
                        "i+1, below T1 level 1 (e.g. 2,3: >= 2 ambiguous, >= 3 toxic)")
    g.add_argument("--scorer-label", default=None, help="--scorer hf: the label (name or index) of the toxic class")
    g.add_argument("--scorer-batch-size", type=int, default=32, help="--scorer hf: texts per forward pass")
    g.add_argument("--scorer-device", default="auto",
                   help="--scorer hf: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    g.add_argument("--toxic-threshold", type=float, default=None, help="score > this: level 3 (default 0.99)")
    g.add_argument("--ambiguous-threshold", type=float, default=None, help="score > this: level 2, else 1 (default 1e-4)")
    g = p.add_argument_group("PII tagger")
    g.add_argument("--pii-level", type=int, default=4, help="level given to private data")
    g.add_argument("--pii-names", action="append", default=[], metavar="PATH", help="a list of names, one a line")
    g.add_argument("--no-pii-emails", action="store_true")
    g.add_argument("--no-pii-phones", action="store_true")


def config_from_args(args) -> TagConfig:
    """The TagConfig of the tagger flags (a bad --score-thresholds raises ValueError)."""
    from megatron_slung.safety.classifier import parse_thresholds

    score_thresholds = None if args.score_thresholds is None else tuple(parse_thresholds(args.score_thresholds))
    thresholds_given = args.toxic_threshold is not None or args.ambiguous_threshold is not None
    return TagConfig(unit=args.unit, taggers=tuple(args.tagger), json_keys=tuple(args.json_keys),
                     risk_key=args.risk_key, lexicon=tuple(args.lexicon),
                     lexicon_default_level=args.lexicon_default_level, scorer=args.scorer,
                     scorer_path=args.scorer_path, scorer_label=args.scorer_label,
                     scorer_batch_size=args.scorer_batch_size, scorer_device=args.scorer_device,
                     toxic_threshold=0.99 if args.toxic_threshold is None else args.toxic_threshold,
                     ambiguous_threshold=1e-4 if args.ambiguous_threshold is None else args.ambiguous_threshold,
                     pii_level=args.pii_level, pii_names=tuple(args.pii_names), pii_emails=not args.no_pii_emails,
                     pii_phones=not args.no_pii_phones, score_thresholds=score_thresholds,
                     thresholds_given=thresholds_given)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL files or globs (.jsonl/.json, .gz/.zst)")
    p.add_argument("--output", required=True, help="output JSONL (.gz or .zst: compressed so)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is tagged")
    p.add_argument("--risk-key", default="risk_spans", help="field written (and read, for --unit given)")
    add_tagger_args(p)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        summary = run(args.input, args.output, config, workers=args.workers, log_interval=args.log_interval)
    except (InputError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    levels = ", ".join(f"{k} {level_name(k)}: {v}" for k, v in summary["characters_per_level"].items()) or "-"
    print(f"tagged {summary['documents']} documents in {summary['seconds']:.1f}s "
          f"({summary['docs_per_s']:.0f} docs/s); characters per level: {levels}; wrote {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
