#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the experiment: toxic share {0,5,10,25}% x treatment
# {ce, filtered, masked, unlikelihood, tags, rephrased, refusal} at one scale. Arguments go to examples/experiment.py:
#
#   bash examples/experiment.sh --scale tiny          # CPU: 28 small GPTs, about 75 minutes on 2 cores (estimated)
#   bash examples/experiment.sh --scale gpu-hours     # one GPU, hours (bring more text with --input)
#
# Output in runs/experiment-SCALE/ (results.md, results.json, results.png); a rerun reuses finished runs.
SECONDS=0
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/setup_env.sh" || exit 1
cd "$SLUNG_ROOT" || exit 1
set -euo pipefail
python examples/experiment.py "$@"
echo "[experiment] total wall time $((SECONDS / 60)) min $((SECONDS % 60)) s"
