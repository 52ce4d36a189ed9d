# syntax=docker/dockerfile:1
#
# kiln images. Two targets:
#
#   docker build --target gpu -t kiln:0.1.0-gpu .   # TensorRT, on NVIDIA's TensorRT container
#   docker build --target cpu -t kiln:0.1.0-cpu .   # ONNX Runtime, on a slim Python base
#
# GPU base pairing (see docs/OPERATIONS.md, "Images"): tensorrt:26.08-py3 is
# Ubuntu 24.04 / Python 3.12 with TensorRT 11.2 on CUDA 13.4, which needs an
# NVIDIA driver of the R580 branch or newer on the node. TensorRT is already in
# the base image, so the gpu target installs kiln (".") plus the two other GPU
# extras, cuda-python (13.x, matching the image's CUDA 13) and nvidia-ml-py,
# instead of ".[gpu]": that would let pip fetch a second TensorRT from the
# package index whenever the image's copy does not satisfy the pin.
# The build fails if the image's TensorRT is not importable by kiln's venv.
#
# Pin bases by digest for releases, e.g.
#   --build-arg TRT_TAG=26.08-py3@sha256:<digest>
#   --build-arg PYTHON_TAG=3.12-slim-trixie@sha256:<digest>
# Engines are keyed by the TensorRT version and GPU: a new TRT_TAG means
# every engine is rebuilt once on first load.

ARG TRT_TAG=26.08-py3
ARG PYTHON_TAG=3.12-slim-trixie
ARG CUDA_PYTHON_VERSION=13.4.4
ARG NVIDIA_ML_PY_VERSION=13.615.71
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# ---------------------------------------------------------------- cpu build
FROM python:${PYTHON_TAG} AS cpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engines/ engines/
COPY service/ service/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/kiln --help >/dev/null

# ---------------------------------------------------------------- gpu build
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG} AS gpu-build
ARG CUDA_PYTHON_VERSION
ARG NVIDIA_ML_PY_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engines/ engines/
COPY service/ service/
# --system-site-packages: the venv sees the TensorRT Python bindings that the
# base image installs system-wide. --without-pip: the image's pip installs into
# the venv through --python, so ensurepip is not needed.
RUN python3 -m venv --system-site-packages --without-pip /opt/venv \
 && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir \
      . "cuda-python==${CUDA_PYTHON_VERSION}" "nvidia-ml-py==${NVIDIA_ML_PY_VERSION}" \
 && /opt/venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorrt') is None and 'tensorrt is not visible to kiln')" \
 && /opt/venv/bin/kiln --help >/dev/null
# The baseline engine runs on ONNX Runtime's CUDA provider: onnxruntime-gpu (a
# CUDA 13 build, like the image) replaces the CPU onnxruntime that `pip install .`
# brought. Both install the same `onnxruntime` module, so the CPU one goes first.
ARG ONNXRUNTIME_GPU_VERSION
RUN python3 -m pip --python /opt/venv/bin/python uninstall --yes onnxruntime \
 && python3 -m pip --python /opt/venv/bin/python install --no-cache-dir \
      "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
 && /opt/venv/bin/python -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers() and 'onnxruntime-gpu has no CUDA provider')"

# ---------------------------------------------------------------- cpu image
FROM python:${PYTHON_TAG} AS cpu
LABEL org.opencontainers.image.title="kiln" \
      org.opencontainers.image.description="kiln inference server (ONNX Runtime, CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid kiln --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kiln \
 && mkdir -p /var/lib/kiln/store \
 && chown -R 10001:10001 /var/lib/kiln
COPY --from=cpu-build /opt/venv /opt/venv
# The server binds 0.0.0.0 here because it runs in its own network namespace;
# outside a container kiln defaults to 127.0.0.1. It refuses a non-loopback
# bind without API keys unless KILN_ALLOW_UNAUTHENTICATED=true.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    KILN_HOST=0.0.0.0 KILN_PORT=8000 KILN_GRPC_PORT=8001 KILN_STORE=/var/lib/kiln/store \
    KILN_BACKEND=onnxruntime KILN_LOG_JSON=true
VOLUME ["/var/lib/kiln/store"]
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=1200s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('KILN_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health/live', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["kiln"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--store", "/var/lib/kiln/store"]

# ---------------------------------------------------------------- gpu image
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG} AS gpu
LABEL org.opencontainers.image.title="kiln" \
      org.opencontainers.image.description="kiln inference server (TensorRT, NVIDIA GPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid kiln --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kiln \
 && mkdir -p /var/lib/kiln/store \
 && chown -R 10001:10001 /var/lib/kiln
COPY --from=gpu-build /opt/venv /opt/venv
# HOME=/tmp: TensorRT and CUDA write caches under $HOME; the root filesystem is
# read-only under Kubernetes and /tmp is an emptyDir there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    CUDA_MODULE_LOADING=LAZY \
    KILN_HOST=0.0.0.0 KILN_PORT=8000 KILN_GRPC_PORT=8001 KILN_STORE=/var/lib/kiln/store \
    KILN_BACKEND=tensorrt KILN_LOG_JSON=true
VOLUME ["/var/lib/kiln/store"]
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# The start period covers a first start that builds TensorRT engines.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1200s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('KILN_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health/live', timeout=4).status == 200 else 1)"]
# NVIDIA's entrypoint sets up CUDA forward compatibility on older datacenter
# drivers, then execs kiln.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "kiln"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--store", "/var/lib/kiln/store"]
