#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the built-in default end to end on the CPU.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
cd "$SLUNG_ROOT" || exit 1
set -euo pipefail
python -c "import megatron_slung, megatron_slung._ext as e; print('megatron-slung', megatron_slung.__version__, '| C++ extension:', e.HAVE_C)"
