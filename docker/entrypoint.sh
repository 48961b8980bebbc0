#!/usr/bin/env bash
# Entry point of the glmv-serve image.
#
#   entrypoint.sh [serve]      build the engine if it is missing or stale, then run Triton (glmv-serve) and
#                              the gateway until either exits or a signal comes (the default)
#   entrypoint.sh build        build the engine if it is missing or stale, then exit
#   entrypoint.sh fingerprint  print what the engine would be built from (the stored fingerprint's format)
#   entrypoint.sh CMD ARGS...  run any other command (bash, glmv-build, python -m pytest ...)
#
# Settings, all from the environment (the image sets the variant's defaults):
#   GLMV_CHECKPOINT_DIR  HF checkpoint of GLM-4.6V-Flash, read only              default /models/checkpoint
#   GLMV_ENGINE_ROOT     the engine volume; glmv-build writes $GLMV_ENGINE_ROOT/engine (the engine directory,
#                        with model_repository/ inside) and this script its fingerprint + lock  default /models/engine
#   GLMV_PRESET          tiny|small|dummy-full: build a random model when the checkpoint dir has no config.json
#   GLMV_DEVICE, GLMV_DTYPE, GLMV_GPUS   glmv-build --device / --dtype / --gpus (each passed only when set)
#   GLMV_BUILD_ARGS      extra glmv-build arguments (split on whitespace, no quoting)
#   GLMV_FORCE_REBUILD   1: rebuild even when the fingerprint matches
#   GLMV_HTTP_PORT GLMV_GRPC_PORT GLMV_METRICS_PORT GLMV_GATEWAY_PORT       default 8000 8001 8002 8080
#   GLMV_STARTUP_TIMEOUT seconds Triton may take to load the models           default 1800
#   GLMV_SERVE_ARGS      extra glmv-serve arguments;  GLMV_GATEWAY_ARGS  extra gateway arguments
#   GLMV_TRITON_MALLOC   tritonserver's allocator (glmv-serve --malloc): auto (jemalloc, else tcmalloc,
#                        where installed, else glibc; the image has jemalloc), jemalloc, tcmalloc, glibc
#                        or a library path                                   default auto
#   GLMV_DRAIN_TIMEOUT   seconds the gateway gets to finish open streams after SIGTERM   default 30
#   GLMV_STOP_TIMEOUT    seconds glmv-serve gets to stop Triton after that               default 60
#   GLMV_TRITON_LOG      Triton's log file, copied to stdout          default ${TMPDIR:-/tmp}/glmv-tritonserver.log
#
# The engine is rebuilt when the fingerprint stored in $GLMV_ENGINE_ROOT/.glmv-fingerprint differs from the
# current one: sha256 of the checkpoint's config.json, name + size + mtime of every top-level checkpoint file
# (the safetensors shards, their index, tokenizer and processor files), the build settings (with GLMV_GPUS
# set, also the visible GPUs), and sha256 of the build code (build_engine/, model_repository/). It is removed
# before a build and written only after glmv-build succeeds, so an interrupted build is redone on the next
# start. A lock file serialises builders sharing one engine volume.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECKPOINT_DIR=${GLMV_CHECKPOINT_DIR:-/models/checkpoint}
ENGINE_ROOT=${GLMV_ENGINE_ROOT:-/models/engine}
# A subfolder, not the volume itself: glmv-build builds in a temporary sibling of --output and renames it into
# place, which a mount point cannot take.
ENGINE_DIR="$ENGINE_ROOT/engine"
MODEL_REPOSITORY="$ENGINE_DIR/model_repository"
FINGERPRINT_FILE="$ENGINE_ROOT/.glmv-fingerprint"
HTTP_PORT=${GLMV_HTTP_PORT:-8000}
GRPC_PORT=${GLMV_GRPC_PORT:-8001}
METRICS_PORT=${GLMV_METRICS_PORT:-8002}
GATEWAY_PORT=${GLMV_GATEWAY_PORT:-8080}
STARTUP_TIMEOUT=${GLMV_STARTUP_TIMEOUT:-1800}
DRAIN_TIMEOUT=${GLMV_DRAIN_TIMEOUT:-30}
STOP_TIMEOUT=${GLMV_STOP_TIMEOUT:-60}
TRITON_LOG=${GLMV_TRITON_LOG:-${TMPDIR:-/tmp}/glmv-tritonserver.log}
export GLMV_HTTP_PORT=$HTTP_PORT GLMV_GATEWAY_PORT=$GATEWAY_PORT  # read by healthcheck.py

log() { echo "entrypoint: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

for setting in HTTP_PORT GRPC_PORT METRICS_PORT GATEWAY_PORT STARTUP_TIMEOUT DRAIN_TIMEOUT STOP_TIMEOUT; do
  [[ ${!setting} =~ ^[0-9]+$ ]] || die "GLMV_$setting=${!setting} is not a whole number"
done

# --- engine ---------------------------------------------------------------------------------------------

has_checkpoint() { [ -f "$CHECKPOINT_DIR/config.json" ]; }

# SOURCE: the glmv-build source arguments: the mounted checkpoint, else the preset, else a clear error.
set_source() {
  if has_checkpoint; then
    SOURCE=(--checkpoint "$CHECKPOINT_DIR")
  elif [ -n "${GLMV_PRESET:-}" ]; then
    SOURCE=(--preset "$GLMV_PRESET")
  else
    die "no checkpoint: $CHECKPOINT_DIR/config.json does not exist and GLMV_PRESET is not set;" \
      "mount the GLM-4.6V-Flash checkpoint there or set GLMV_PRESET=tiny|small|dummy-full"
  fi
}

# sha256 over the files that decide what glmv-build writes (the build step and the model templates).
build_code_hash() {
  local -a dirs=()
  local dir
  for dir in build_engine model_repository; do
    if [ -d "$ROOT/$dir" ]; then dirs+=("$dir"); fi
  done
  (cd "$ROOT" && find "${dirs[@]}" -type f -not -path '*/__pycache__/*' \
    \( -name '*.py' -o -name '*.pbtxt' -o -name '*.json' -o -name '*.jinja' \) -print0 |
    LC_ALL=C sort -z | xargs -0 -r sha256sum | sha256sum | cut -d' ' -f1)
}

fingerprint() {
  set_source
  echo "glmv-engine-fingerprint v1"
  echo "source: ${SOURCE[*]}"
  echo "device=${GLMV_DEVICE:-} dtype=${GLMV_DTYPE:-} gpus=${GLMV_GPUS:-} args=${GLMV_BUILD_ARGS:-}"
  if [ -n "${GLMV_GPUS:-}" ]; then
    # `--gpus all` renders one instance group per visible GPU: another set of GPUs needs another repository.
    local gpus
    gpus=$(nvidia-smi --query-gpu=index,name --format=csv,noheader 2>/dev/null) || gpus=unknown
    echo "visible gpus: ${gpus//$'\n'/; }"
  fi
  echo "build code: $(build_code_hash)"
  if has_checkpoint; then
    echo "config.json sha256: $(sha256sum <"$CHECKPOINT_DIR/config.json" | cut -d' ' -f1)"
    # -L: Hugging Face cache snapshots are symlinks into blobs/; size and mtime are the blob's.
    find -L "$CHECKPOINT_DIR" -maxdepth 1 -type f -not -name '.*' -printf '%f %s %T@\n' | LC_ALL=C sort
  fi
}

run_build() {
  local -a extra=() gpus=()
  set_source
  read -r -a extra <<<"${GLMV_BUILD_ARGS:-}"
  [ -z "${GLMV_DEVICE:-}" ] || extra+=(--device "$GLMV_DEVICE")
  [ -z "${GLMV_DTYPE:-}" ] || extra+=(--dtype "$GLMV_DTYPE")
  [ -z "${GLMV_GPUS:-}" ] || gpus=(--gpus "$GLMV_GPUS")
  log "building the engine: glmv-build ${SOURCE[*]} --output $ENGINE_DIR ${extra[*]} ${gpus[*]}"
  rm -f "$FINGERPRINT_FILE"
  # Leftovers of a build killed before it could clean up (each can hold a full copy of the weights).
  rm -rf "$ENGINE_ROOT"/.engine.building-* "$ENGINE_ROOT"/.engine.old-*
  # In the background so that a SIGTERM during a long build reaches glmv-build at once.
  glmv-build "${SOURCE[@]}" --output "$ENGINE_DIR" "${extra[@]}" "${gpus[@]}" &
  build_pid=$!
  trap 'log "signal: stopping the build"; kill -TERM "$build_pid" 2>/dev/null || true; stopping=1' TERM INT
  [ "$stopping" = 0 ] || kill -TERM "$build_pid" 2>/dev/null || true
  local rc=0
  while :; do
    rc=0
    wait "$build_pid" || rc=$?
    kill -0 "$build_pid" 2>/dev/null || break # wait was cut short by a signal while the build still runs
  done
  trap 'stopping=1' TERM INT
  [ "$stopping" = 0 ] || exit 143
  [ "$rc" = 0 ] || die "glmv-build failed with exit code $rc"
}

ensure_engine() {
  mkdir -p "$ENGINE_ROOT"
  [ -w "$ENGINE_ROOT" ] || die "$ENGINE_ROOT is not writable by uid $(id -u); chown the volume or run with --user"
  local want
  want=$(fingerprint)
  exec 9>"$ENGINE_ROOT/.glmv-build.lock"
  flock 9
  if [ "${GLMV_FORCE_REBUILD:-0}" = 1 ]; then
    log "GLMV_FORCE_REBUILD=1: rebuilding the engine"
  elif [ ! -f "$FINGERPRINT_FILE" ] || [ ! -f "$ENGINE_DIR/engine_config.json" ] || [ ! -d "$MODEL_REPOSITORY" ]; then
    log "no complete engine in $ENGINE_DIR"
  elif [ "$(cat "$FINGERPRINT_FILE")" != "$want" ]; then
    log "the checkpoint, build settings or build code changed since the engine was built:"
    diff "$FINGERPRINT_FILE" <(printf '%s\n' "$want") >&2 || true
  else
    log "engine in $ENGINE_DIR is up to date"
    exec 9>&-
    return
  fi
  run_build
  [ "$stopping" = 0 ] || exit 143
  printf '%s\n' "$want" >"$FINGERPRINT_FILE.tmp"
  mv "$FINGERPRINT_FILE.tmp" "$FINGERPRINT_FILE"
  exec 9>&-
  log "engine built in $ENGINE_DIR"
}

# --- serving --------------------------------------------------------------------------------------------

triton_pid="" gateway_pid="" tail_pid=""

# SIGTERM the process, give it $2 seconds, then SIGKILL it; returns its exit status.
stop_process() {
  local pid=$1 timeout=$2 name=$3 rc=0
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop within ${timeout}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}

# Gateway first (stops taking requests, finishes open streams), then Triton, then the log copier.
shutdown() {
  local gateway_rc=0 triton_rc=0
  stop_process "$gateway_pid" "$DRAIN_TIMEOUT" gateway || gateway_rc=$?
  stop_process "$triton_pid" "$STOP_TIMEOUT" glmv-serve || triton_rc=$?
  stop_process "$tail_pid" 5 "log copier" || true
  log "stopped (gateway exit $gateway_rc, glmv-serve exit $triton_rc)"
}

serve() {
  ensure_engine
  [ "$stopping" = 0 ] || exit 143
  local -a serve_extra=() gateway_extra=()
  read -r -a serve_extra <<<"${GLMV_SERVE_ARGS:-}"
  read -r -a gateway_extra <<<"${GLMV_GATEWAY_ARGS:-}"

  : >"$TRITON_LOG"
  tail -n +1 -F "$TRITON_LOG" &
  tail_pid=$!
  glmv-serve --model-repository "$MODEL_REPOSITORY" --http-port "$HTTP_PORT" \
    --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" --startup-timeout "$STARTUP_TIMEOUT" \
    --log-file "$TRITON_LOG" "${serve_extra[@]}" &
  triton_pid=$!

  # The gateway starts once Triton is ready, so its first /readyz already reflects the loaded models.
  until python3 "$ROOT/docker/healthcheck.py" triton-ready 2>/dev/null; do
    if [ "$stopping" = 1 ]; then
      shutdown
      exit 143
    fi
    if ! kill -0 "$triton_pid" 2>/dev/null; then
      local rc=0
      wait "$triton_pid" || rc=$?
      stop_process "$tail_pid" 5 "log copier" || true
      die "glmv-serve exited with code $rc before Triton was ready"
    fi
    sleep 1
  done
  log "Triton is ready; starting the gateway on :$GATEWAY_PORT"
  python3 -m gateway --triton-url "localhost:$GRPC_PORT" --port "$GATEWAY_PORT" "${gateway_extra[@]}" &
  gateway_pid=$!

  # Until a signal comes or either process exits. A signal cuts the `wait` short at once; polling a
  # background sleep (rather than `wait -n` on the servers) leaves no window in which a signal is missed.
  while [ "$stopping" = 0 ] && kill -0 "$triton_pid" 2>/dev/null && kill -0 "$gateway_pid" 2>/dev/null; do
    sleep 1 &
    wait "$!" || true
  done
  if [ "$stopping" = 1 ]; then
    log "signal: shutting down"
    shutdown
    exit 0
  fi
  kill -0 "$triton_pid" 2>/dev/null || log "glmv-serve exited; stopping the gateway"
  kill -0 "$gateway_pid" 2>/dev/null || log "the gateway exited; stopping Triton"
  shutdown
  exit 1
}

# As PID 1 the shell ignores SIGTERM/SIGINT unless it traps them; each phase checks `stopping`.
stopping=0
trap 'stopping=1' TERM INT

case "${1:-serve}" in
  serve) serve ;;
  build) ensure_engine ;;
  fingerprint) fingerprint ;;
  *) exec "$@" ;;
esac
