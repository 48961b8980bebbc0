#!/usr/bin/env bash
# The next GPU measurements in one device call (at most 600 s), in priority order, each with its own limit:
#   1. the end-to-end harness with the prefix and image caches on (every serve sub-phase, no transformers
#      baseline);
#   2. the same engine with both caches off, on the sub-phases the caches change (unique images, follow-up
#      TTFT, 4 questions per image, a 4-turn conversation);
#   3. benchmarks.ttft_probe (the engine alone: first steps, a follow-up question, large images, chunked
#      prefill), then every other GPU-marked engine test, while time is left.
# Run from the repository root on the GPU machine, with .whl/ carried (bash benchmarks/fetch_wheels.sh and a
# numpy 1.x wheel under .whl/stub/):
#   OUT=/some/dir GLMV_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh
# Results land under $OUT (cache_on/, cache_off/ and ttft/ packed into gpu_session.tar.gz); the multi-GPU
# run needs a machine of its own (benchmarks/multi_gpu.py).
set -u
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
started=$(date +%s)
left() { echo $((${SESSION_S:-575} - ($(date +%s) - started))); }  # SESSION_S: this script's share of the call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
stub=$(find "$PWD/.whl/stub" -name 'numpy-1*.whl' | sort | tail -n 1)
export PYTHONPATH=/tmp/site GLMV_STUB_NUMPY_WHEEL="$stub" PYTHONUNBUFFERED=1

timeout 250 python3 -m benchmarks.gpu_harness --out "$OUT/cache_on" --skip baseline --budget-s 240 \
  --engine-args "--max-batch-size 128" 2>&1 | grep -v '^\[c=\|^\[rate='
pkill -f tritonserver; sleep 3  # a server that did not stop in time must not hold the GPU for the next
timeout 130 python3 -m benchmarks.gpu_harness --out "$OUT/cache_off" --skip baseline,roofline --budget-s 125 \
  --engine-args "--max-batch-size 128 --no-prefix-caching --image-cache-mb 0" \
  --serve-phases c32_1288,followup_1288,reuse_c32_1288,conversation_1288 2>&1 | grep -v '^\[c='
if [ "$(left)" -gt 40 ]; then
  timeout "$(left)" python3 -m benchmarks.ttft_probe --out "$OUT/ttft" 2>&1 | grep -E '^[0-9]|chunked|decode b'
fi
if [ "$(left)" -gt 30 ]; then
  timeout "$(left)" python3 -m pytest -q -m gpu tests/engine >"$OUT/pytest_gpu.txt" 2>&1
  tail -n 3 "$OUT/pytest_gpu.txt"
fi
# One archive of everything written above, beside the short texts.
tar czf "$OUT/gpu_session.tar.gz" -C "$OUT" cache_on cache_off ttft 2>/dev/null
rm -rf "$OUT/cache_on" "$OUT/cache_off" "$OUT/ttft"
