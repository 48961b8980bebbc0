#!/usr/bin/env bash
# Installs everything glmv-serve needs on a CPU machine into ./.venv (idempotent, quick when up to date).
#   - Python packages pinned in requirements/cpu.txt (torch==2.13.0 is the local CPU build)
#   - this project (editable) and the client package (client/)
#   - the Triton Inference Server bundled in the nvidia-pytriton wheel (--no-deps: only its server is used)
#   - Debian's libjemalloc2, which glmv-serve preloads into tritonserver (build_engine/allocator.py), as root
#   - Debian's chromium for the browser tests (skipped with GLMV_SKIP_BROWSER=1)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${GLMV_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.glmv-installed"
want=$(cat requirements/cpu.txt client/pyproject.toml pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements/cpu.txt
  "$VENV/bin/python" -m pip install -q --no-deps nvidia-pytriton==0.7.0
  "$VENV/bin/python" -m pip install -q --no-deps -e . -e ./client
  echo "$want" > "$stamp"
fi

has_allocator='import sys; from build_engine.allocator import choose_allocator as c; sys.exit(c("auto").library is None)'
if ! "$VENV/bin/python" -c "$has_allocator"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null) \
      || echo "setup: libjemalloc2 could not be installed; tritonserver will run with glibc's malloc" >&2
  else
    echo "setup: libjemalloc2 is missing and cannot be installed here; tritonserver will run with glibc's malloc" >&2
  fi
fi

if [ "${GLMV_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null) \
      || echo "setup: chromium could not be installed; browser tests will be skipped" >&2
  else
    echo "setup: chromium is missing and this is not root; browser tests will be skipped" >&2
  fi
fi
