#!/usr/bin/env bash
# Build the CPU image from the Dockerfile, run its entrypoint, and check it from outside, without Docker:
#
#   bash scripts/container_check.sh            (as root; installs buildah + mmdebstrap from Debian if missing)
#
# 1. base: `mmdebstrap --variant=minbase bookworm` with python3, python3-venv, python3-pip, libpython3.11 and
#    ca-certificates (Debian's packages only), imported as localhost/glmv-debian-python:3.11-slim-bookworm; the Dockerfile's
#    base-image build arguments (PYTHON_IMAGE, PYTHON_VERSION, DEBIAN_RELEASE) point its CPU base at it.
# 2. torch: the Dockerfile installs torch from TORCH_INDEX_CPU; here that is a local index holding the
#    torch==2.13.0 CPU wheel pip resolves on this machine (and torch's dependencies), mounted into the build.
#    Everything else comes from PyPI, as in any build.
# 3. build: `buildah bud --isolation chroot --format docker --build-arg VARIANT=cpu` (storage: overlay or vfs).
# 4. run: `buildah run --isolation chroot` of docker/entrypoint.sh serve (the image's ENTRYPOINT and CMD) on
#    the host network, on free ports; the entrypoint builds the tiny engine and starts Triton + the gateway.
# 5. check from outside: the image's health checks (docker/healthcheck.py, from the host and inside the
#    container), the gateway's /readyz, an image question through the OpenAI route and the /infer route,
#    and a plain infer() of ensemble_sync over Triton HTTP.
# 6. stop: SIGTERM to the entrypoint (it drains the gateway, stops Triton) and the container is removed.
#
# Settings: GLMV_CONTAINER_WORK (default /var/tmp/glmv-container-check) keeps the base tarball, the torch
# index and the image store between runs; GLMV_CONTAINER_CLEAN=1 removes it at the end (CI sets it).
# GLMV_CONTAINER_STORAGE_DRIVER: overlay (default) or vfs. GLMV_CONTAINER_READY_TIMEOUT (default 900 s)
# bounds the wait for the gateway. GLMV_CA_BUNDLE: the CA bundle the build's RUN steps trust.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${GLMV_CONTAINER_WORK:-/var/tmp/glmv-container-check}
CLEAN=${GLMV_CONTAINER_CLEAN:-0}
READY_TIMEOUT=${GLMV_CONTAINER_READY_TIMEOUT:-900}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BASE_REPO=localhost/glmv-debian-python
BASE_TAG=3.11-slim-bookworm
IMAGE=localhost/glmv-serve:cpu-check
# overlay keeps one copy of each layer; vfs (slower, no kernel overlay needed) copies the whole tree for each
# layer: about 3 GB per step of this image, so the build then needs ~40 GB of disk.
DRIVER=${GLMV_CONTAINER_STORAGE_DRIVER:-overlay}
STORE=(--root "$WORK/storage-$DRIVER" --runroot "$WORK/runroot-$DRIVER" --storage-driver "$DRIVER")
started=$SECONDS

log() { echo "container_check [$((SECONDS - started))s]: $*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

[ "$(id -u)" = 0 ] || die "run as root (buildah's chroot isolation and mmdebstrap need it)"
[ -x "$PYTHON" ] || die "no Python at $PYTHON (run scripts/setup.sh or set PYTHON)"
if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
  log "installing buildah and mmdebstrap from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap >/dev/null
fi
mkdir -p "$WORK"

# --- 1. the Debian base image --------------------------------------------------------------------------
# What python:3.11-slim-bookworm has and the image needs: Python with venv and pip, the shared libpython
# (the Triton Python backend stub links against it) and CA certificates.
BASE_PACKAGES=python3,python3-venv,python3-pip,libpython3.11,ca-certificates
base_tar="$WORK/bookworm-$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-12).tar"
if ! buildah "${STORE[@]}" inspect --type image "$BASE_REPO:$BASE_TAG" >/dev/null 2>&1 ||
  [ "$(buildah "${STORE[@]}" inspect --type image --format '{{index .ImageAnnotations "glmv.base"}}' \
    "$BASE_REPO:$BASE_TAG" 2>/dev/null)" != "$(basename "$base_tar")" ]; then
  if [ ! -s "$base_tar" ]; then
    log "mmdebstrap: Debian bookworm minbase + $BASE_PACKAGES"
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" bookworm "$base_tar.part"
    mv "$base_tar.part" "$base_tar"
  fi
  log "importing the base as $BASE_REPO:$BASE_TAG"
  base_ctr=$(buildah "${STORE[@]}" from scratch)
  buildah "${STORE[@]}" add "$base_ctr" "$base_tar" / >/dev/null
  buildah "${STORE[@]}" config --annotation glmv.base="$(basename "$base_tar")" "$base_ctr"
  buildah "${STORE[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$base_ctr"
  buildah "${STORE[@]}" commit --quiet --rm "$base_ctr" "$BASE_REPO:$BASE_TAG" >/dev/null
fi

# --- 2. a local index with the CPU torch wheel ---------------------------------------------------------
torch_version=$(sed -n 's/^torch==//p' "$ROOT/requirements/cpu.txt")
index="$WORK/torch-index"
if [ ! -f "$index/.torch-$torch_version" ]; then
  log "local index for torch==$torch_version (the wheel pip resolves here, with its dependencies)"
  rm -rf "$index"
  mkdir -p "$index/files"
  "$PYTHON" -m pip download --quiet --only-binary :all: --dest "$index/files" "torch==$torch_version"
  for wheel in "$index"/files/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
    mkdir -p "$index/simple/$name"
    echo "<a href=\"../../files/$(basename "$wheel")\">$(basename "$wheel")</a>" >>"$index/simple/$name/index.html"
  done
  touch "$index/.torch-$torch_version"
fi

# --- 3. build --------------------------------------------------------------------------------------------
# The build's RUN steps trust what this host trusts (a machine may reach PyPI through a TLS proxy whose CA
# only the host's bundle has); Debian's pip reads that bundle. The image keeps its own.
CA_BUNDLE=${GLMV_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE (set GLMV_CA_BUNDLE)"
log "building $IMAGE (VARIANT=cpu)"
buildah "${STORE[@]}" bud --isolation chroot --format docker --layers --quiet \
  --build-arg VARIANT=cpu \
  --build-arg PYTHON_IMAGE="$BASE_REPO" --build-arg PYTHON_VERSION="${BASE_TAG%%-*}" \
  --build-arg DEBIAN_RELEASE=bookworm \
  --build-arg TORCH_INDEX_CPU=file:///mnt/torch-index/simple \
  --volume "$index:/mnt/torch-index:ro" --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
  --tag "$IMAGE" --file "$ROOT/Dockerfile" "$ROOT" >"$WORK/build.log" 2>&1 ||
  {
    tail -n 40 "$WORK/build.log" >&2
    die "buildah bud failed (log: $WORK/build.log)"
  }
log "built $IMAGE"

# --- 4. run the entrypoint -------------------------------------------------------------------------------
read -r http_port grpc_port metrics_port gateway_port < <("$PYTHON" -c "
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(('127.0.0.1', 0))
print(*(s.getsockname()[1] for s in socks))")
ctr=$(buildah "${STORE[@]}" from --quiet "$IMAGE")
serve_pid="" entry_pid="" entry_ns=""

# PIDs of the processes started in the container: those in the entrypoint's mount namespace. (buildah's
# chroot isolation has no PID namespace; a SIGTERM to `buildah run` itself does not reach them.)
container_pids() {
  local proc
  [ -n "$entry_ns" ] || return 0
  for proc in /proc/[0-9]*; do
    if [ "$(readlink "$proc/ns/mnt" 2>/dev/null)" = "$entry_ns" ]; then echo "${proc#/proc/}"; fi
  done
}

cleanup() {
  local rc=$? pid
  if [ -n "$entry_pid" ] && kill -0 "$entry_pid" 2>/dev/null; then
    kill -TERM "$entry_pid" 2>/dev/null || true
    sleep 5
  fi
  for pid in $(container_pids); do
    log "killing leftover process $pid"
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "$serve_pid" ]; then
    kill -TERM "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
  fi
  buildah "${STORE[@]}" rm "$ctr" >/dev/null 2>&1 || true
  if [ "$CLEAN" = 1 ]; then
    buildah "${STORE[@]}" rmi --all --force >/dev/null 2>&1 || true
    umount "$WORK/storage-$DRIVER/overlay" 2>/dev/null || true
    rm -rf "$WORK"
  fi
  log "done (exit $rc)"
}
trap cleanup EXIT

log "running the entrypoint: HTTP :$http_port, gRPC :$grpc_port, metrics :$metrics_port, gateway :$gateway_port"
buildah "${STORE[@]}" run --isolation chroot \
  --env GLMV_HTTP_PORT="$http_port" --env GLMV_GRPC_PORT="$grpc_port" \
  --env GLMV_METRICS_PORT="$metrics_port" --env GLMV_GATEWAY_PORT="$gateway_port" \
  "$ctr" -- /opt/glmv-serve/docker/entrypoint.sh serve >"$WORK/serve.log" 2>&1 &
serve_pid=$!

# --- 5. check from outside -------------------------------------------------------------------------------
export GLMV_HTTP_PORT=$http_port GLMV_GATEWAY_PORT=$gateway_port
deadline=$((SECONDS + READY_TIMEOUT))
until "$PYTHON" "$ROOT/docker/healthcheck.py" triton-ready gateway-live gateway-ready 2>/dev/null; do
  if ! kill -0 "$serve_pid" 2>/dev/null; then
    tail -n 60 "$WORK/serve.log" >&2
    die "the entrypoint exited before the gateway was ready (log: $WORK/serve.log)"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    tail -n 60 "$WORK/serve.log" >&2
    die "the gateway was not ready within ${READY_TIMEOUT}s (GLMV_CONTAINER_READY_TIMEOUT)"
  fi
  sleep 2
done
log "ready: Triton and the gateway answer their health checks"
# The entrypoint's shell: bash running entrypoint.sh in another mount namespace, whose parent is not such a
# shell too (its subshells have the same command line; its parent is buildah's chroot helper).
is_entrypoint() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q "^bash /opt/glmv-serve/docker/entrypoint.sh serve"; }
for pid in $(pgrep -f "/opt/glmv-serve/docker/entrypoint.sh serve"); do
  if is_entrypoint "$pid" && [ "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] &&
    ! is_entrypoint "$(ps -o ppid= -p "$pid" | tr -d ' ')"; then
    entry_pid=$pid
  fi
done
[ -n "$entry_pid" ] || die "cannot find the entrypoint's process"
entry_ns=$(readlink "/proc/$entry_pid/ns/mnt")
buildah "${STORE[@]}" run --isolation chroot \
  --env GLMV_HTTP_PORT="$http_port" --env GLMV_GATEWAY_PORT="$gateway_port" "$ctr" -- \
  python3 /opt/glmv-serve/docker/healthcheck.py triton-ready gateway-live ||
  die "the image's HEALTHCHECK command failed inside the container"
log "the image's HEALTHCHECK command passes inside the container"

"$PYTHON" - "$http_port" "$gateway_port" <<'EOF' || die "a request from outside failed"
import base64
import io
import sys

import httpx
from PIL import Image

http_port, gateway_port = sys.argv[1:]
buf = io.BytesIO()
Image.new("RGB", (64, 48), (30, 144, 255)).save(buf, format="JPEG")
image_b64 = base64.b64encode(buf.getvalue()).decode()
gateway = f"http://127.0.0.1:{gateway_port}"

r = httpx.post(
    f"{gateway}/v1/chat/completions",
    json={
        "model": "glm-4.6v-flash",
        "max_tokens": 16,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image_b64}"}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
    },
    timeout=300,
)
assert r.status_code == 200, r.text
body = r.json()
choice = body["choices"][0]
assert choice["finish_reason"] in ("stop", "length"), body
assert body["usage"]["prompt_tokens"] > 10 and body["usage"]["completion_tokens"] > 0, body
print(f"OpenAI route: {body['usage']} finish_reason={choice['finish_reason']}", file=sys.stderr)

r = httpx.post(f"{gateway}/infer", json={"image": image_b64, "text": "What is in this image?", "max_new_tokens": 16}, timeout=300)
assert r.status_code == 200 and isinstance(r.json()["response"], str), r.text
print("/infer answered", file=sys.stderr)

r = httpx.post(
    f"http://127.0.0.1:{http_port}/v2/models/ensemble_sync/infer",
    json={
        "inputs": [
            {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["What is in this image?"]},
            {"name": "image_input", "shape": [1], "datatype": "BYTES", "data": [image_b64]},
            {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [16]},
            {"name": "temperature", "shape": [1], "datatype": "FP32", "data": [0.0]},
        ]
    },
    timeout=300,
)
assert r.status_code == 200, r.text
outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
assert outputs["finish_reason"][0] in ("stop", "length"), outputs
print("Triton ensemble_sync infer() answered", file=sys.stderr)
EOF
log "an image question answered through the gateway (OpenAI route and /infer) and Triton (ensemble_sync)"

# --- 6. stop ---------------------------------------------------------------------------------------------
log "SIGTERM to the entrypoint (PID $entry_pid)"
kill -TERM "$entry_pid"
serve_rc=0
wait "$serve_pid" || serve_rc=$?
serve_pid=""
tail -n 3 "$WORK/serve.log" >&2
[ "$serve_rc" = 0 ] || die "the entrypoint exited with code $serve_rc after SIGTERM (log: $WORK/serve.log)"
sleep 1
leftover=$(container_pids | tr '\n' ' ')
[ -z "$leftover" ] || die "processes left in the container after the entrypoint exited: $leftover"
log "the entrypoint stopped the gateway and Triton and exited 0; no process left"
log "PASSED in $((SECONDS - started))s"
