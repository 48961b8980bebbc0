#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine lacks (Python 3.12, manylinux x86_64), for
# `python -m benchmarks.gpu_harness` there. That machine has torch, transformers, numpy 2, pillow, aiohttp,
# grpcio, protobuf, packaging, urllib3 and ml-dtypes, but no tritonclient, no Triton server, no xgrammar and
# no pydantic.
#
# .whl/        for the harness's own process (pip install --target /tmp/site, then PYTHONPATH=/tmp/site):
#   tritonclient      the gRPC client (pure Python, 0.1 MB)
#   fastapi, starlette, uvicorn, python-multipart, annotated-doc, opentelemetry-api  the gateway, for
#                     benchmarks.soak (0.4 MB; fastapi 0.165 imports opentelemetry at start)
#   python-rapidjson  imported by tritonclient.grpc (1.8 MB)
#   jsonschema, jsonschema-specifications, referencing, rpds-py, attrs  the structured-output GPU tests (0.5 MB)
#   nvidia-pytriton   only for the Triton 2.51 server it bundles; slimmed here: the stubs for Pythons other
#                     than 3.12 and the libpython3.13 they need are dropped (55 MB -> 40 MB)
#   grpcio, protobuf  only with WITH_GRPC=1 (7.7 MB): tritonclient 2.73's generated code needs grpcio >= 1.81.1
#                     and protobuf >= 6.33.5; when the machine's own are older, the harness falls back to
#                     Triton's HTTP generate_stream endpoint (aiohttp, which the machine has) by itself
# .whl/llm/    for the llm's guided decoding and preprocessing's PNG decoder, installed into the interpreter's own environment (the llm
#              imports them inside Triton's Python backend stubs, which ignore PYTHONPATH; pip takes from
#              here only what is missing or too old there):
#   xgrammar, apache-tvm-ffi  the grammar engine (4.6 MB)
#   pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions  what `import xgrammar`
#                     imports beyond torch, transformers and numpy (2.7 MB; pydantic needs typing-extensions
#                     >= 4.16)
#   pyspng            libspng's PNG decoder, which preprocessing uses for still 8-bit PNGs (0.2 MB)
# .whl/stub/   numpy 1.26.4 for the launcher's numpy<2 stub env (numpy 2 breaks the Triton 2.51 stub), slimmed
#              here: its tests, f2py, C headers, static libraries, Cython declarations, type stubs and the
#              SIMD test module are dropped (18 MB -> 15 MB); numpy and its core, linalg, random, fft and ma
#              import as before. A subfolder, so that `pip install .whl/*.whl` leaves numpy 2 alone.
#
# A device call carries at most 64 MiB, wheels and working tree together, so this script fails when
# everything under .whl/ passes LIMIT_MIB (default 62). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
# and for .whl/llm/ (benchmarks.gpu_harness does this itself when xgrammar is not in site-packages):
#   python3 -m pip install -q --no-index --find-links .whl/llm --no-compile --no-cache-dir xgrammar==0.2.9
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-62}
PY=${PYTHON:-python3}
mkdir -p "$DEST/llm" "$DEST/stub"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; } || true

download() {  # download DIR SPEC...
  local dir=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "$@"
}

slim() {  # slim KIND SRC DST: rewrite a wheel without the members KIND never loads; RECORD lists only what stays
  "$PY" - "$@" <<'EOF'
import re, sys, zipfile
kind, src, dst = sys.argv[1:]
if kind == "pytriton":
    def keep(name: str) -> bool:
        if "/python_backend_stubs/" in name and "/python_backend_stubs/3.12/" not in name:
            return False
        return "libpython3-" not in name  # the 3.13 stub's libpython; the 3.12 stub links the system's
else:  # numpy 1.26: nothing `import numpy` (or the Triton stub through it) loads
    dropped = re.compile(
        r"^numpy/(.*/)?tests/|^numpy/(f2py|distutils|_pyinstaller|random/_examples|random/lib|core/include|core/lib)/"
        r"|\.pyi$|\.pxd$|^numpy/core/_simd\."
    )
    def keep(name: str) -> bool:
        return dropped.search(name) is None
with zipfile.ZipFile(src) as zin:
    if all(keep(name) for name in zin.namelist()):
        sys.exit(0)  # slimmed already
    members = [(info, zin.read(info)) for info in zin.infolist() if keep(info.filename)]
with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info, data in members:
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if keep(l.split(",")[0])) + "\n").encode()
        zout.writestr(info, data, compresslevel=9)
EOF
}

download "$DEST" tritonclient==2.73.0 python-rapidjson==1.25
# the gateway, for benchmarks.soak (pydantic comes from llm/; the machine has httpx, anyio, h11, click)
# jsonschema and its dependencies, for the structured-output tests (pytest -m gpu)
download "$DEST" jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  attrs==26.1.0
download "$DEST" fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34 annotated-doc==0.0.7 \
  opentelemetry-api==1.45.2
if [ "${WITH_GRPC:-0}" = 1 ]; then
  download "$DEST" grpcio==1.85.1 protobuf==6.33.5
fi
rm -f "$DEST"/xgrammar-*.whl "$DEST"/apache_tvm_ffi-*.whl "$DEST"/llm/xgrammar-*.whl  # under llm/; no stale version
download "$DEST/llm" xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 pyspng==0.1.4

if ! ls "$DEST"/nvidia_pytriton-0.7.0-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  download "$tmp" nvidia-pytriton==0.7.0
  full=$(ls "$tmp"/nvidia_pytriton-0.7.0-*.whl)
  slim pytriton "$full" "$DEST/$(basename "$full")"
  rm -rf "$tmp"
fi
# ICU's 30 MB data library is only reached through libtritonserver -> libxml2 -> libicuuc, for character
# encodings the server never converts: the wheel gets a stub with the same name and data symbol (needs cc).
pytriton=$(ls "$DEST"/nvidia_pytriton-0.7.0-*.whl)
if command -v cc >/dev/null && unzip -l "$pytriton" | awk '/libicudata/ && $1 > 1000000 {found=1} END {exit !found}'; then
  tmp=$(mktemp -d)
  member=$(unzip -Z1 "$pytriton" | grep 'nvidia_pytriton.libs/libicudata')
  unzip -p "$pytriton" "$member" >"$tmp/icudata.so"
  symbol=$(nm -D --defined-only "$tmp/icudata.so" | awk '/icudt[0-9]+_dat/ {print $3}')
  echo "const char ${symbol}[64] __attribute__((aligned(16))) = {0};" >"$tmp/stub.c"
  cc -shared -fPIC -nostdlib -Wl,-soname,"$(basename "$member")" -o "$tmp/stub.so" "$tmp/stub.c"
  "$PY" - "$pytriton" "$member" "$tmp/stub.so" <<'EOF'
import base64, hashlib, sys, zipfile
wheel, member, stub = sys.argv[1:]
data = open(stub, "rb").read()
digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
with zipfile.ZipFile(wheel) as zin:
    members = [(info, zin.read(info)) for info in zin.infolist()]
with zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
    for info, content in members:
        if info.filename == member:
            content = data
        elif info.filename.endswith(".dist-info/RECORD"):
            lines = [f"{member},sha256={digest},{len(data)}" if l.startswith(member + ",") else l
                     for l in content.decode().splitlines()]
            content = ("\n".join(lines) + "\n").encode()
        zout.writestr(info, content, compresslevel=9)
EOF
  mv "$pytriton.tmp" "$pytriton"
  rm -rf "$tmp"
fi
if ! ls "$DEST"/stub/numpy-1.26.4-*.whl >/dev/null 2>&1; then
  download "$DEST/stub" numpy==1.26.4
fi
stub=$(ls "$DEST"/stub/numpy-1.26.4-*.whl)
slim numpy "$stub" "$stub.slim" && { [ ! -f "$stub.slim" ] || mv "$stub.slim" "$stub"; }

total=$(du -sb "$DEST" | cut -f1)
ls -lR "$DEST"
echo "wheels: $((total / 1024 / 1024)) MiB under $DEST (limit ${LIMIT_MIB} MiB, the working tree needs the rest of 64)"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "too big: drop a wheel the GPU machine already has" >&2
  exit 1
fi
