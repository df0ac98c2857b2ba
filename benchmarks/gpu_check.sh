#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent GPU machine (16 CPUs, one H100/H200, a python3
# with torch, transformers, safetensors, numba, pytest and hypothesis, and no network):
#   1. the CUDA tests (the `gpu` marker; skipped on machines without CUDA),
#   2. the GPU speed benchmark, benchmarks/speed/gpu.py (CPU and CUDA rows, mergekit --cuda if its
#      wheels were carried in .whl/: `make gpu-wheels` here first).
# Logs and results go to $OUT (the device tool's folder; ./gpu-results elsewhere). Run from the
# repository root:  bash benchmarks/gpu_check.sh  (about 4 minutes on an H100: 1 for the tests).
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MERGEKIT=()
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" && MERGEKIT=(--mergekit-python "$PY")
fi
{ nvidia-smi; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'; } \
    > "$OUT/machine.txt" 2>&1
status=0
"$PY" -m pytest -q -p no:cacheprovider -m gpu -o addopts="" --timeout 600 \
    tests/test_gpu.py tests/test_gpu_svd.py tests/test_cli_mergekit_family.py tests/test_adapt.py \
    2>&1 | tee "$OUT/gpu_tests.log" || status=1
"$PY" benchmarks/speed/gpu.py --results "$OUT" "${MERGEKIT[@]}" "$@" 2>&1 | tee "$OUT/gpu_bench.log" || status=1
exit $status
