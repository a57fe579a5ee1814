"""The Prometheus metrics port (--metrics-port): served by the HTTP frontend's hardened uvicorn server, so a
client holding a connection open is closed as on the HTTP port, and it answers as prometheus_client's own
server did (any path, gzip, OpenMetrics, name[] filters). Fast tier: a Metrics() served on the test's loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from rerank_server.observability import Metrics
from rerank_server.settings import Settings
from rerank_server.testing import free_port

TIMEOUT_S = 0.5
QUICK = Settings(http_idle_timeout_s=TIMEOUT_S, http_header_timeout_s=TIMEOUT_S, http_body_timeout_s=TIMEOUT_S)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, int]]:
    metrics = Metrics()
    port = free_port()
    server = metrics.serve(port, "127.0.0.1", QUICK)
    try:
        yield metrics, port
    finally:
        await server.stop()


async def until_closed(port: int, send: bytes, within_s: float) -> tuple[bytes, float]:
    """What the server answers to `send` until it closes the connection, and when (b"?" if not within_s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(send)
        try:
            received = await asyncio.wait_for(reader.read(), within_s)
        except TimeoutError:
            received = b"?"
        return received, time.monotonic() - started
    finally:
        writer.close()


async def test_an_idle_connection_on_the_metrics_port_is_closed(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    # Never a byte: closed after the idle timeout, as on the HTTP port.
    received, took = await until_closed(port, b"", 10)
    assert received == b"" and TIMEOUT_S * 0.8 < took < TIMEOUT_S + 3, (received, took)
    # Headers that never end (slowloris): 408, closed, counted.
    received, took = await until_closed(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n", 10)
    assert received.startswith(b"HTTP/1.1 408") and took < TIMEOUT_S + 3, received
    # Idle after an answer: closed too.
    received, _ = await until_closed(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n", 10)
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"\n"), received[-100:]
    assert metrics.rejected.labels(reason="header_timeout")._value.get() == 1


async def test_stalled_headers_on_the_metrics_port_time_out_with_the_default_settings() -> None:
    """The server app.run starts (Metrics().serve(port, host)): prometheus_client's held this for ever."""
    metrics = Metrics()
    port = free_port()
    server = metrics.serve(port, "127.0.0.1")
    try:
        header_timeout = Settings().http_header_timeout_s
        received, took = await until_closed(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n", header_timeout + 5)
        assert received.startswith(b"HTTP/1.1 408") and took < header_timeout + 3, received
    finally:
        await server.stop()


async def test_the_metrics_port_answers_as_prometheus_client_did(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    metrics.calls.labels(surface="grpc", rpc="Rerank", code="OK", model="reranker").inc()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for path in ("/metrics", "/", "/metrics/"):
            answer = await client.get(path, headers={"accept-encoding": "identity"})
            assert answer.status_code == 200, path
            assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert 'rerank_calls_total{code="OK",model="reranker",rpc="Rerank",surface="grpc"} 1.0' in answer.text
            assert "process_open_fds" in answer.text and "content-encoding" not in answer.headers
        # gzip, as Prometheus asks for it.
        answer = await client.get("/metrics", headers={"accept-encoding": "gzip"})
        assert answer.headers["content-encoding"] == "gzip" and "rerank_rejected_total" in answer.text
        # OpenMetrics when asked for, and name[] filters.
        answer = await client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert answer.headers["content-type"].startswith("application/openmetrics-text") and "# EOF" in answer.text
        answer = await client.get("/metrics", params={"name[]": "rerank_inflight_calls"})
        assert answer.text.startswith("# HELP rerank_inflight_calls") and "rerank_calls_total" not in answer.text
        # No token needed; other methods refused as before.
        assert (await client.post("/metrics", content=b"x")).status_code == 405
        assert (await client.options("/metrics")).headers["allow"] == "OPTIONS,GET"
        assert (await client.get("/favicon.ico")).content == b""
