# syntax=docker/dockerfile:1
#
# NVIDIA Triton Inference Server 2.51 (container release 24.10) with the exported reranker baked in.
#
# 1. Make the model repository first, on a machine with the `export` extra (`make install` gives it):
#
#      rerank export --device gpu --output artifacts/model_repository_gpu
#
#    (instance_group KIND_GPU, fp16 ONNX graph; `--model /path/to/checkpoint` for a local checkpoint).
# 2. Build from the repository root (.dockerignore lets artifacts/model_repository_gpu/ into the context):
#
#      docker build -f docker/triton.Dockerfile -t rerank-triton:0.1.0 .
#
# For clusters without GPUs (deploy/k8s/overlays/cpu) the CPU variant runs in the same image, because
# onnxruntime-gpu also carries the CPU provider:
#
#      rerank export --device cpu --intra-op-threads 4 --output artifacts/model_repository
#      docker build -f docker/triton.Dockerfile --build-arg MODEL_REPOSITORY=artifacts/model_repository \
#          -t rerank-triton-cpu:0.1.0 .
#
# The model is a Python-backend model (model.py + reranker_engine.py) that runs the ONNX graph with ONNX
# Runtime's CUDA provider; the Python backend's stub embeds the container's python3 (3.10), so onnxruntime-gpu
# and numpy are installed into that interpreter. tests/test_deploy.py checks this file.

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

# 1.20.x: built for CUDA 12.x and cuDNN 9.x like the 24.10 container (CUDA 12.6), with Python 3.10 wheels.
ARG ONNXRUNTIME_GPU_VERSION=1.20.2
ARG MODEL_REPOSITORY=artifacts/model_repository_gpu

RUN python3 -m pip install --no-cache-dir "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" "numpy<2"
# Fail the build, rather than fall back to the CPU at run time, when the CUDA provider cannot load: every
# library it links (cuDNN 9, cuBLAS 12, ...) must be in the image. libcuda comes from the host's driver.
RUN provider="$(python3 -c 'import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so"))')" \
    && python3 -c "import onnxruntime; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers()" \
    && missing="$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so' || true)" \
    && if [ -n "$missing" ]; then echo "onnxruntime-gpu's CUDA provider lacks: $missing" >&2; exit 1; fi

RUN groupadd --gid 10001 rerank \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rerank
# Owned by root and readable by all: the server never writes its model repository.
COPY --chmod=0755 ${MODEL_REPOSITORY} /models
RUN ls /models/*/config.pbtxt /models/*/1/model.py /models/*/1/tokenizer/tokenizer.json

ENV HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# 8000 HTTP (health: /v2/health/ready, /v2/health/live), 8001 gRPC (the frontend), 8002 Prometheus metrics.
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# The image's entrypoint (/opt/nvidia/nvidia_entrypoint.sh) execs this, so tritonserver is PID 1 and gets SIGTERM.
# It loads every model at start; /v2/health/ready answers 200 once they are all ready (strict readiness).
CMD ["tritonserver", "--model-repository=/models", "--exit-timeout-secs=30"]
