#!/usr/bin/env bash
# Create (or reuse) the virtual environment and build megatron-slung into it.
#
#   source scripts/setup_env.sh          # leaves the venv activated; or: bash scripts/setup_env.sh
#
# - The venv is .venv (override with SLUNG_VENV). When the system Python already has torch (a
#   cluster's CUDA build, say), the venv sees the system's packages, so that torch is used, never replaced.
# - torch is installed only when none is importable, and then as torch==2.13.0 (the CPU build).
# - The project is built with `pip install --no-build-isolation -e .` so the C++ extension is compiled
#   against that torch. A rerun with unchanged sources skips the build.
# - SLUNG_EXTRAS picks the extras to install (default "test,eval,pipeline": the tests cover the evaluation
#   tools and tools/pipeline.py).
# Every step checks its own result (this file is sourced, where `set -e` cannot be relied on).

SLUNG_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SLUNG_VENV="${SLUNG_VENV:-$SLUNG_ROOT/.venv}"
SLUNG_EXTRAS="${SLUNG_EXTRAS:-test,eval,pipeline}"

_slung_pip() { python -m pip install --disable-pip-version-check -q "$@"; }

_slung_setup() {
    local py="${PYTHON:-python3}"
    if [ ! -x "$SLUNG_VENV/bin/python" ]; then
        echo "[setup] creating virtual environment $SLUNG_VENV"
        if "$py" -c "import torch" >/dev/null 2>&1; then
            "$py" -m venv --system-site-packages "$SLUNG_VENV" || return 1
        else
            "$py" -m venv "$SLUNG_VENV" || return 1
        fi
    fi
    # shellcheck disable=SC1091
    source "$SLUNG_VENV/bin/activate" || return 1

    if python -c "import torch" >/dev/null 2>&1; then
        echo "[setup] using installed torch $(python -c 'import torch; print(torch.__version__)')"
    else
        echo "[setup] installing torch==2.13.0"
        _slung_pip torch==2.13.0 || return 1
    fi

    # Rebuild only when the build inputs, the extras or torch changed.
    local stamp="$SLUNG_VENV/.slung-build-stamp" digest
    digest="$( (cd "$SLUNG_ROOT" && cat setup.py pyproject.toml csrc/*; echo "$SLUNG_EXTRAS";
                python -c 'import torch; print(torch.__version__)') 2>/dev/null | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && python -c "import torch, megatron_slung._C" >/dev/null 2>&1; then
        echo "[setup] megatron-slung is built and up to date"
        return 0
    fi
    echo "[setup] building megatron-slung and its C++ extension (a few minutes the first time)"
    _slung_pip --upgrade "pip>=23.1" || return 1
    _slung_pip setuptools wheel ninja pybind11 numpy || return 1
    (cd "$SLUNG_ROOT" && _slung_pip --no-build-isolation -e ".[$SLUNG_EXTRAS]") || return 1
    python -c "import torch, megatron_slung._C" || { echo "[setup] the extension did not import" >&2; return 1; }
    echo "$digest" > "$stamp"
}

if ! _slung_setup; then
    echo "[setup] FAILED: see the messages above" >&2
    return 1 2>/dev/null || exit 1
fi
