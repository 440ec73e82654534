# emserve's HTTP service on a CUDA GPU: `bentoml serve emserve.serving.service:EMServe` over the exported models in models/.
#
#   docker build -t emserve .
#   docker run --gpus all -p 3000:3000 emserve                       # or -e EMSERVE_API_KEY=... , -v ./models:/app/models
#
# Two stages: the first builds a virtualenv with pip (emserve with the gpu, serve, triton and distributed extras:
# the image also runs `emserve segment|generate --scheduler` in pipelines); the second is
# the CUDA runtime with Python, that virtualenv and the models: no compilers, no pip cache, no torch, no training/.
# ONNX Runtime GPU 1.18+ wheels on PyPI are built for CUDA 12 and cuDNN 9.

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only the runtime package: without training/ in the build context, setuptools installs emserve alone.
COPY pyproject.toml README.md ./
COPY emserve/ emserve/
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade "pip>=24" \
    && /opt/venv/bin/pip install ".[gpu,serve,triton,distributed]" \
    && /opt/venv/bin/pip check

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BENTOML_HOME=/home/emserve/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    EMSERVE_MODELS=/app/models
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin emserve
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root models/ models/
USER 10001
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
CMD ["bentoml", "serve", "emserve.serving.service:EMServe", "--host", "0.0.0.0", "--port", "3000"]
