#!/usr/bin/env python
"""Train a safety classifier (0-5 scale) from labelled JSONL; write a model directory and its report.json.

    python tools/train_risk_classifier.py --input labelled.jsonl --text-key text --label-key label \\
        --output runs/clf                                   # hashed n-grams + logistic regression (SGD)
    python tools/train_risk_classifier.py ... --backend fasttext           # pip install fasttext-numpy2
    python tools/train_risk_classifier.py ... --hf-model path/to/encoder   # fine-tune a local HF encoder

Labels: 0/1, integer scores 0-5, or probabilities in [0, 1], detected (or --label-type); a value of no such
kind, or a file mixing kinds, is refused with file:line. The directory is used by
``tools/tag_risk.py --tagger classifier --scorer-path DIR --score-thresholds 2,3``. See
megatron_slung/safety/classifier.py and docs/safety_data.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.corpus import InputError  # noqa: E402
from megatron_slung.safety.classifier import BACKENDS, LABEL_TYPES, train  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", dest="inputs", help="JSONL files or globs (.gz/.zst too)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--label-key", default="label", help="a 0/1 label, a 0-5 score or a probability in [0, 1]")
    p.add_argument("--label-type", choices=("auto",) + LABEL_TYPES, default="auto")
    p.add_argument("--output", required=True, help="the model directory (replaced when it is one already)")
    p.add_argument("--backend", choices=[b for b in BACKENDS if b != "hf"], default="linear",
                   help="linear: hashed n-grams + SGD logistic regression; fasttext: fastText supervised")
    p.add_argument("--hf-model", default=None, metavar="DIR", help="fine-tune this local HF encoder instead")
    p.add_argument("--holdout", type=float, default=0.1, help="share of records held out for report.json")
    p.add_argument("--positive-from", type=int, default=3,
                   help="0-5 labels: a score >= this counts as unsafe (AUROC, F1, calibration, P(unsafe))")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096, help="records per partial_fit step")
    p.add_argument("--shuffle-buffer", type=int, default=200_000, help="records shuffled together (bounds memory)")
    p.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("linear backend")
    g.add_argument("--hash-bits", type=int, default=20, help="2^bits hashed features")
    g.add_argument("--ngrams", type=int, default=2, help="n-grams up to this length (words; chars with --analyzer char_wb)")
    g.add_argument("--analyzer", choices=("word", "char_wb"), default="word")
    g.add_argument("--alpha", type=float, default=1e-6, help="L2 regularisation of SGDClassifier")
    g = p.add_argument_group("fasttext backend")
    g.add_argument("--fasttext-dim", type=int, default=64)
    g.add_argument("--fasttext-lr", type=float, default=0.5)
    g = p.add_argument_group("HF fine-tuning (--hf-model)")
    g.add_argument("--hf-lr", type=float, default=3e-5)
    g.add_argument("--hf-batch-size", type=int, default=16)
    g.add_argument("--max-length", type=int, default=256, help="tokens per text")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if args.ngrams < 1 or args.epochs < 1 or args.batch_size < 1 or args.shuffle_buffer < 1:
        p.error("--ngrams, --epochs, --batch-size and --shuffle-buffer must be >= 1")
    if not 1 <= args.hash_bits <= 28:
        p.error(f"--hash-bits {args.hash_bits}: must be 1..28")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        report = train(args, log=lambda msg: print(msg, flush=True))
    except (InputError, FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"held out {report['heldout_records']:,} records: AUROC {fmt(report['auroc'])}, F1 {fmt(report['f1'])}, "
          f"ECE {fmt(report['ece'])}, score MAE {fmt(report['score_mae'])}; wrote {args.output}/ "
          f"({report['kind']}, {report['label_type']} labels) and {os.path.join(args.output, 'report.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
