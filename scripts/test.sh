#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh tests/test_loss_policy.py`.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
cd "$SLUNG_ROOT"
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then  # pytest's "no tests collected" is not a failure
    echo "[test] no tests were collected"
    rc=0
fi
exit "$rc"
