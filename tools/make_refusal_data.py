#!/usr/bin/env python
"""Build refusal-style training documents (an unsafe request, a refusal and its reason) from risky text.

    # requests from the level-3 spans of tagged documents; template reasons; at most 2000 documents
    python tools/make_refusal_data.py --input tagged.jsonl --output refusals.jsonl --max-documents 2000
    # every record of a prompt file is a request; the reason written by a local generator
    python tools/make_refusal_data.py --input prompts.jsonl --select all --output refusals.jsonl --generator path/to/lm
    # ... and the --data-path blend: 5% of the training tokens from the refusal dataset
    python tools/make_refusal_data.py ... --ratio 0.05 --base-data-path 0.9 clean_text_document 0.1 toxic_text_document \
        --refusal-prefix refusals_text_document --blend-file blend.txt   # then: --data-path $(cat blend.txt)

Output JSONL for tools/preprocess_data.py (text, risk_spans: the request at its level, the rest 1; a
`refusal` field with the provenance). See megatron_slung/safety/refusal.py and docs/safety_data.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_slung.data.corpus import InputError  # noqa: E402
from megatron_slung.safety.generator import ENGINES, GenerationConfig  # noqa: E402
from megatron_slung.safety.refusal import RefusalConfig, blend_weights, make_refusals, parse_blend  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", help="JSONL files or globs: tagged documents or prompts")
    p.add_argument("--output", help="the refusal documents (.jsonl, .gz or .zst)")
    p.add_argument("--select", choices=("risky", "all"), default="risky",
                   help="risky: records with a span at --min-level or above; all: every record (a prompt file)")
    p.add_argument("--request-unit", choices=("span", "document"), default="span",
                   help="the request is the record's risky spans, or its whole text")
    p.add_argument("--min-level", type=int, default=3)
    p.add_argument("--request-level", type=int, default=3, help="risk level of requests from records without spans")
    p.add_argument("--max-request-chars", type=int, default=400)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--template", action="append", default=[], metavar="FILE",
                   help="refusal template with {request} and {reason}/{reason_lower}; repeatable "
                        "(default: megatron_slung/safety/templates/refusal/*.txt)")
    p.add_argument("--reasons", default=None, help="reasons file, one a line, 'LEVEL: reason' for one level")
    p.add_argument("--text-key", default="text")
    p.add_argument("--risk-key", default="risk_spans")
    p.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("generator (optional): the model writes each reason")
    g.add_argument("--generator", default=None, metavar="DIR", help="a local HF causal-LM directory")
    g.add_argument("--engine", choices=ENGINES, default="auto")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--device", default=None)
    g = p.add_argument_group("the blend")
    g.add_argument("--ratio", type=float, default=None, help="share of training tokens from the refusal dataset")
    g.add_argument("--base-data-path", nargs="+", default=None, metavar="W PREFIX",
                   help="the --data-path blend the refusals are mixed into (a prefix, or weight/prefix pairs)")
    g.add_argument("--refusal-prefix", default=None, help="the refusal dataset's prefix (after preprocess_data.py)")
    g.add_argument("--blend-file", default=None, help="write the blended --data-path here (one line)")
    g.add_argument("--summary-json", default=None)
    args = p.parse_args(argv)
    blend = [args.ratio, args.base_data_path, args.refusal_prefix, args.blend_file]
    if any(x is not None for x in blend) and any(x is None for x in blend):
        p.error("the blend needs all of --ratio, --base-data-path, --refusal-prefix and --blend-file")
    if args.input is None and args.blend_file is None:
        p.error("give --input and --output (documents), or the blend flags, or both")
    if (args.input is None) != (args.output is None):
        p.error("--input and --output go together")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        if args.input:
            cfg = RefusalConfig(inputs=args.input, output=args.output, select=args.select,
                                request_unit=args.request_unit, min_level=args.min_level,
                                request_level=args.request_level, text_key=args.text_key, risk_key=args.risk_key,
                                templates=tuple(args.template), reasons=args.reasons,
                                max_request_chars=args.max_request_chars, max_documents=args.max_documents,
                                generator=args.generator, engine=args.engine, seed=args.seed, device=args.device,
                                gen=GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                                     top_p=args.top_p, batch_size=args.batch_size))
            summary = make_refusals(cfg)
            print(f"wrote {summary['documents']:,} refusal documents ({summary['characters']:,} characters; reasons: "
                  f"{summary['generated_reasons']} generated, {summary['template_reasons']} from templates) to {args.output}")
            if args.summary_json:
                with open(args.summary_json, "w", encoding="utf-8") as f:
                    json.dump(summary, f, indent=1)
        if args.blend_file:
            weights = blend_weights(parse_blend(args.base_data_path), args.refusal_prefix, args.ratio)
            tmp = f"{args.blend_file}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(" ".join(weights) + "\n")
            os.replace(tmp, args.blend_file)
            print(f"wrote the blend ({args.ratio:.1%} refusal tokens) to {args.blend_file}: {' '.join(weights)}")
    except (InputError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
