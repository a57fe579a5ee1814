# syntax=docker/dockerfile:1
#
# NVIDIA Triton Inference Server 2.51 (container release 24.10, the PyTorch-enabled Python-backend image)
# with the exported reranker baked in.
#
# 1. Make the model repository first, on a machine with the `export` extra (`make install` gives it):
#
#      rerank export --device gpu --output artifacts/model_repository_gpu
#
#    (instance_group KIND_GPU, the packed runtime: the fp32 checkpoint, run in fp16 by
#    rerank_triton_model/modernbert_packed.py: no padding, FlashAttention-2 varlen with the local window;
#    `--model /path/to/checkpoint` for a local checkpoint).
# 2. Build from the repository root (.dockerignore lets artifacts/model_repository_gpu/ into the context):
#
#      docker build -f docker/triton.Dockerfile -t rerank-triton:0.1.0 .
#
# For clusters without GPUs (deploy/k8s/overlays/cpu) the CPU variant runs in the same image (ONNX Runtime's
# CPU build, or the packed runtime on the CPU):
#
#      rerank export --device cpu --intra-op-threads 4 --output artifacts/model_repository
#      docker build -f docker/triton.Dockerfile --build-arg MODEL_REPOSITORY=artifacts/model_repository \
#          -t rerank-triton-cpu:0.1.0 .
#
# The model is a Python-backend model (model.py + reranker_engine.py + torch_runner.py + modernbert_packed.py);
# the backend's stub embeds the container's python3 (3.10), whose PyTorch (CUDA build, shipped by NVIDIA in
# this image) runs the packed engine; transformers (the checkpoint's loader) and onnxruntime (the CPU
# variant) are installed into that interpreter. Model inputs and outputs go through DLPack, so the image's
# numpy version does not matter. tests/test_deploy.py checks this file.

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-pyt-python-py3
FROM ${TRITON_IMAGE}

# The exporter's transformers (export.json records it), so the saved config reads back as written.
ARG TRANSFORMERS_VERSION=5.24.0
ARG ONNXRUNTIME_VERSION=1.20.1
ARG MODEL_REPOSITORY=artifacts/model_repository_gpu

RUN python3 -m pip install --no-cache-dir "transformers==${TRANSFORMERS_VERSION}" "onnxruntime==${ONNXRUNTIME_VERSION}"
# Fail the build, rather than at model load, when the image's PyTorch is not a CUDA build or cannot load
# ModernBERT. libcuda comes from the host's driver at run time.
RUN python3 -c "import torch, transformers; assert torch.version.cuda, torch.__version__; from transformers import ModernBertForSequenceClassification"

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
