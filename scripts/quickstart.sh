#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the built-in default end to end on the CPU.
#
# Until the full quickstart lands (pretraining and evaluation), this is the data pipeline on a small
# built-in synthetic sample: generate -> train a tokenizer -> tag risk -> preprocess into Megatron
# datasets with a risk channel. Outputs go to runs/quickstart/ (override with SLUNG_RUN_DIR); steps
# whose outputs exist are reused, so a rerun is quick. Delete the directory to start over.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
cd "$SLUNG_ROOT" || exit 1
set -euo pipefail
python -c "import megatron_slung, megatron_slung._ext as e; print('megatron-slung', megatron_slung.__version__, '| C++ extension:', e.HAVE_C)"

RUN="${SLUNG_RUN_DIR:-runs/quickstart}"
WORKERS="${SLUNG_WORKERS:-2}"
mkdir -p "$RUN"
step() { echo; echo "== $*"; }

step "1/4 sample corpus: $RUN/sample.jsonl"
if [ ! -f "$RUN/sample.jsonl" ]; then
    python -m megatron_slung.data.synthetic --output "$RUN/sample.jsonl" --docs 2000 --word-lists "$RUN/word_lists"
else echo "reusing $RUN/sample.jsonl"; fi

step "2/4 tokenizer: $RUN/tokenizer/spm.model"
if [ ! -f "$RUN/tokenizer/spm.model" ]; then
    python tools/train_tokenizer.py --input "$RUN/sample.jsonl" --output-prefix "$RUN/tokenizer/spm" \
        --vocab-size 4000 --model-type bpe
else echo "reusing $RUN/tokenizer/spm.model"; fi

step "3/4 risk tagging: $RUN/tagged.jsonl"
if [ ! -f "$RUN/tagged.jsonl" ]; then
    python tools/tag_risk.py --input "$RUN/sample.jsonl" --output "$RUN/tagged.jsonl" --unit sentence \
        --tagger lexicon --lexicon "3:$RUN/word_lists/toxic.txt" --lexicon "2:$RUN/word_lists/ambiguous.txt" \
        --tagger pii --pii-names "$RUN/word_lists/names.txt" --workers "$WORKERS"
else echo "reusing $RUN/tagged.jsonl"; fi

step "4/4 preprocessing: $RUN/data/sample_text_document.{bin,idx} + .risk.{bin,idx}"
if [ ! -f "$RUN/data/sample_text_document.idx" ]; then
    python tools/preprocess_data.py --input "$RUN/tagged.jsonl" --output-prefix "$RUN/data/sample" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$RUN/tokenizer/spm.model" \
        --workers "$WORKERS" --append-eod --harm-tag '<|potentially_unsafe|>' --harm-tag-prob 0.05
else echo "reusing $RUN/data/sample_text_document"; fi

step "result"
python - "$RUN" <<'EOF'
import sys
import numpy as np
from megatron_slung.data.indexed_dataset import IndexedDataset
from megatron_slung.data.risk import level_name
from megatron_slung.data.tokenizers import build_tokenizer

run = sys.argv[1]
ds = IndexedDataset(f"{run}/data/sample_text_document")
tok = build_tokenizer("SentencePieceTokenizer", f"{run}/tokenizer/spm.model")
print(ds)
counts = np.bincount(ds.read_risk(0, ds.num_tokens), minlength=256)
print("tokens per risk level:", ", ".join(f"{i} {level_name(i)}: {c}" for i, c in enumerate(counts) if c))
doc = next(d for d in range(ds.num_documents) if (ds.get_risk(d) >= 3).any())
ids, risk = ds.get(doc), ds.get_risk(doc)
first = int(np.argmax(risk >= 3))
lo = max(0, first - 25)
print(f"document {doc}, tokens {lo}..{lo + 50} as piece[level]:")
print(" ".join(f"{tok.id_to_token(t)}[{r}]" for t, r in zip(ids[lo:lo + 50], risk[lo:lo + 50])))
EOF
