#!/usr/bin/env bash
# The next GPU measurements in one device call (at most 600 s), in priority order, each with its own limit:
#   1. every GPU-marked engine test (kernels, paged decode, ViT graphs, FP8, decode graphs);
#   2. benchmarks.ttft_probe: a request's first step, the ViT eager and from a CUDA graph;
#   3. the end-to-end harness (no transformers baseline).
# Run from the repository root on the GPU machine, with .whl/ carried (bash benchmarks/fetch_wheels.sh):
#   OUT=/some/dir GLMV_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh
# Results land under $OUT (ttft/ and harness/ packed into gpu_session.tar.gz); the multi-GPU run needs a machine of its own (benchmarks/multi_gpu.py).
set -u
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
stub=$(find "$PWD/.whl/stub" -name 'numpy-1*.whl' | sort | tail -n 1)
export PYTHONPATH=/tmp/site GLMV_STUB_NUMPY_WHEEL="$stub" PYTHONUNBUFFERED=1

timeout 150 python3 -m pytest -q -m gpu tests/engine >"$OUT/pytest_gpu.txt" 2>&1
tail -n 3 "$OUT/pytest_gpu.txt"
timeout 150 python3 -m benchmarks.ttft_probe --out "$OUT/ttft" 2>&1 | grep -E '^(448|1288)|decode b'
timeout 300 python3 -m benchmarks.gpu_harness --out "$OUT/harness" --skip baseline --budget-s 290 \
  --engine-args "--max-batch-size 128" 2>&1 | grep -v '^\[c='
# One archive of everything written above, beside the short texts.
tar czf "$OUT/gpu_session.tar.gz" -C "$OUT" ttft harness 2>/dev/null && rm -rf "$OUT/ttft" "$OUT/harness"
