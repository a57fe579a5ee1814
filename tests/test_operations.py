"""Operations, on loopback against real Triton: metrics, logs, auth, TLS, drain, supervision,
backpressure, replicas behind one target, tracing. Each test bounds its own time."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerank_client import (
    AsyncRerankClient,
    AuthenticationError,
    RerankClient,
    RerankError,
    ResourceExhaustedError,
    UnavailableError,
    tls_credentials,
)
from rerank_client.pb import SERVICE_NAME, rerank_pb2, rerank_pb2_grpc
from rerank_server.testing import health_status
from tests.certs import Authority
from tests.conftest import (
    HELD_S,
    Stack,
    free_port,
    frontend,
    one_model_repository,
    start_local,
    start_serve,
    stop_serve,
    stop_serve_later,
)
from tests.reference import eager
from tests.texts import QUERY, text

pytestmark = pytest.mark.e2e


def scrape(url: str | None) -> str:
    assert url is not None
    return urllib.request.urlopen(url, timeout=10).read().decode()


def sample(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in a Prometheus text exposition whose labels include `labels`, as
    `sum(name{labels})` reads (0 when none): a selector that leaves a label out counts every value of it."""
    total = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


# -- metrics, logs, settings -------------------------------------------------------------------


def test_metrics_count_calls_by_rpc_and_status_and_time_each_step(stack: Stack) -> None:
    with RerankClient(stack.target, timeout=60) as client:
        client.rerank(QUERY, [text(20), text(5)])
        client.score([("a", "b")])
        with pytest.raises(RerankError):
            client.rerank("", ["x"])
    metrics = scrape(stack.metrics_url)
    assert sample(metrics, "rerank_calls_total", rpc="Rerank", code="OK") >= 1
    assert sample(metrics, "rerank_calls_total", rpc="Score", code="OK") >= 1
    assert sample(metrics, "rerank_calls_total", rpc="Rerank", code="INVALID_ARGUMENT") >= 1
    assert sample(metrics, "rerank_call_duration_seconds_count", rpc="Rerank") >= 2
    for histogram in (
        "rerank_tokenize_duration_seconds",
        "rerank_triton_duration_seconds",
        "rerank_queue_wait_seconds",
    ):
        assert sample(metrics, f"{histogram}_count") >= 2, histogram
    assert sample(metrics, "rerank_request_pairs_sum") >= 3
    assert sample(metrics, "rerank_triton_request_pairs_count") >= 2
    assert sample(metrics, "rerank_input_tokens_total") > 0
    assert "rerank_inflight_calls" in metrics and "rerank_inflight_tokens" in metrics
    # Triton's own metrics stay available on its port.
    assert "nv_inference_request_success" in scrape(stack.triton_metrics_url)


def test_json_logs_carry_the_callers_request_id_which_is_echoed(stack: Stack) -> None:
    with grpc.insecure_channel(stack.target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        request = rerank_pb2.RerankRequest(query=QUERY, documents=["doc"])
        _, call = stub.Rerank.with_call(request, metadata=(("x-request-id", "rid-4242"),), timeout=30)
        assert ("x-request-id", "rid-4242") in call.initial_metadata()
        _, call = stub.Rerank.with_call(request, timeout=30)
        generated = dict(call.initial_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in stack.output if line.startswith("{")]
        mine = [e for e in entries if e.get("request_id") == "rid-4242" and e.get("message") == "call finished"]
        if mine:
            break
        time.sleep(0.2)
    assert mine and mine[0]["rpc"] == "Rerank" and mine[0]["code"] == "OK" and mine[0]["duration_ms"] > 0
    assert mine[0]["model"] == "reranker"  # the served model the call chose (the default)


# -- auth and TLS ----------------------------------------------------------------------------


def test_bearer_token_auth_accepts_the_right_token_only(stack: Stack, model_repository: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with frontend(
        stack, model_repository, f"--auth-token-file={token_file}", "--auth-token=unused-env-token"
    ) as served:
        with RerankClient(served.target, token="s3cret-token", timeout=30) as good:
            assert len(good.rerank(QUERY, ["a"]).results) == 1
        for token in (None, "wrong", "s3cret-token "):
            with RerankClient(served.target, token=token, timeout=30) as bad, pytest.raises(AuthenticationError) as e:
                bad.rerank(QUERY, ["a"])
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Probes need no token.
        assert health_status(served.target, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        printed = "".join(served.output)
        assert "auth_token = ***" in printed and "unused-env-token" not in printed and "s3cret" not in printed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(folder, "ca"), Authority(folder, "rogue-ca")
    return {
        "ca": ca.issued,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_ca": rogue.issued,
        "rogue_client": rogue.issue("rogue-client", server=False),
    }


def call_ok(target: str, credentials: grpc.ChannelCredentials | None) -> bool:
    try:
        with RerankClient(target, credentials=credentials, timeout=10, retries=0) as client:
            return len(client.rerank(QUERY, ["a"]).results) == 1
    except UnavailableError:
        return False


def test_tls_serves_clients_that_trust_its_ca(stack: Stack, model_repository: Path, pki) -> None:
    args = (
        f"--tls-cert-file={pki['server'].cert}",
        f"--tls-key-file={pki['server'].key}",
        f"--health-port={free_port()}",
    )
    with frontend(stack, model_repository, *args) as served:
        target = f"localhost:{served.target.rsplit(':', 1)[1]}"
        assert call_ok(target, tls_credentials(pki["ca"].cert))
        assert not call_ok(target, None), "a plaintext client was served"
        assert not call_ok(target, tls_credentials(pki["rogue_ca"].cert)), "a client trusting another CA connected"
        health_port = args[2].split("=")[1]
        assert health_status(f"127.0.0.1:{health_port}", SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING


def test_mtls_serves_only_clients_with_a_certificate_from_its_ca(stack: Stack, model_repository: Path, pki) -> None:
    args = (
        f"--tls-cert-file={pki['server'].cert}",
        f"--tls-key-file={pki['server'].key}",
        f"--tls-client-ca-file={pki['ca'].cert}",
    )
    ca = pki["ca"].cert
    # No plaintext health port here: readiness is asked over mTLS, with a client certificate.
    client_tls = tls_credentials(ca, pki["client"].cert, pki["client"].key)
    with frontend(stack, model_repository, *args, credentials=client_tls) as served:
        target = f"localhost:{served.target.rsplit(':', 1)[1]}"
        assert call_ok(target, client_tls)
        assert not call_ok(target, tls_credentials(ca)), "a client without a certificate was served"
        assert not call_ok(target, tls_credentials(ca, pki["rogue_client"].cert, pki["rogue_client"].key))


# -- drain -----------------------------------------------------------------------------------


class Proxy:
    """A TCP proxy that sends each new connection to its current `target`, as a Kubernetes Service does:
    a connection stays on the replica it was opened to, and once a draining replica leaves the endpoints,
    only new connections reach the others."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                client, _ = self._listener.accept()
                host, port = self.target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                self._sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop listening and cut every connection (shutdown wakes the threads blocked on them)."""
        for sock in (self._listener, *self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_sigterm_under_load_lets_in_flight_calls_finish_and_exits_0(stack: Stack, model_repository: Path) -> None:
    health_port = free_port()
    args = ("--model-name=reranker_held", "--shutdown-grace-s=300", f"--health-port={health_port}")
    with frontend(stack, model_repository, *args) as served:
        documents = [text(9000, seed=7)]  # an 8192-token pair, held HELD_S in Triton's queue
        outcomes: list[object] = []

        def call() -> None:
            with RerankClient(served.target, timeout=120, retries=0) as client:
                try:
                    outcomes.append(client.rerank(QUERY, documents))
                except RerankError as error:
                    outcomes.append(error)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for thread in threads:
            thread.start()
        # A health watch (a stream, no call) on the API port must not hold the stop for the whole grace.
        watching = grpc.insecure_channel(served.target)
        watch = health_pb2_grpc.HealthStub(watching).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert wait_until(lambda: sample(scrape(served.metrics_url), "rerank_inflight_calls") == 3, 60)
        served.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert health_status(f"127.0.0.1:{health_port}", SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        # The port no longer takes connections: a new client goes elsewhere (its retries would).
        with RerankClient(served.target, timeout=10, retries=0) as late, pytest.raises(UnavailableError):
            late.rerank(QUERY, ["too late"])
        for thread in threads:
            thread.join(300)
        assert all(isinstance(o, rerank_pb2.RerankResponse) for o in outcomes), outcomes
        assert len(outcomes) == 3
        assert served.process.wait(60) == 0  # not the 300 s grace: the watch was ended
        watching.close()


def test_the_sdk_retries_unavailable_whatever_the_request_size(stack: Stack, model_repository: Path) -> None:
    """With Triton out of reach the frontend answers UNAVAILABLE with its status alone (no headers first), so
    the SDK's retry policy applies: each call is tried 1 + retries times, a request over gRPC's default 256 KiB
    retry buffer too, and the error still carries the request id."""
    triton = Proxy(stack.triton_url)
    served = start_serve(
        [f"--triton-url={triton.address}", f"--model-repository={model_repository}", "--model-name=reranker"]
    )
    try:
        triton.close()
        with RerankClient(served.target, timeout=30, retries=3) as client:
            for documents, request_id in (["small"], "retried-small"), (["x " * 200_000], "retried-large"):
                with pytest.raises(UnavailableError) as refused:
                    client.rerank(QUERY, documents, request_id=request_id)
                assert refused.value.request_id == request_id

        # Counted as each refusal's handler ends, which may be just after the caller has its answer.
        def refused_calls() -> float:
            return sample(scrape(served.metrics_url), "rerank_calls_total", rpc="Rerank", code="UNAVAILABLE")

        assert wait_until(lambda: refused_calls() == 2 * 4, 10), refused_calls()
    finally:
        assert stop_serve(served) == 0, "".join(served.output[-30:])


def test_a_draining_replica_moves_its_clients_connections_to_the_others_at_once(
    stack: Stack, model_repository: Path
) -> None:
    """On SIGTERM the frontend sends gRPC's GOAWAY and closes HTTP keep-alive connections, so a client whose
    connection a Service pinned to the draining replica reconnects to another at once, while the draining
    replica's own call finishes: no call fails for the drain, and none needed a retry."""
    health_port = free_port()
    draining = start_serve(
        [
            f"--triton-url={stack.triton_url}",
            f"--model-repository={model_repository}",
            "--model-name=reranker_held",
            "--shutdown-grace-s=60",
            f"--health-port={health_port}",
        ]
    )
    with frontend(stack, model_repository, "--model-name=reranker") as other:
        assert draining.http_url is not None and other.http_url is not None
        grpc_proxy, http_proxy = Proxy(draining.target), Proxy(draining.http_url.removeprefix("http://"))
        outcomes: list[object] = []
        try:
            with RerankClient(grpc_proxy.address, timeout=60, retries=0) as client:
                held = threading.Thread(target=lambda: outcomes.append(client.rerank(QUERY, ["held"])))
                held.start()  # HELD_S in Triton's queue, on the draining replica
                connection = http.client.HTTPConnection(http_proxy.address, timeout=30)
                connection.request("GET", "/v1/models")
                assert connection.getresponse().read()  # kept alive, to the draining replica
                assert wait_until(lambda: sample(scrape(draining.metrics_url), "rerank_inflight_calls") == 1, 60)
                # The replica leaves the Service's endpoints, then gets SIGTERM.
                grpc_proxy.target, http_proxy.target = other.target, other.http_url.removeprefix("http://")
                draining.process.send_signal(signal.SIGTERM)
                not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
                assert wait_until(lambda: health_status(f"127.0.0.1:{health_port}", SERVICE_NAME) == not_serving, 5)
                for _ in range(5):  # the same client and channel, no retries: the other replica answers
                    assert len(client.rerank(QUERY, ["a", "b"]).results) == 2
                assert held.is_alive(), "the draining replica's call ended before the others were made"
                connection.request("GET", "/v1/models")  # the kept-alive connection: told to close
                refused = connection.getresponse()
                refused.read()
                assert refused.status == 503 and refused.getheader("connection") == "close"
                connection.close()
                connection.request("GET", "/v1/models")  # a new connection: the other replica
                assert connection.getresponse().status == 200
                held.join(60)
            assert len(outcomes) == 1 and isinstance(outcomes[0], rerank_pb2.RerankResponse), outcomes
            assert sample(scrape(other.metrics_url), "rerank_calls_total", rpc="Rerank", code="OK") == 5
            assert draining.process.wait(60) == 0
        finally:
            grpc_proxy.close()
            http_proxy.close()
            if draining.process.poll() is None:
                stop_serve(draining)


# -- Triton supervision ----------------------------------------------------------------------


def test_kill_9_triton_under_load_every_call_ends_in_time_and_service_recovers(
    model_repository: Path, tmp_path: Path
) -> None:
    served = start_local(one_model_repository(model_repository, tmp_path / "repository"), "--health-interval-s=0.2")
    try:
        triton = next(p for p in psutil.Process(served.process.pid).children() if p.name() == "tritonserver")
        outcomes: list[tuple[str, float]] = []
        stop = threading.Event()

        def load() -> None:
            with RerankClient(served.target, timeout=5, retries=0) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        client.rerank(QUERY, [text(30), text(60)])
                        outcomes.append(("OK", time.monotonic() - started))
                    except RerankError as error:
                        outcomes.append((error.code.name, time.monotonic() - started))
                        time.sleep(0.05)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(2)
        triton.kill()
        recovered = wait_until(
            lambda: health_status(served.target, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING, 120, after=2
        )
        time.sleep(2)
        stop.set()
        for worker in workers:
            worker.join(30)
        assert recovered, "Triton was not restarted:\n" + "".join(x for x in served.output if "call finished" not in x)
        codes = {code for code, _ in outcomes}
        assert codes <= {"OK", "UNAVAILABLE"}, codes
        assert "UNAVAILABLE" in codes, "no call saw Triton down"
        assert max(elapsed for _, elapsed in outcomes) < 5 + 1, "a call outlived its deadline"
        assert outcomes[-1][0] == "OK"
        assert served.process.poll() is None, "the frontend died with Triton"
        # What the restart alert (deploy/k8s/components/monitoring) reads.
        metrics = scrape(served.metrics_url)
        assert sample(metrics, "rerank_triton_restarts_total") == 1
        assert sample(metrics, "rerank_model_unready_total") == 1
    finally:
        stop_serve_later(served)


def wait_until(condition, timeout_s: float, after: float = 0) -> bool:
    time.sleep(after)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.3)
    return False


# -- backpressure ----------------------------------------------------------------------------


async def test_overload_at_four_times_capacity_sheds_the_excess(stack: Stack, model_repository: Path) -> None:
    documents = [text(9000, seed=50)]  # 8192 tokens: one call fills the capacity, HELD_S in Triton's queue
    args = ("--model-name=reranker_held", "--max-inflight-tokens=10000", "--max-total-tokens=10000")
    with frontend(stack, model_repository, *args) as served:
        process = psutil.Process(served.process.pid)
        rss_before = process.memory_info().rss
        outcomes: list[tuple[str, float]] = []

        async def one(client: AsyncRerankClient) -> None:
            started = time.monotonic()
            try:
                await client.rerank(QUERY, documents)
                outcomes.append(("OK", time.monotonic() - started))
            except ResourceExhaustedError as error:
                assert "max_inflight_tokens is 10000" in error.details
                outcomes.append(("RESOURCE_EXHAUSTED", time.monotonic() - started))

        async with AsyncRerankClient(served.target, timeout=120, retries=0) as client:
            for _ in range(3):  # waves of 4 concurrent calls where 1 fits
                await asyncio.gather(*(one(client) for _ in range(4)))
        rss_after = process.memory_info().rss
        ok = [t for code, t in outcomes if code == "OK"]
        shed = [t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]
        assert len(ok) >= 3 and len(shed) >= 6, outcomes
        assert max(shed) < min(ok), "refusals were not immediate"
        assert rss_after - rss_before < 200 * 2**20, "memory grew under overload"
        metrics = scrape(served.metrics_url)
        assert sample(metrics, "rerank_rejected_total", reason="capacity") == len(shed)
        assert served.process.poll() is None


# -- replicas behind one target --------------------------------------------------------------


def test_two_replicas_behind_one_target_share_traffic_and_survive_one_loss(
    stack: Stack, model_repository: Path
) -> None:
    port = free_port()
    replicas = [
        start_serve(
            [
                f"--triton-url={stack.triton_url}",
                f"--model-repository={model_repository}",
                f"--host={host}",
                f"--port={port}",
            ]
        )
        for host in ("127.0.0.1", "127.0.0.2")
    ]
    try:
        with RerankClient(f"ipv4:127.0.0.1:{port},127.0.0.2:{port}", timeout=30) as client:
            for _ in range(20):
                client.rerank(QUERY, ["a", "b"])
            served = [sample(scrape(r.metrics_url), "rerank_calls_total", rpc="Rerank", code="OK") for r in replicas]
            assert all(n >= 3 for n in served), f"traffic was not shared: {served}"
            replicas[0].process.kill()
            replicas[0].process.wait(10)
            for _ in range(20):
                assert len(client.rerank(QUERY, ["a", "b"]).results) == 2
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                stop_serve(replica)


# -- tracing ---------------------------------------------------------------------------------


def test_tracing_links_the_call_its_tokenization_and_its_triton_requests(stack: Stack, model_repository: Path) -> None:
    with frontend(stack, model_repository, "--otel-exporter=console") as served:
        with RerankClient(served.target, timeout=30) as client:
            client.rerank(QUERY, ["a", "b"])
        time.sleep(1)
    spans = [json.loads(line) for line in served.output if line.startswith('{"name"')]
    by_name = {span["name"]: span for span in spans}
    root = by_name["rerank.v1.RerankService/Rerank"]
    for child in ("tokenize", "triton.infer"):
        assert by_name[child]["context"]["trace_id"] == root["context"]["trace_id"]
        assert by_name[child]["parent_id"] == root["context"]["span_id"]


# -- fuzzing ---------------------------------------------------------------------------------


def test_ten_thousand_bad_or_random_requests_never_get_internal(stack: Stack, checkpoints) -> None:
    from tests.fuzz import fuzz_rerank_service

    codes = fuzz_rerank_service(stack.target, examples=10_000)
    assert sum(codes.values()) >= 10_000
    assert not {"INTERNAL", "UNKNOWN"} & set(codes), codes
    assert stack.process.poll() is None
    with RerankClient(stack.target, timeout=60) as client:
        documents = [text(30, seed=1), text(7, seed=2)]
        response = client.rerank(QUERY, documents)
    got = np.array([{r.index: r.logit for r in response.results}[i] for i in range(2)])
    np.testing.assert_allclose(got, eager(checkpoints["reranker"]).logits(QUERY, documents), atol=1e-4)


def test_undecodable_bytes_are_invalid_argument(stack: Stack) -> None:
    with grpc.insecure_channel(stack.target) as channel:
        raw = channel.unary_unary("/rerank.v1.RerankService/Rerank")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\x0a\x02\xff\xfe", timeout=10)  # field 1 (query) holding invalid UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request message" in caught.value.details()


def test_a_call_outliving_its_connections_max_age_still_completes(stack: Stack, model_repository: Path) -> None:
    args = ("--model-name=reranker_held", "--max-connection-age-s=1", "--shutdown-grace-s=1")
    with frontend(stack, model_repository, *args) as served, RerankClient(served.target, timeout=300, retries=0) as c:
        started = time.monotonic()
        response = c.rerank(QUERY, [text(30, seed=70), text(30, seed=71)])  # held HELD_S in Triton's queue
        assert time.monotonic() - started > HELD_S - 0.5, "the call was too short to cross the connection's age"
        assert len(response.results) == 2
