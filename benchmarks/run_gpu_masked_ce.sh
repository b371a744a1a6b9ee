#!/usr/bin/env bash
# Build, test and benchmark the CUDA masked cross-entropy on a GPU machine, in one go.
#   bash benchmarks/run_gpu_masked_ce.sh            # results under $OUT (default ./gpu_out)
# Liger-Kernel wheels in $SLUNG_WHEELS (default ../../.whl) are installed to /tmp/site when present.
# A prebuilt megatron_slung/_C*.so is reused unless SLUNG_REBUILD=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
WHEELS="${SLUNG_WHEELS:-../../.whl}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
# reuse a prebuilt extension when it imports with CUDA kernels (it must match this python and torch)
prebuilt_ok() { python3 -c "import torch, megatron_slung._C as C; assert C.with_cuda" >/dev/null 2>&1; }
if [ "${SLUNG_REBUILD:-0}" = 1 ] || ! prebuilt_ok; then
    rm -f megatron_slung/_C*.so
    t0=$(date +%s)
    TORCH_CUDA_ARCH_LIST=9.0 NVCC_APPEND_FLAGS="-Xptxas -v" MAX_JOBS=16 python3 setup.py build_ext --inplace \
        > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    echo "[gpu] built in $(( $(date +%s) - t0 )) s"
fi
python3 -c "import torch, megatron_slung._C as C; assert C.with_cuda, 'extension built without CUDA'"
timeout "${SLUNG_TEST_TIMEOUT:-150}" python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_masked_ce_cuda.py \
    -m cuda 2>&1 | tee "$OUT/tests.log" | tail -25
python3 tools/bench_masked_ce.py --device cuda --tokens 16384 --vocab 128256 --dtype bf16 --policy masked \
    --repeats "${SLUNG_REPEATS:-10}" --variants "${SLUNG_VARIANTS:-}" --impls "${SLUNG_IMPLS:-torch_eager,torch_compile,liger,fused,fused_inplace,torch_eager_linear,fused_linear,liger_fused_linear}" \
    --json "$OUT/masked_ce_gpu.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^\[bench\]'
