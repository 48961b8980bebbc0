#!/usr/bin/env bash
# The next GPU measurements, as device calls of at most 600 s each (PART=1, 2, 3, 4, 6, 7, 8, 9), each step with
# its own limit, in priority order:
#   PART=1  the end-to-end harness (every serve sub-phase, the structured-output ones included; no
#           transformers baseline), then every GPU-marked engine test, then benchmarks.ttft_probe while
#           time is left;
#   PART=2  benchmarks.soak on the full-size shape (mixed load, cancellations and bad input through the
#           gateway and Triton; RSS over time), then OLD_TREE (a snapshot of another commit, if given) and
#           this tree on the same few sub-phases, then OLD_TREE's context-graph GPU test;
#   PART=3  the harness with the prefix and image caches off on the sub-phases the caches change;
#   PART=6  benchmarks.guided_probe, then VARIANTS ("name:glmv-build flags[:harness flags]") on the guided and plain 32-stream
#           runs through Triton, then the caches off (as PART=3);
#   PART=7  the harness as in PART=1, then benchmarks.guided_probe;
#   PART=8  the GPU tests, then benchmarks.ttft_probe;
#   PART=9  benchmarks.step_probe (STEP_VARIANTS), benchmarks.guided_probe, benchmarks.ttft_probe;
#   PART=10 for when device calls are scarce, the most in one: the harness (HARNESS_BUDGET s, every sub-phase),
#           the GPU tests of GPU_TESTS, benchmarks.step_probe (STEP_VARIANTS), then benchmarks.ttft_probe,
#           each while time is left;
#   PART=4  (two GPUs) benchmarks.multi_gpu: Triton's spread over one llm per GPU, then one server per GPU
#           behind the gateway's image affinity.
# Run from the repository root on the GPU machine, with .whl/ carried (bash benchmarks/fetch_wheels.sh):
#   OUT=/some/dir GLMV_COMMIT=$(git rev-parse --short HEAD) PART=1 bash benchmarks/gpu_session.sh
# Results land under $OUT (packed into gpu_session.tar.gz beside the short texts); the multi-GPU run needs a
# machine of its own (benchmarks/multi_gpu.py).
set -u
OUT=${OUT:-gpu_session_out}
PART=${PART:-1}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: some steps run from another tree
started=$(date +%s)
left() { echo $((${SESSION_S:-575} - ($(date +%s) - started))); }  # SESSION_S: this script's share of the call
# a harness run spends ~30 s on its environment and engine build, and skips serving with less than 90 s
# left: a budget below 150 s measures nothing through Triton (checked before any device time goes)
for budget_var in VARIANT_BUDGET AB_BUDGET HARNESS_BUDGET; do
  if [ -n "${!budget_var:-}" ] && [ "${!budget_var}" -lt 150 ]; then
    echo "$budget_var=${!budget_var}: a harness run needs at least 150 s to reach Triton" >&2
    exit 2
  fi
done
# a variant that keeps transformers' baseline has its ~150 s reserved out of the serve phase as well: under
# ~400 s the serve phase is skipped and the run measures only the baseline
case ",${VARIANT_SKIP:-baseline,roofline}," in
  *,baseline,*) ;;
  *)
    if [ "$PART" = 6 ] && [ "${VARIANTS:-}" != none ] && [ "${VARIANT_BUDGET:-200}" -lt 400 ]; then
      echo "VARIANT_BUDGET=${VARIANT_BUDGET:-200} with the baseline (VARIANT_SKIP=${VARIANT_SKIP:-}): needs at least 400 s," \
        "or skip the baseline" >&2
      exit 2
    fi
    ;;
esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
stub=$(find "$PWD/.whl/stub" -name 'numpy-1*.whl' | sort | tail -n 1)
export PYTHONPATH=/tmp/site:$PWD/client GLMV_STUB_NUMPY_WHEEL="$stub" PYTHONUNBUFFERED=1
# guided decoding inside the llm and libspng's PNG decoder for preprocessing (Triton's Python stubs ignore
# PYTHONPATH), pydantic for the gateway (the pinned version even where another is installed: a no-op where it
# is already there)
python3 -m pip install -q --no-index --find-links .whl/llm --no-compile --no-cache-dir xgrammar==0.2.9 pyspng==0.1.4
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

# in a snapshot tree (benchmarks/snapshot_tree.sh), its own commit is the one its results record
tree_commit() {
  if [ -f SNAPSHOT_COMMIT ]; then
    GLMV_COMMIT=$(cat SNAPSHOT_COMMIT)
    export GLMV_COMMIT
  fi
}

step_probes() {  # benchmarks.step_probe once per STEP_VARIANTS entry ("name[@tree]:EngineConfig fields[:flags]";
  # tree: a snapshot of another commit to run it from; names unique, so A B A B orders show host drift;
  # flags: more step_probe flags of this variant, comma-separated, e.g. --size=448x448)
  local step_args
  for variant in ${STEP_VARIANTS:-}; do
    head=${variant%%:*}; extra=${variant#*:}; name=${head%%@*}; tree=.
    [ "$head" = "$name" ] || tree=${head#*@}
    flags=""
    case $extra in *:*) flags=${extra#*:}; extra=${extra%%:*} ;; esac
    # more step_probe flags for every variant (STEP_ARGS: --host-ops ...), then this one's
    read -ra step_args <<<"${STEP_ARGS:-} ${flags//,/ }"
    [ "$(left)" -gt 100 ] || break
    mkdir -p "$OUT/step/$name"
    (cd "$tree" && tree_commit && timeout "${STEP_TIMEOUT:-120}" python3 -m benchmarks.step_probe --out "$OUT/step/$name" \
      --engine-args "$extra" --watchdog-s 90 "${step_args[@]}" >"$OUT/step/$name/log.txt" 2>&1)
    grep -E '^[0-9]|^  ' "$OUT/step/$name/log.txt" | sed "s/^/$name: /"
    grep -B2 -A30 -m1 'Thread 0x\|Traceback' "$OUT/step/$name/log.txt" | head -n 60 | sed "s/^/$name! /"
  done
}

if [ "$PART" = 1 ]; then
  timeout 330 python3 -m benchmarks.gpu_harness --out "$OUT/cache_on" --skip baseline --budget-s 320 \
    --engine-args "--max-batch-size 128" 2>&1 | grep -v '^\[c=\|^\[rate='
  pkill -f tritonserver; sleep 3  # a server that did not stop in time must not hold the GPU for the next
  if [ "$(left)" -gt 60 ]; then
    timeout $(($(left) - 30)) python3 -m pytest -q -m gpu tests/engine >"$OUT/pytest_gpu.txt" 2>&1
    tail -n 3 "$OUT/pytest_gpu.txt"
  fi
  if [ "$(left)" -gt 40 ]; then
    timeout "$(left)" python3 -m benchmarks.ttft_probe --out "$OUT/ttft" --harness-json "$OUT/cache_on/harness.json" 2>&1 |
      grep -E '^[0-9]|chunked|decode b|small copies|^large'
  fi
elif [ "$PART" = 2 ]; then
  if [ "${SOAK_MIN:-4}" != 0 ]; then
    timeout 330 python3 -m benchmarks.soak --minutes "${SOAK_MIN:-4}" --preset dummy-full --device cuda \
      --concurrency 32 --max-tokens 64 --engine-args "--max-batch-size 128" --out "$OUT/soak" 2>&1 | tail -n 40
    pkill -f tritonserver; pkill -f "m gateway"; sleep 3
  fi
  # Same machine, same call: the trees of TREES (snapshots of other commits; default OLD_TREE, then this
  # one) on the sub-phases that show the engine and the Triton path (AB_PHASES, AB_BUDGET s each; none:
  # no harness; AB_ENGINE_ARGS: the engine's glmv-build flags; WARMUP_S: seconds of 32-stream load before each
  # tree's first sub-phase), then with AB_TTFT_ARGS set
  # benchmarks.ttft_probe with those flags in each tree (into ab/<tree>/ttft), then TEST_K's GPU tests in
  # each of TEST_TREES.
  for tree in ${TREES:-${OLD_TREE:-} .}; do
    name=$(cd "$tree" && basename "$PWD")
    [ "${AB_PHASES:-}" != none ] || continue
    [ "$(left)" -gt $((${AB_BUDGET:-150} - 15)) ] || break
    (cd "$tree" && tree_commit && timeout $((${AB_BUDGET:-150} + 10)) python3 -m benchmarks.gpu_harness --out "$OUT/ab/$name" --skip baseline,roofline \
      --budget-s "${AB_BUDGET:-150}" --warmup-s "${WARMUP_S:-0}" --engine-args "${AB_ENGINE_ARGS:---max-batch-size 128}" --serve-phases "${AB_PHASES:-ttft_448,ttft_1288,decode_b1,c32_448,followup_1288}" \
      2>&1 | grep -E '^(TTFT|decode|tok/s|c32|follow)' | sed "s/^/$name: /")
    pkill -f tritonserver; sleep 2
  done
  if [ -n "${AB_TTFT_ARGS:-}" ]; then
    read -ra ab_ttft_args <<<"$AB_TTFT_ARGS"
    for tree in ${TREES:-${OLD_TREE:-} .}; do
      name=$(cd "$tree" && basename "$PWD")
      [ "$(left)" -ge 60 ] || break
      (cd "$tree" && tree_commit && timeout $(($(left) - 10)) python3 -m benchmarks.ttft_probe --out "$OUT/ab/$name/ttft" "${ab_ttft_args[@]}" 2>&1 \
        | grep -E '^[0-9]|chunked|decode b|small copies' | sed "s/^/$name: /")
    done
  fi
  for tree in ${TEST_TREES:-${OLD_TREE:-}}; do
    name=$(cd "$tree" && basename "$PWD")
    [ "$(left)" -gt 40 ] || break
    (cd "$tree" && tree_commit && timeout 90 python3 -m pytest -q -m gpu tests/engine -k "${TEST_K:-context_graphs_match_eager}" \
      >"$OUT/pytest_gpu_$name.txt" 2>&1; echo "$name: $(tail -n 1 "$OUT/pytest_gpu_$name.txt")")
  done
elif [ "$PART" = 6 ]; then
  # guided decoding inside the engine, then through Triton with VARIANTS ("name:extra glmv-build flags"
  # ...) on structured_c32 and c32_448, then the caches off on the sub-phases they change
  # (PROBE=0 skips the probe; VARIANT_PHASES, VARIANT_BUDGET (s per variant, 200; the server gets what
  # is left of it past 120 s to start, at least 90), CACHE_OFF=0 as named (CACHE_OFF_PHASES: its
  # sub-phases); GPU_TESTS=<pytest path> runs those GPU tests first; VIT_BENCH=1 runs
  # benchmarks.vit_attention_bench and STEP_VARIANTS benchmarks.step_probe before them; TTFT_PROBE=1
  # runs benchmarks.ttft_probe after everything; QUICK_TTFT=1 its large images alone first, ~1 min;
  # GEMV_BENCH=1 benchmarks.gemv_bench after the GPU tests (~4 min);
  # CACHE_OFF_ARGS: more glmv-build flags for the caches-off run, comma-separated, e.g. --dtype,fp8;
  # WARMUP_S: seconds of 32-stream load after each variant's warm-up, before its first sub-phase;
  # VARIANTS=none runs no harness; VARIANT_SKIP: the harness phases the variants skip, baseline,roofline by
  # default: "baseline" adds the roofline's ~30 s and the ours ÷ floor column, the fp8 floor for a
  # --dtype,fp8 variant)
  [ "${QUICK_TTFT:-0}" = 0 ] || timeout 150 python3 -m benchmarks.ttft_probe --out "$OUT/ttft_quick" --quick-only 2>&1 |
    grep -E '^[0-9]'
  # VIT_DTYPES="bf16 fp8": the bench once per dtype of the tower's linears (vit/<dtype>/)
  if [ "${VIT_BENCH:-0}" != 0 ]; then
    for vit_dtype in ${VIT_DTYPES:-bf16}; do
      timeout 150 python3 -m benchmarks.vit_attention_bench --vision-dtype "$vit_dtype" --out "$OUT/vit/$vit_dtype" 2>&1 |
        tail -n 9 | sed "s/^/vit $vit_dtype: /"
    done
  fi
  step_probes
  if [ -n "${GPU_TESTS:-}" ]; then
    read -ra gpu_tests <<<"$GPU_TESTS"  # one or more pytest paths
    timeout 150 python3 -m pytest -q -m gpu "${gpu_tests[@]}" >"$OUT/pytest_gpu.txt" 2>&1
    tail -n 4 "$OUT/pytest_gpu.txt"
  fi
  # GEMV_BENCH=1: decode-shaped matmuls, the skinny kernel against cuBLAS and FP8, then batch-1 decode of
  # the engine with --decode-gemv off and on (bf16 and FP8: GEMV_ARGS), then its block-size sweep (GEMV_SWEEP_S;
  # GEMV_SWEEP_FP8_S: then the same on FP8 weights)
  read -ra gemv_args <<<"${GEMV_ARGS:---engine --fp8}"
  [ "${GEMV_BENCH:-0}" = 0 ] || timeout "${GEMV_TIMEOUT:-260}" python3 -m benchmarks.gemv_bench --out "$OUT/gemv" \
    "${gemv_args[@]}" --sweep-s "${GEMV_SWEEP_S:-40}" --sweep-fp8-s "${GEMV_SWEEP_FP8_S:-0}" 2>&1 |
    grep -E 'M=|copy|engine|matmuls|Error|error'
  [ "${PROBE:-1}" = 0 ] || timeout 150 python3 -m benchmarks.guided_probe --out "$OUT/guided" --duration 10 2>&1 | tail -n 3
  phases=${VARIANT_PHASES:-structured_c32,c32_448}
  variants=${VARIANTS:-default:}
  [ "$variants" != none ] || variants=""  # VARIANTS=none: no harness run
  for variant in $variants; do
    # "name:glmv-build flags[:gpu_harness flags]", commas for spaces (e.g. "qos::--cpu-dma-latency-us,0")
    name=${variant%%:*}; extra=${variant#*:}; harness_flags=""
    if [[ $extra == *:* ]]; then harness_flags=${extra#*:}; extra=${extra%%:*}; fi
    read -ra harness_args <<<"${harness_flags//,/ }"
    [ "$(left)" -gt $((${VARIANT_BUDGET:-200} + 20)) ] || break
    timeout $((${VARIANT_BUDGET:-200} + 10)) python3 -m benchmarks.gpu_harness --out "$OUT/ab/$name" \
      --skip "${VARIANT_SKIP:-baseline,roofline}" --budget-s "${VARIANT_BUDGET:-200}" --warmup-s "${WARMUP_S:-0}" \
      --engine-args "--max-batch-size 128 ${extra//,/ }" --serve-phases "$phases" "${harness_args[@]}" 2>&1 \
      | grep -E "^(${phases//,/|})" | sed "s/^/$name: /"
    grep -h "captured .* CUDA graphs in\|decode_pdl auto" "$OUT/ab/$name/triton.log" 2>/dev/null | sed "s/^/$name: /"
    grep -h "ViT attention for" "$OUT/ab/$name/triton.log" 2>/dev/null | head -n 6 | sed "s/^/$name: /"
    pkill -f tritonserver; sleep 2
  done
  off_args=${CACHE_OFF_ARGS:-}
  [ "${CACHE_OFF:-1}" = 0 ] || timeout $(($(left) - 10)) python3 -m benchmarks.gpu_harness --out "$OUT/cache_off" --skip baseline,roofline \
    --budget-s $(($(left) - 20)) --engine-args "--max-batch-size 128 --no-prefix-caching --image-cache-mb 0 ${off_args//,/ }" \
    --serve-phases "${CACHE_OFF_PHASES:-c32_1288,followup_1288,reuse_c32_1288,conversation_1288}" 2>&1 | grep -v '^\[c='
  # TTFT_PROBE=1: benchmarks.ttft_probe last, with what is left (TTFT_ARGS: its flags, e.g.
  # "--follow-up-only --sizes 1288x728", ~1.5 min; runs separated by ";" go one after the other into
  # $OUT/ttft, $OUT/ttft_2, ..., e.g. "--sizes 1288x728 --quick-sizes= ; --sizes 1288x728 --quick-sizes= --dtype fp8")
  if [ "${TTFT_PROBE:-0}" != 0 ]; then
    IFS=';' read -ra ttft_runs <<<"${TTFT_ARGS:-}"
    [ "${#ttft_runs[@]}" -gt 0 ] || ttft_runs=("")
    for i in "${!ttft_runs[@]}"; do
      read -ra ttft_args <<<"${ttft_runs[$i]}"
      dir="$OUT/ttft" && [ "$i" = 0 ] || dir="$OUT/ttft_$((i + 1))"
      [ "$(left)" -ge 60 ] || break
      timeout $(($(left) - 10)) python3 -m benchmarks.ttft_probe --out "$dir" "${ttft_args[@]}" 2>&1 \
        | grep -E '^[0-9]|chunked|decode b|small copies' | sed "s/^/ttft_$((i + 1)): /"
    done
  fi
elif [ "$PART" = 7 ]; then
  # the end-to-end harness (as PART=1), then guided decoding inside the engine
  timeout 330 python3 -m benchmarks.gpu_harness --out "$OUT/cache_on" --skip baseline --budget-s 320 \
    --engine-args "--max-batch-size 128" 2>&1 | grep -v '^\[c=\|^\[rate='
  pkill -f tritonserver; sleep 3
  echo "decode launches that failed (ran synchronously): $(grep -c 'decode launch failed' "$OUT/cache_on/triton.log")"
  [ "$(left)" -gt 90 ] && timeout $(($(left) - 5)) python3 -m benchmarks.guided_probe --out "$OUT/guided" \
    --duration 10 --grammar-threads 4 2>&1 | tail -n 4
elif [ "$PART" = 8 ]; then
  # the GPU tests, then one request's first token and decode inside the engine
  timeout 240 python3 -m pytest -q -m gpu tests/engine >"$OUT/pytest_gpu.txt" 2>&1
  tail -n 5 "$OUT/pytest_gpu.txt"
  [ "$(left)" -gt 60 ] && timeout $(($(left) - 10)) python3 -m benchmarks.ttft_probe --out "$OUT/ttft" 2>&1 |
    grep -E '^[0-9]|chunked|decode b|small copies'
elif [ "$PART" = 9 ]; then
  # inside the engine: a step's time under 32 x 1288x728 (STEP_VARIANTS: "name:EngineConfig fields" ...),
  # guided decoding's cost, then one request's first token and decode
  STEP_VARIANTS=${STEP_VARIANTS:-default:} step_probes
  [ "${PROBE:-1}" = 0 ] || [ "$(left)" -lt 120 ] || timeout 110 python3 -m benchmarks.guided_probe \
    --out "$OUT/guided" --duration 10 2>&1 | tail -n 3
  [ "$(left)" -gt 60 ] && timeout $(($(left) - 10)) python3 -m benchmarks.ttft_probe --out "$OUT/ttft" 2>&1 |
    grep -E '^[0-9]|chunked|decode b|small copies'
elif [ "$PART" = 10 ]; then
  budget=${HARNESS_BUDGET:-240}
  timeout $((budget + 10)) python3 -m benchmarks.gpu_harness --out "$OUT/cache_on" --skip baseline \
    --budget-s "$budget" --engine-args "--max-batch-size 128" 2>&1 | grep -v '^\[c=\|^\[rate='
  pkill -f tritonserver; sleep 3
  if [ "$(left)" -gt 60 ]; then
    read -ra gpu_tests <<<"${GPU_TESTS:-tests/engine/kernels/test_fused.py tests/engine/model/test_vision_graphs.py}"
    timeout 120 python3 -m pytest -q -m gpu "${gpu_tests[@]}" >"$OUT/pytest_gpu.txt" 2>&1
    tail -n 4 "$OUT/pytest_gpu.txt"
  fi
  step_probes
  [ "$(left)" -gt 60 ] && timeout $(($(left) - 10)) python3 -m benchmarks.ttft_probe --out "$OUT/ttft" \
    --harness-json "$OUT/cache_on/harness.json" 2>&1 | grep -E '^[0-9]|chunked|decode b|small copies|^large'
elif [ "$PART" = 4 ]; then
  # two GPUs (nvidia-h200-x2): 1 -> 2 GPUs with Triton spreading the requests over one llm per GPU (unique
  # 1288x728 images, then 4 questions per image), then one server per GPU behind the gateway (4 questions
  # per image: the prefix-cache hit rate with image affinity)
  timeout 280 python3 -m benchmarks.multi_gpu --out "$OUT/multi_gpu/triton" --placement triton \
    --workload unique,reuse --client-processes 2 2>&1 | grep -v '^\[c='
  pkill -f tritonserver; sleep 3
  timeout $(($(left) - 10)) python3 -m benchmarks.multi_gpu --out "$OUT/multi_gpu/gateway" --placement gateway \
    --workload reuse --client-processes 2 2>&1 | grep -v '^\[c='
  pkill -f tritonserver; pkill -f "m gateway"
else
  timeout $(($(left) - 10)) python3 -m benchmarks.gpu_harness --out "$OUT/cache_off" --skip baseline,roofline \
    --budget-s $(($(left) - 20)) --engine-args "--max-batch-size 128 --no-prefix-caching --image-cache-mb 0" \
    --serve-phases "${CACHE_OFF_PHASES:-c32_1288,followup_1288,reuse_c32_1288,conversation_1288}" 2>&1 | grep -v '^\[c='
fi
# One archive of everything written above, beside the short texts.
parts=()
for d in cache_on cache_off ttft soak ab multi_gpu guided vit step gemv; do [ -d "$OUT/$d" ] && parts+=("$d"); done
if [ "${#parts[@]}" -gt 0 ]; then
  tar czf "$OUT/gpu_session.tar.gz" -C "$OUT" "${parts[@]}"
  for d in "${parts[@]}"; do rm -rf "${OUT:?}/$d"; done
fi
