#!/usr/bin/env python
"""Throughput of the classifier tagger (``--tagger classifier --scorer hf``) by batch size and device.

    python tools/bench_classifier_tagger.py --size-mb 2 --batch-sizes 1 8 32 128 --devices cpu [cuda]

Builds a small randomly initialised BERT sequence classifier (``--hidden``, ``--layers``; WordPiece
vocabulary trained on the corpus) in ``--work-dir``, generates a seeded synthetic corpus, and times the
step tools/tag_risk.py and tools/pipeline.py both run per chunk (``ChunkTagger.tag_records``, sentence
units) over the whole corpus: documents/s, sentences/s and MB/s. One torch thread on the CPU, as each
tagging worker / pipeline task uses. The levels are checked to be the same at every batch size and device
(scores may differ in the last bits across devices; a level flip at a threshold is reported).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir))
sys.path.insert(0, ROOT)

from megatron_slung.data.corpus import iter_records, read_chunks  # noqa: E402
from megatron_slung.data.engine import load_tool  # noqa: E402
from megatron_slung.experiment.synthetic import write_jsonl  # noqa: E402


def build_classifier(path: str, corpus: str, hidden: int, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for _, line in zip(range(2000), open(corpus, encoding="utf-8"))]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=4000, show_progress=False,
                                                             special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", model_max_length=128)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(hf_tok), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
                        max_position_embeddings=128, num_labels=2, id2label={0: "non-toxic", 1: "toxic"},
                        label2id={"non-toxic": 0, "toxic": 1})
    BertForSequenceClassification(config).eval().save_pretrained(path)
    hf_tok.save_pretrained(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--devices", nargs="+", default=["cpu"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/bench_classifier")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    os.makedirs(args.work_dir, exist_ok=True)
    corpus = os.path.join(args.work_dir, f"corpus_{args.size_mb}mb.jsonl")
    if not os.path.exists(corpus):
        write_jsonl(corpus, target_bytes=int(args.size_mb * 1e6), seed=1234)
    model = os.path.join(args.work_dir, f"bert_h{args.hidden}_l{args.layers}")
    if not os.path.exists(os.path.join(model, "config.json")):
        build_classifier(model, corpus, args.hidden, args.layers)
    chunks = list(read_chunks(corpus, 0, 1 << 20))
    size = os.path.getsize(corpus)
    tag_risk = load_tool("tag_risk")
    import torch

    torch.set_num_threads(1)
    rows, reference = [], None
    for device in args.devices:
        for bs in args.batch_sizes:
            config = tag_risk.TagConfig(unit="sentence", taggers=("classifier",), scorer="hf", scorer_path=model,
                                        scorer_batch_size=bs, scorer_device=device, toxic_threshold=0.5,
                                        ambiguous_threshold=0.45)
            tagger = tag_risk.ChunkTagger(config)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            cpu0 = time.process_time()
            docs = units = 0
            spans = []
            for chunk in chunks:
                pairs, _ = tagger.tag_records(chunk.path, iter_records(chunk))
                docs += len(pairs)
                units += sum(len(tagger.tagger.units(r["text"])) for _, r in pairs)
                spans += [r["risk_spans"] for _, r in pairs]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            sec, cpu = time.perf_counter() - start, time.process_time() - cpu0
            same = None if reference is None else spans == reference
            reference = reference if reference is not None else spans
            rows.append({"device": device, "batch_size": bs, "seconds": round(sec, 2), "cpu_s": round(cpu, 2),
                         "docs_per_s": round(docs / sec, 1), "sentences_per_s": round(units / sec),
                         "mb_per_s": round(size / sec / 1e6, 3), "sentences_per_cpu_s": round(units / cpu),
                         "levels_same_as_first": same, "load": round(load, 1)})
            print(f"[bench] {device} batch {bs}: {sec:.1f}s, {units / sec:.0f} sentences/s "
                  f"({units / cpu:.0f} per CPU s), load {load:.1f}", file=sys.stderr, flush=True)
    print(f"\ncorpus {size / 1e6:.1f} MB ({docs} documents, {units} sentences); classifier BERT hidden {args.hidden}, "
          f"{args.layers} layers, max 128 tokens; torch threads 1")
    print("| device | batch size | seconds | documents/s | sentences/s | MB/s | sentences per CPU s | levels as first row | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['batch_size']} | {r['seconds']} | {r['docs_per_s']} | {r['sentences_per_s']} | "
              f"{r['mb_per_s']} | {r['sentences_per_cpu_s']} | {r['levels_same_as_first']} | {r['load']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "corpus_bytes": size, "hidden": args.hidden, "layers": args.layers}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
