# syntax=docker/dockerfile:1.7
#
# glmv-serve image: NVIDIA Triton Inference Server + the glmv-serve Python-backend models + the
# OpenAI-compatible gateway, in one container.
#
#   GPU (default):  docker build -t glmv-serve:0.1.0 .
#   CPU (tiny model, no GPU):  docker build --build-arg VARIANT=cpu -t glmv-serve:0.1.0-cpu .
#
# Needs BuildKit (the default builder since Docker 23): only the stages of the chosen VARIANT are built.
#
# Why the GPU variant starts from NVIDIA's Triton image (nvcr.io/nvidia/tritonserver:<yy.mm>-py3):
#   - it carries the `tritonserver` binary, the Python backend and its stub built for the image's own
#     Python, and a CUDA user space that NVIDIA tests with that server build; glmv-serve's launcher uses a
#     `tritonserver` found on PATH as is (build_engine/launcher.py);
#   - the `-py3` flavour is the one with the Python backend and without TensorRT-LLM / vLLM: TensorRT-LLM has
#     no GLM-4.xV model, and our engine is PyTorch code that runs inside Python-backend models, so torch is
#     installed here (CUDA wheels from the PyTorch index, pinned) and nothing else from NGC is needed.
# The CPU variant has no NGC image to start from: python:<ver>-slim plus the Triton server that the
# nvidia-pytriton wheel bundles (the launcher finds and prepares it), serving the tiny random model.

ARG VARIANT=gpu
# Triton 25.10: CUDA 13.0, Ubuntu 24.04, Python 3.12; the torch wheel's CUDA (cu130) must match.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver
ARG TRITON_VERSION=25.10
ARG PYTHON_IMAGE=python
ARG PYTHON_VERSION=3.11.14
ARG DEBIAN_RELEASE=bookworm

# ---- base images: what the final image runs on, one per variant -------------------------------------------

FROM ${TRITON_IMAGE}:${TRITON_VERSION}-py3 AS base-gpu
ENV GLMV_DEVICE=cuda \
    GLMV_DTYPE=bfloat16 \
    GLMV_PRESET=

FROM ${PYTHON_IMAGE}:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS base-cpu
ENV GLMV_DEVICE=cpu \
    GLMV_DTYPE=float32 \
    GLMV_PRESET=tiny

# ---- deps-<variant>: the Python environment in /opt/venv --------------------------------------------------
# Filled by the base image's own pip (`pip --python`), so that neither image's system Python is changed
# (Ubuntu 24.04 marks it externally managed). The GPU venv is made without pip (Ubuntu's python3 has no
# ensurepip unless python3-venv is installed, and the running image needs no pip).

FROM base-gpu AS deps-gpu
ARG TORCH_VERSION_GPU=2.11.0
ARG TORCH_INDEX_GPU=https://download.pytorch.org/whl/cu130
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY requirements/gpu.txt /tmp/requirements.txt
RUN python3 -m venv --without-pip /opt/venv \
    && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir \
        --index-url "${TORCH_INDEX_GPU}" "torch==${TORCH_VERSION_GPU}" \
    && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir -r /tmp/requirements.txt

FROM base-cpu AS deps-cpu
ARG TORCH_VERSION_CPU=2.13.0
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG PYTRITON_VERSION=0.7.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY requirements/gpu.txt /tmp/requirements.txt
# requirements/gpu.txt is cpu.txt without torch and triton: torch comes from the CPU-only index (the PyPI
# build would pull the CUDA libraries); without triton the engine's kernels fall back to torch on CPU. nvidia-pytriton with --no-deps: only its bundled server is used (its own Python
# package pins numpy<2). This venv keeps pip: the launcher uses it once, below, to give the bundled server's
# Python-backend stub the numpy 1.x it was built against.
RUN python3 -m venv /opt/venv \
    && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir \
        --index-url "${TORCH_INDEX_CPU}" "torch==${TORCH_VERSION_CPU}" \
    && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir -r /tmp/requirements.txt \
    && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir --no-deps \
        "nvidia-pytriton==${PYTRITON_VERSION}"

# ---- app: the project itself -------------------------------------------------------------------------------

# DL3006 (untagged image) misreads a build-stage name chosen by VARIANT: deps-gpu or deps-cpu above.
# hadolint ignore=DL3006
FROM deps-${VARIANT} AS app
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY . /opt/glmv-serve
WORKDIR /opt/glmv-serve
# Editable install: glmv-build renders the Triton models from model_repository/ next to the packages, which a
# wheel install would leave behind. The client is a plain package. Bytecode is compiled now because the source
# tree is read-only for the runtime user.
RUN python3 -m pip --python /opt/venv/bin/python install --no-cache-dir --no-deps -e . ./client \
    && /opt/venv/bin/python -m compileall -q /opt/glmv-serve \
    && chmod 0755 /opt/glmv-serve/docker/entrypoint.sh

# ---- runtime ----------------------------------------------------------------------------------------------

# DL3006 misreads a build-stage name chosen by VARIANT: base-gpu or base-cpu above.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG GLMV_UID=10001
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="glmv-serve" \
      org.opencontainers.image.description="GLM-4.6V-Flash on NVIDIA Triton Inference Server with an OpenAI-compatible gateway" \
      org.opencontainers.image.version="0.1.0"

RUN groupadd --system --gid "${GLMV_UID}" glmv \
    && useradd --system --no-log-init --uid "${GLMV_UID}" --gid glmv --create-home --home-dir /home/glmv \
        --shell /usr/sbin/nologin glmv \
    && mkdir -p /models/checkpoint /models/engine \
    && chown glmv:glmv /models/checkpoint /models/engine

# jemalloc, which glmv-serve preloads into tritonserver when installed (build_engine/allocator.py): under
# glibc's malloc each of Triton's ~300 frontend threads may keep, in an arena of its own, the pages of the
# largest request bodies it once held, so the server's memory climbs in steps; jemalloc gives them back.
# NVIDIA's Triton image ships it already; python:slim does not.
# DL3008 (pin versions): the base image's tag fixes the distribution release, whose security updates of
# the library are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=app /opt/venv /opt/venv
COPY --from=app /opt/glmv-serve /opt/glmv-serve

# Prepare, at build time, what glmv-serve would otherwise prepare on first start under GLMV_CACHE_DIR (CPU
# variant: the bundled server's backend directory and the numpy<2 stub env), so the container needs neither
# network nor a writable cache. In the GPU variant `tritonserver` is on PATH and nothing is prepared.
ENV GLMV_CACHE_DIR=/opt/glmv-cache
RUN mkdir -p "${GLMV_CACHE_DIR}" \
    && /opt/venv/bin/python -c "from build_engine import launcher as l; i = l.find_triton(); \
print(i); i.source == 'pytriton' and l._numpy_major() >= 2 and print(l.prepare_stub_env())" \
    && chmod -R a+rX "${GLMV_CACHE_DIR}"

# The venv's bin goes first on PATH: the Python backend stub finds the venv's site-packages through the
# `python3` first on PATH (the launcher puts this interpreter's bin there for Triton as well). tritonserver
# stays on PATH in the GPU variant (/opt/tritonserver/bin).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    GLMV_VARIANT=${VARIANT} \
    GLMV_CHECKPOINT_DIR=/models/checkpoint \
    GLMV_ENGINE_ROOT=/models/engine \
    GLMV_HTTP_PORT=8000 \
    GLMV_GRPC_PORT=8001 \
    GLMV_METRICS_PORT=8002 \
    GLMV_GATEWAY_PORT=8080 \
    HOME=/home/glmv

# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER ${GLMV_UID}:${GLMV_UID}
WORKDIR /home/glmv
VOLUME ["/models/checkpoint", "/models/engine"]
# Triton HTTP, Triton gRPC, Triton + engine Prometheus metrics, gateway (OpenAI API, web page, /metrics).
EXPOSE 8000 8001 8002 8080

# Healthy = Triton has every model ready and the gateway answers. The start period covers a first-start
# engine build plus model load of the full model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python3", "/opt/glmv-serve/docker/healthcheck.py", "triton-ready", "gateway-live"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/glmv-serve/docker/entrypoint.sh"]
CMD ["serve"]
