#!/usr/bin/env bash
# Command 1: install everything, build an engine (tiny random model on CPU unless told otherwise) and serve it:
# Triton on :8000 (HTTP) / :8001 (gRPC) / :8002 (metrics), the OpenAI-compatible gateway and web page on :8080.
#   GLMV_PRESET=tiny|small      which random model to build (default tiny)
#   GLMV_CHECKPOINT=DIR         serve a real GLM-4.xV checkpoint instead
#   GLMV_DEVICE=cpu|cuda        where the engine runs (default: cuda if available, else cpu)
#   GLMV_WORKDIR=DIR            where the engine and model repository go (default runs/serve)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${GLMV_VENV:-.venv}
WORK=${GLMV_WORKDIR:-runs/serve}
DEVICE=${GLMV_DEVICE:-$("$VENV/bin/python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
if [ -n "${GLMV_CHECKPOINT:-}" ]; then src=(--checkpoint "$GLMV_CHECKPOINT"); else src=(--preset "${GLMV_PRESET:-tiny}"); fi
"$VENV/bin/glmv-build" "${src[@]}" --output "$WORK" --device "$DEVICE"
exec "$VENV/bin/glmv-serve" --model-repository "$WORK/model_repository" --gateway-port "${GLMV_GATEWAY_PORT:-8080}" "$@"
