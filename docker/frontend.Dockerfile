# syntax=docker/dockerfile:1
#
# The tokenizing gRPC frontend (`rerank serve`) alone: it reaches a Triton that runs in its own container.
#
#   docker build -f docker/frontend.Dockerfile -t rerank-frontend:0.1.0 .      (from the repository root)
#   docker run -p 50051:50051 -e RERANK_TRITON_URL=triton:8001 -e RERANK_MODEL_REPOSITORY=/models \
#       -v "$PWD/artifacts/model_repository_gpu:/models:ro" rerank-frontend:0.1.0
#
# It installs the base dependencies only (pyproject's `dependencies`, pinned by requirements/constraints.txt):
# no torch, onnxruntime or transformers, none of the `triton`, `export` and `dev` extras. Every setting is a
# RERANK_* environment variable (`rerank serve --help`); the frontend needs RERANK_TRITON_URL and the tokenizer,
# found through RERANK_MODEL_REPOSITORY (<repo>/<model>/1/tokenizer) or RERANK_TOKENIZER (a folder with
# tokenizer.json). tests/test_deploy.py checks this file.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# The third-party dependencies first, read from the two pyproject.toml files alone, in a layer that a change of
# code reuses; rerank-client is the package beside the server's, installed with it below.
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml ./
COPY client/pyproject.toml client/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(r for p in ('pyproject.toml', 'client/pyproject.toml') for r in tomllib.load(open(p, 'rb'))['project']['dependencies'] if not r.startswith('rerank-client')))" > /tmp/dependencies.txt \
    && /opt/venv/bin/pip install -c requirements/constraints.txt -r /tmp/dependencies.txt
COPY client client
COPY README.md ./
COPY server server
RUN /opt/venv/bin/pip install -c requirements/constraints.txt ./client . \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 rerank \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rerank
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# gRPC, and the HTTP/JSON APIs (Cohere, Jina, TEI, NIM; RERANK_HTTP_PORT, 0 turns them off).
EXPOSE 50051 8080
# For `docker run` and compose; Kubernetes uses its native gRPC probes (deploy/k8s/base/deployment.yaml).
# SERVING only while Triton's model is ready. The start period covers RERANK_STARTUP_TIMEOUT_S (600 s).
# Plaintext: with TLS on (RERANK_TLS_CERT_FILE), it asks the health-only port RERANK_HEALTH_PORT, as the probes do.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:' + (os.environ.get('RERANK_HEALTH_PORT') or os.environ.get('RERANK_PORT', '50051'))); r = g.HealthStub(c).Check(h.HealthCheckRequest(service='rerank.v1.RerankService'), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
# Exec form: `rerank` is PID 1 and gets SIGTERM, then drains for RERANK_SHUTDOWN_GRACE_S.
ENTRYPOINT ["rerank", "serve"]
