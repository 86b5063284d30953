# syntax=docker/dockerfile:1
#
# medinfer container image: GPU inference service (FastAPI + uvicorn + ONNX Runtime CUDA).
#
#   docker build -t medinfer:local .
#   docker run --rm --gpus all --read-only -p 127.0.0.1:8000:8000 \
#       -e MEDINFER_AUDIT_HMAC_KEY=... -e MEDINFER_PSEUDONYM_KEY=... medinfer:local
#
# Every stage starts from the same CUDA base (stage `base`), so the virtual environment built in
# `builder` points at exactly the /usr/bin/python3 (Ubuntu 24.04's Python 3.12) that `runtime` has.
#
# CUDA 13: onnxruntime-gpu 1.27.0 is the first PyPI release whose CUDA provider links
# libcudart.so.13 / libcublas.so.13 (1.20 to 1.26 link CUDA 12 and would silently fall back to the
# CPU on this base). The `cudnn` flavour of the CUDA 13 images ships cuDNN 9 (libcudnn.so.9),
# which ONNX Runtime loads at run time. The runtime stage checks both at build time.

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS base

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
FROM base AS builder

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
COPY migrations/ migrations/

# `.[postgres]` adds psycopg for the production database. The explicit onnxruntime-gpu floor keeps
# the resolver off the CUDA 12 builds whatever pyproject.toml allows.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install ".[postgres]" "onnxruntime-gpu>=1.27"

# Plain `onnxruntime` (CPU) and onnxruntime-gpu install into the same `onnxruntime` package and
# overwrite each other; refuse an image where anything pulled the CPU build in.
RUN /opt/venv/bin/python -c "import importlib.metadata as md, onnxruntime as ort; names = {(d.metadata['Name'] or '').lower() for d in md.distributions()}; assert 'onnxruntime' not in names, 'plain onnxruntime is installed'; assert 'onnxruntime-gpu' in names, 'onnxruntime-gpu is missing'; assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()"

# The wheel ships the `migrations` package with alembic.ini; `medinfer migrate` finds it by import.
RUN /opt/venv/bin/python -c "import importlib.resources as r; assert r.files('migrations').joinpath('alembic.ini').is_file()"

# ---------------------------------------------------------------------------------------------
FROM base AS runtime

ARG MEDINFER_VERSION=0.1.0
ARG MEDINFER_REVISION=unknown

LABEL org.opencontainers.image.title="medinfer" \
      org.opencontainers.image.description="Hospital AI inference service: encrypted DICOM and FHIR in, audited diagnosis probabilities out." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${MEDINFER_VERSION}" \
      org.opencontainers.image.revision="${MEDINFER_REVISION}" \
      org.opencontainers.image.base.name="nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"

# A fixed numeric identity (not Ubuntu's uid 1000 `ubuntu` user), so `runAsNonRoot`-style checks
# and volume ownership work without a passwd lookup.
RUN groupadd --system --gid 10001 medinfer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin medinfer

COPY --from=builder /opt/venv /opt/venv
COPY models/ /opt/medinfer/models/

# Writable state lives only in /var/lib/medinfer (SQLite in dev, keys, dev credentials),
# /var/lib/medinfer-audit (signed audit checkpoints, its own volume) and /tmp;
# the rest of the file system can be mounted read-only. The build fails here if the CUDA provider
# of ONNX Runtime would not find its CUDA 13 libraries, or cuDNN 9 is absent, on this base.
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/medinfer /var/lib/medinfer-audit \
    && chmod -R a+rX,go-w /opt/medinfer \
    && so="$(echo /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so)" \
    && test -f "$so" \
    && missing="$(ldd "$so" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)" \
    && if [ -n "$missing" ]; then echo "CUDA provider has unresolved libraries: $missing" >&2; exit 1; fi \
    && ldconfig -p | grep -q 'libcudnn\.so\.9'

# Production, as shipped: the two reference models under /opt/medinfer/models are demonstration
# models (not_for_clinical_use = true), so with nothing acknowledged they are not served (/readyz
# names them `model-not-acknowledged`), no routing rule sends a PACS's studies to any model, and
# nothing a demonstration model produced reaches a PACS. A site enables a model by setting
# MEDINFER_IMAGING_ROUTES (and, only for a knowingly non-clinical deployment,
# MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS; such results are still never sent to a PACS).
ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MEDINFER_ENV=production \
    MEDINFER_ACKNOWLEDGED_NONCLINICAL_MODELS=[] \
    MEDINFER_HOST=0.0.0.0 \
    MEDINFER_PORT=8000 \
    MEDINFER_DATA_DIR=/var/lib/medinfer \
    MEDINFER_MODEL_REPOSITORY=/opt/medinfer/models

WORKDIR /opt/medinfer
VOLUME ["/var/lib/medinfer", "/tmp"]

USER 10001:10001

# 8000: HTTP API, /livez, /readyz, /metrics. 11112: DICOM (C-STORE SCP).
EXPOSE 8000 11112

# Liveness only (no database, no models): /readyz is for load balancers and orchestrators.
# Python's urllib, so the image needs no curl or wget.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('MEDINFER_PORT', '8000'); sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + port + '/livez', timeout=4).status == 200 else 1)"]

CMD ["medinfer", "serve"]
