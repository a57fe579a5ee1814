"""Health follows Triton: NOT_SERVING (and UNAVAILABLE calls) while it is gone, SERVING once it is back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from rerank_client import RerankClient, UnavailableError
from rerank_client.pb import SERVICE_NAME
from rerank_server.testing import health_status, wait_for_health
from rerank_server.triton_launcher import LocalTriton, TritonPorts
from tests.conftest import free_port, one_model_repository, start_serve, stop_serve

pytestmark = pytest.mark.e2e


def wait_for_api_health(target: str, serving: bool, timeout_s: float = 60) -> None:
    assert wait_for_health(target, timeout_s, serving=serving, service=SERVICE_NAME), (
        f"the API's health never became {'SERVING' if serving else 'not SERVING'}"
    )


def start_triton(repository: Path, ports: TritonPorts) -> LocalTriton:
    triton = LocalTriton(repository, ports)
    triton.start()
    return triton


def test_health_tracks_triton_and_calls_recover_without_restarting_the_frontend(
    model_repository: Path, tmp_path: Path
) -> None:
    repository = one_model_repository(model_repository, tmp_path / "repository")  # Triton starts twice
    ports = TritonPorts(free_port(), free_port(), free_port())
    triton = start_triton(repository, ports)
    frontend = None
    try:
        frontend = start_serve([f"--triton-url=localhost:{ports.grpc}", f"--model-repository={repository}"])
        with RerankClient(frontend.target, timeout=30) as client:
            wait_for_api_health(frontend.target, serving=True)
            assert len(client.rerank("query", ["a", "b"]).results) == 2

            triton.stop()
            wait_for_api_health(frontend.target, serving=False)
            liveness = health_status(frontend.target, "liveness")
            assert liveness == health_pb2.HealthCheckResponse.SERVING, "liveness followed Triton"
            started = time.monotonic()
            with pytest.raises(UnavailableError):
                client.rerank("query", ["a", "b"])
            assert time.monotonic() - started < 10, "a call with Triton down did not fail fast"

            triton = start_triton(repository, ports)
            wait_for_api_health(frontend.target, serving=True, timeout_s=120)
            assert len(client.rerank("query", ["a", "b"]).results) == 2
    finally:
        if frontend is not None:
            assert stop_serve(frontend) == 0
        triton.stop()
