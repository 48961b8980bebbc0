#!/usr/bin/env bash
# Command 2: install everything, then run every check CI runs (ruff lint + format check, all tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${GLMV_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest "$@"
