#!/usr/bin/env bash
# Command 1: install everything, build an engine (tiny random model on CPU unless told otherwise) and serve it:
# Triton on :8000 (HTTP) / :8001 (gRPC) / :8002 (metrics), the OpenAI-compatible gateway and web page on :8080.
#   GLMV_PRESET=tiny|small      which random model to build (default tiny)
#   GLMV_CHECKPOINT=DIR         serve a real GLM-4.xV checkpoint instead
#   GLMV_DEVICE=cpu|cuda        where the engine runs (default: cuda if available, else cpu)
#   GLMV_WORKDIR=DIR            where the engine and model repository go (default runs/serve)
#   GLMV_HTTP_PORT / GLMV_GRPC_PORT / GLMV_METRICS_PORT / GLMV_GATEWAY_PORT   (8000 / 8001 / 8002 / 8080)
#   GLMV_SERVE_ARGS             more glmv-serve flags (e.g. "--cpu-dma-latency-us 0", as root)
# Extra arguments go to glmv-build (e.g. --max-seq-len 4096). Ctrl-C or SIGTERM stops both servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${GLMV_VENV:-.venv}
WORK=${GLMV_WORKDIR:-runs/serve}
HTTP=${GLMV_HTTP_PORT:-8000} GRPC=${GLMV_GRPC_PORT:-8001} METRICS=${GLMV_METRICS_PORT:-8002}
GATEWAY=${GLMV_GATEWAY_PORT:-8080}
DEVICE=${GLMV_DEVICE:-$("$VENV/bin/python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
if [ -n "${GLMV_CHECKPOINT:-}" ]; then src=(--checkpoint "$GLMV_CHECKPOINT"); else src=(--preset "${GLMV_PRESET:-tiny}"); fi
"$VENV/bin/glmv-build" "${src[@]}" --output "$WORK" --device "$DEVICE" "$@"

mkdir -p "$WORK/logs"
# A port already in use is an error here: a server left running there would answer the readiness probe below.
"$VENV/bin/python" -c 'import sys; from build_engine.launcher import check_ports_free as c
try: c(dict(zip(("GLMV_HTTP_PORT", "GLMV_GRPC_PORT", "GLMV_METRICS_PORT", "GLMV_GATEWAY_PORT"), map(int, sys.argv[1:]))))
except RuntimeError as e: sys.exit(f"serve: {e}")' "$HTTP" "$GRPC" "$METRICS" "$GATEWAY"
read -r -a serve_extra <<<"${GLMV_SERVE_ARGS:-}"
"$VENV/bin/glmv-serve" --model-repository "$WORK/model_repository" --http-port "$HTTP" --grpc-port "$GRPC" \
  --metrics-port "$METRICS" --log-file "$WORK/logs/triton.log" "${serve_extra[@]}" &
triton_pid=$!
stop() { kill -TERM "${gateway_pid:-}" "$triton_pid" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM
until curl -sf "localhost:$HTTP/v2/health/ready" >/dev/null; do
  kill -0 "$triton_pid" 2>/dev/null || { echo "serve: Triton did not start; see $WORK/logs/triton.log" >&2; exit 1; }
  sleep 1
done
"$VENV/bin/python" -m gateway --triton-url "localhost:$GRPC" --port "$GATEWAY" &
gateway_pid=$!
echo "serve: web page and OpenAI API at http://localhost:$GATEWAY  (Triton http :$HTTP grpc :$GRPC metrics :$METRICS)"
wait -n "$triton_pid" "$gateway_pid"
