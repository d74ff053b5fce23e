# syntax=docker/dockerfile:1.7
#
# Two images from one file:
#   docker build --target api    -t ftune-api .     # HTTP API, no torch (~200 MB)
#   docker build --target worker -t ftune-worker .  # GPU worker, CUDA torch (several GB)
#
# Versions are build args so a bump is one flag, e.g.
#   docker build --target worker --build-arg TORCH_VERSION=2.13.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Only the built ftune wheel enters the final images (see .dockerignore): no tests, no venv.

ARG PYTHON_VERSION=3.11
# CUDA base for the worker. The torch CUDA wheels bring cuBLAS, cuDNN and NCCL as pip
# packages, so the small "base" flavour (CUDA runtime + the NVIDIA container env) is
# enough; set CUDA_FLAVOR=runtime or cudnn-runtime if an extension needs the system libs.
ARG CUDA_VERSION=12.8.1
ARG CUDA_FLAVOR=base
ARG UBUNTU_VERSION=22.04
ARG UV_VERSION=0.13.8

# uv installs a relocatable CPython (python-build-standalone) on the Ubuntu CUDA base,
# which ships no Python 3.11 of its own.
FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------
# wheel: build the ftune wheel once; both images install it and nothing else
# from the source tree.
FROM python:${PYTHON_VERSION}-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY gpu_worker ./gpu_worker
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# api: the HTTP API. Never needs torch, so it stays on the slim Python image.
FROM python:${PYTHON_VERSION}-slim AS api
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
# worker-build: Python, CUDA torch and the worker extra in /opt, built apart so
# uv and its caches stay out of the final worker image.
FROM nvidia/cuda:${CUDA_VERSION}-${CUDA_FLAVOR}-ubuntu${UBUNTU_VERSION} AS worker-build
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
# torch first, from the PyTorch CUDA index; the worker extra then finds it satisfied.
RUN uv pip install --python /opt/venv/bin/python \
    --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    set -- /wheels/ftune-*.whl \
    && uv pip install --python /opt/venv/bin/python "ftune[worker] @ file://$1"

# ---------------------------------------------------------------------------
# worker: the GPU worker (`ftune worker`), one job at a time per GPU.
FROM nvidia/cuda:${CUDA_VERSION}-${CUDA_FLAVOR}-ubuntu${UBUNTU_VERSION} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:${PATH} \
    HF_HOME=/var/cache/ftune/huggingface \
    FTUNE_WORKER_METRICS_PORT=9100
COPY --from=worker-build /opt/python /opt/python
COPY --from=worker-build /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/ftune ftune \
    && install -d -o 10001 -g 10001 /var/lib/ftune /var/cache/ftune
WORKDIR /var/lib/ftune
USER 10001:10001
EXPOSE 9100
ENTRYPOINT ["ftune"]
CMD ["worker"]
