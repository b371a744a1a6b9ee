"""The command line shared by ``examples/quickstart.py`` and ``examples/experiment.py``.

Both run the same stages (``stages.py``) and write the same report (``report.py``); they differ only in
their defaults: the quickstart trains three variants at 10% toxic share at the ``tiny`` scale into
``runs/quickstart``; the experiment runs the whole grid (toxic share x treatment) at ``--scale``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from megatron_slung.experiment import stages
from megatron_slung.experiment.config import SCALES, TREATMENTS, scale_config
from megatron_slung.experiment.report import write_report


def build_parser(quickstart: bool) -> argparse.ArgumentParser:
    prog = "examples/quickstart.py" if quickstart else "examples/experiment.py"
    p = argparse.ArgumentParser(prog=prog, description=(
        "Corpus -> risk tags -> tokenizer -> preprocess -> pretrain variants -> evaluate -> table and plot. "
        "Every stage is skipped when its outputs are up to date, so a rerun continues where it stopped."))
    p.add_argument("--scale", choices=SCALES, default="tiny",
                   help="model size, steps and evaluation sizes (smoke: seconds, tiny: CPU minutes per run, "
                        "small: CPU hours, gpu-hours: one GPU for hours)")
    p.add_argument("--run-dir", default=None,
                   help="where everything goes (default runs/quickstart, or runs/experiment-SCALE)")
    p.add_argument("--input", default=None,
                   help="your own JSONL (text, optional toxic 0/1 and source) instead of the built-in corpus")
    p.add_argument("--treatments", default=None,
                   help=f"comma list from {','.join(TREATMENTS)} (default: " +
                        ("ce,masked,unlikelihood)" if quickstart else "all)"))
    p.add_argument("--shares", default=None,
                   help="toxic shares of the training mix in percent, comma list (default: " +
                        ("10)" if quickstart else "0,5,10,25)"))
    p.add_argument("--generator", default=None, metavar="DIR",
                   help="rephrased: a local HF causal LM that rewrites the toxic spans (default: narrative templates, "
                        "no model)")
    p.add_argument("--refusal-ratio", type=float, default=None,
                   help="refusal: share of the training tokens from refusal documents, in percent (default 5)")
    p.add_argument("--train-iters", type=int, default=None, help="override the scale's training steps")
    p.add_argument("--jobs", type=int, default=None, help="runs trained/evaluated at once (default: the scale's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: CPUs / jobs)")
    p.add_argument("--seed", type=int, default=1234)
    return p


def config_from_args(args, quickstart: bool):
    cfg = scale_config(args.scale)
    cfg.name = "quickstart" if quickstart else f"experiment-{args.scale}"
    treatments = args.treatments or ("ce,masked,unlikelihood" if quickstart else ",".join(TREATMENTS))
    cfg.treatments = tuple(t.strip() for t in treatments.split(",") if t.strip())
    unknown = [t for t in cfg.treatments if t not in TREATMENTS]
    if unknown or not cfg.treatments:
        raise SystemExit(f"error: unknown treatment(s) {unknown}; choose from {', '.join(TREATMENTS)}")
    shares = args.shares or ("10" if quickstart else "0,5,10,25")
    try:
        cfg.shares = tuple(float(s) / 100.0 for s in shares.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"error: --shares {shares!r}: expected percentages such as 0,5,10,25") from None
    if not cfg.shares or any(not 0 <= s < 1 for s in cfg.shares):
        raise SystemExit(f"error: --shares {shares!r}: each share must be in [0, 100)")
    if args.generator is not None:
        if not os.path.isfile(os.path.join(args.generator, "config.json")):
            raise SystemExit(f"error: --generator {args.generator!r} is not a local Hugging Face model directory")
        cfg.data.generator = os.path.abspath(args.generator)
    if args.refusal_ratio is not None:
        if not 0 < args.refusal_ratio < 100:
            raise SystemExit(f"error: --refusal-ratio {args.refusal_ratio}: a percentage in (0, 100)")
        cfg.data.refusal_ratio = args.refusal_ratio / 100.0
    if args.train_iters is not None:
        cfg.model.train_iters = args.train_iters
        cfg.model.lr_warmup_iters = min(cfg.model.lr_warmup_iters, max(0, args.train_iters // 10))
    if args.jobs is not None:
        cfg.jobs = max(1, args.jobs)
    elif quickstart and cfg.jobs > 1:
        # A few runs: all at once (3 runs on 2 cores finish in 1.5 run-times, not 2).
        cfg.jobs = max(cfg.jobs, min(3, len(cfg.treatments) * len(cfg.shares)))
    cfg.threads = args.threads
    cfg.seed = args.seed
    return cfg


def main(argv=None, quickstart: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(quickstart).parse_args(argv)
    cfg = config_from_args(args, quickstart)
    run_dir = os.path.abspath(args.run_dir or os.path.join("runs", "quickstart" if quickstart else f"experiment-{args.scale}"))
    os.makedirs(run_dir, exist_ok=True)
    prog = "examples/quickstart.py" if quickstart else "examples/experiment.py"
    command = " ".join(["python", prog] + [shlex.quote(a) for a in argv])
    runs = [stages.Run(t, s) for s in cfg.shares for t in cfg.treatments]
    start = time.perf_counter()
    stages.log(f"megatron-slung {cfg.name}: scale {cfg.scale}, {len(runs)} runs "
               f"({', '.join(cfg.treatments)} at toxic share {', '.join(f'{s:.0%}' for s in cfg.shares)}), "
               f"outputs in {stages.show_path(run_dir)}/")
    timings: dict = {}
    try:
        data = stages.prepare_data(cfg, run_dir, args.input, timings)
        t0 = time.perf_counter()
        rows = stages.run_all(runs, cfg, data, run_dir)
        timings["pretrain + evaluate"] = round(time.perf_counter() - t0, 1)
    except Exception as e:  # a stage failed: say which and where its log is
        stages.log(f"\nerror: {e}")
        stages.log(f"(fix the cause and rerun the same command: finished stages are reused; outputs in {stages.show_path(run_dir)}/)")
        return 1
    title = f"megatron-slung {cfg.name} ({cfg.scale} scale: {cfg.model.num_layers} layers x {cfg.model.hidden_size}, " \
            f"{_tokens(cfg.model.tokens_per_run)} training tokens per run)"
    report = write_report(run_dir, rows, title=title, command=command, config=cfg.to_dict(),
                          data={"tokens": data.tokens, "tagger": data.tagger, "corpus": data.corpus_dir,
                                "safety": data.safety, "refusal_ratio": cfg.data.refusal_ratio},
                          timings=timings, seconds=time.perf_counter() - start)
    stages.log("\n" + report["table"] + "\n")
    stages.log(f"wrote {report['json']}, {report['markdown']}" + (f", {report['png']}" if report["png"] else "")
               + f" in {stages.fmt_seconds(time.perf_counter() - start)}")
    return 0


def _tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
