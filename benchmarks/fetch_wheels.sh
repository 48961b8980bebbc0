#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine lacks (Python 3.12, manylinux x86_64), for
# `python -m benchmarks.gpu_harness` there. That machine has torch, transformers, numpy, pillow, aiohttp,
# grpcio, protobuf, packaging, urllib3 and ml-dtypes, but no tritonclient and no Triton server.
#
#   tritonclient      the gRPC client (pure Python, 0.1 MB)
#   python-rapidjson  imported by tritonclient.grpc (1.8 MB)
#   xgrammar, apache-tvm-ffi  guided decoding in the llm (xgrammar also imports pydantic, which the
#                     machine must have for guided requests; requests without a guide never import it)
#   nvidia-pytriton   only for the Triton 2.51 server it bundles; slimmed here: the stubs for Pythons other
#                     than 3.12 and the libpython3.13 they need are dropped (55 MB -> 40 MB)
#   grpcio, protobuf  only with WITH_GRPC=1 (7.7 MB): tritonclient 2.73's generated code needs grpcio >= 1.81.1
#                     and protobuf >= 6.33.5; when the machine's own are older, the harness falls back to
#                     Triton's HTTP generate_stream endpoint (aiohttp, which the machine has) by itself
#
# Other wheels under .whl/ (e.g. .whl/stub/numpy-1.26.4, the launcher's numpy<2 stub env) are kept and
# counted: a device call carries at most 64 MiB, wheels and working tree together, so this script fails
# when everything under .whl/ passes LIMIT_MIB (default 62). Use on the GPU machine (top-level wheels only):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-62}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; } || true

download() {  # download DIR SPEC...
  local dir=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "$@"
}

download "$DEST" tritonclient==2.73.0 python-rapidjson==1.25
download "$DEST" xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2  # guided decoding (engine/structured.py), 5 MB
if [ "${WITH_GRPC:-0}" = 1 ]; then
  download "$DEST" grpcio==1.85.1 protobuf==6.33.5
fi

if ! ls "$DEST"/nvidia_pytriton-0.7.0-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  download "$tmp" nvidia-pytriton==0.7.0
  full=$(ls "$tmp"/nvidia_pytriton-0.7.0-*.whl)
  # Rewrite the wheel without the members Python 3.12 never loads; RECORD lists only what stays.
  "$PY" - "$full" "$DEST/$(basename "$full")" <<'EOF'
import sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
def keep(name: str) -> bool:
    if "/python_backend_stubs/" in name and "/python_backend_stubs/3.12/" not in name:
        return False
    return "libpython3-" not in name  # the 3.13 stub's libpython; the 3.12 stub links the system's
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if not keep(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if keep(l.split(",")[0])) + "\n").encode()
        zout.writestr(info, data)
EOF
  rm -rf "$tmp"
fi

total=$(du -sb "$DEST" | cut -f1)
ls -lR "$DEST"
echo "wheels: $((total / 1024 / 1024)) MiB under $DEST (limit ${LIMIT_MIB} MiB, the working tree needs the rest of 64)"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "too big: drop a wheel the GPU machine already has" >&2
  exit 1
fi
