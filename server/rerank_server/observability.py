"""What the frontend tells operators: Prometheus metrics, JSON logs with request ids, optional tracing.

Metrics live in their own registry, served on --metrics-port by the HTTP frontend's hardened uvicorn server
(http_api/server.py GuardedServer: idle, header, body and write timeouts, the descriptor-limit guard), without a
token, as prometheus_client's own server answered: GET of any path is the exposition (OpenMetrics when the Accept
header asks for it, gzip when Accept-Encoding allows it, `name[]` query parameters selecting families), OPTIONS
the allowed methods, other methods 405, /favicon.ico empty. Every call gets a request id (the caller's
`x-request-id` metadata, or a new one), returned to the caller in the response's metadata (interceptors.py) and
attached to every log line written while the call runs.
"""

from __future__ import annotations

import contextvars
import gzip
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from rerank_server.settings import Settings

if TYPE_CHECKING:
    from rerank_server.http_api.server import GuardedServer

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class CallModel:
    """The served model a call chose, for its metrics and log line ("" until one is chosen, and for calls that
    choose none: refused, ListModels, a model not served). A holder in a ContextVar, not the name itself: a
    stream's messages run in tasks of their own, whose copies of the context hold the same holder."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = ""


_call_model: contextvars.ContextVar[CallModel | None] = contextvars.ContextVar("call_model", default=None)


def start_call_model() -> None:
    """A new call's holder (calls.start_request sets it with the request id)."""
    _call_model.set(CallModel())


def chose_model(name: str) -> None:
    """The core found the served model `name` for this call: only served names become label values. A call's
    first choice stays (a stream whose messages name several models is counted under its first's)."""
    holder = _call_model.get()
    if holder is not None and not holder.name:
        holder.name = name


def call_model() -> str:
    holder = _call_model.get()
    return holder.name if holder is not None else ""


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Why calls are refused before the model, or HTTP connections closed on a client too slow to send or read
# (header_timeout, body_timeout, write_timeout): the values of rerank_rejected_total's `reason` label.
# Overload (the alert on refusals, deploy/k8s/components/monitoring) is capacity, background_capacity (a call
# above priority 0 past --background-inflight-share) and tokenize_queue.
REJECT_REASONS = (
    "capacity",
    "background_capacity",
    "tokenize_queue",
    "draining",
    "unauthenticated",
    "body_too_large",
    "too_many_values",
    "body_timeout",
    "header_timeout",
    "write_timeout",
    "invalid_http",
    "too_many_chunks",
)


class Metrics:
    """The frontend's Prometheus collectors (Triton keeps its own on its metrics port)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # surface: the API a call came through (grpc, cohere, tei, nim, vllm); code: the gRPC status name, or
        # the HTTP status for HTTP surfaces.
        self.calls = Counter(
            "rerank_calls_total",
            "Finished calls, by surface, RPC (or route), status and the served model the call chose",
            ["surface", "rpc", "code", "model"],
            registry=r,
        )
        self.latency = Histogram(
            "rerank_call_duration_seconds",
            "Call latency, by surface, RPC (or route) and the served model the call chose",
            ["surface", "rpc", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight_calls = Gauge("rerank_inflight_calls", "Calls being handled", registry=r)
        self.inflight_tokens = Gauge(
            "rerank_inflight_tokens", "Tokens admitted to the model and not answered", registry=r
        )
        self.queue_wait = Histogram(
            "rerank_queue_wait_seconds", "Wait for a tokenizer thread", buckets=_FAST_BUCKETS, registry=r
        )
        self.tokenize = Histogram(
            "rerank_tokenize_duration_seconds", "Tokenization time per request", buckets=_FAST_BUCKETS, registry=r
        )
        # By model: the served model's name (only served names: the label's values are bounded).
        self.triton = Histogram(
            "rerank_triton_duration_seconds",
            "Time from the first Triton request of a call to its last answer (queue and compute), by model",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pairs = Histogram(
            "rerank_request_pairs",
            "Model inputs (pairs and windows) per request, by model (its count: requests scored by the model)",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.triton_request_pairs = Histogram(
            "rerank_triton_request_pairs",
            "Pairs per Triton request, by model",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "rerank_input_tokens_total",
            "Tokens sent to the model (cache hits not included), by model",
            ["model"],
            registry=r,
        )
        # The score cache (score_cache.py), by the served model's name.
        self.cache_hits = Counter(
            "rerank_score_cache_hits_total", "Model inputs answered from the score cache", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "rerank_score_cache_misses_total", "Model inputs the score cache did not hold", ["model"], registry=r
        )
        self.cache_evictions = Counter(
            "rerank_score_cache_evictions_total",
            "Entries the score cache forgot to stay under its bound (least recently used first)",
            ["model"],
            registry=r,
        )
        self.cache_entries = Gauge("rerank_score_cache_entries", "Model inputs held by the score cache", registry=r)
        self.cache_bytes = Gauge(
            "rerank_score_cache_bytes", "Memory the score cache holds (at most --score-cache-bytes)", registry=r
        )
        self.rejected = Counter(
            "rerank_rejected_total",
            "Calls refused before reaching the model, and HTTP connections closed on a client too slow, by reason",
            ["reason"],
            registry=r,
        )
        # Exported at 0 from the start, so that rates and alerts on them have series before the first refusal.
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        self.triton_restarts = Counter(
            "rerank_triton_restarts_total", "Restarts of the local Triton by the frontend's supervisor", registry=r
        )
        # With --triton-url (Kubernetes restarts Triton's container) this is how a Triton restart shows.
        self.model_unready = Counter(
            "rerank_model_unready_total",
            "Times the served models went from all ready to not (Triton restarting, crashed or unreachable)",
            registry=r,
        )
        self.accept_errors = Counter(
            "rerank_accept_errors_total",
            "HTTP connections that could not be accepted: the process ran out of file descriptors (or memory)",
            registry=r,
        )
        # The process's CPU, memory and descriptors: process_open_fds against process_max_fds (the soft limit)
        # warns before either frontend runs out (gRPC reports running out only in its log).
        ProcessCollector(registry=r)
        # (model, precision) of each served model, read when scraped: the set follows Triton's (models.py).
        self.served_models: Callable[[], Iterable[tuple[str, str]]] = lambda: ()
        r.register(_ModelInfo(lambda: self.served_models()))

    def serve(self, port: int, host: str = "0.0.0.0", settings: Settings | None = None) -> GuardedServer:
        """Serve /metrics on host:port from the running loop, with the HTTP frontend's connection timeouts
        (`settings`' http_*_timeout_s; the defaults without it). Binds before returning: a taken port raises.
        The server stops with the loop (or with its stop())."""
        from rerank_server.http_api.server import GuardedServer  # it imports this module

        server = GuardedServer(metrics_app(self.registry), settings or Settings(), self, "metrics")
        server.listen(host, port)
        return server


_ALLOW = (b"allow", b"OPTIONS,GET")


def metrics_app(registry: CollectorRegistry) -> Callable[..., Any]:
    """An ASGI app answering as prometheus_client's make_wsgi_app (the server start_http_server ran): GET of any
    path is the registry's exposition. Collected on the loop (about a millisecond), as its make_asgi_app does. Not
    that app itself: it decodes headers as UTF-8 (another byte from anyone raises inside the server), and answers
    every method, where the server it replaces allowed only GET and OPTIONS."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        headers: list[tuple[bytes, bytes]] = []
        body = b""
        status = 200
        if scope["method"] == "OPTIONS":
            headers.append(_ALLOW)
        elif scope["method"] != "GET":
            status = 405
            headers.append(_ALLOW)
            body = f"# HTTP 405 Method Not Allowed: {scope['method']}; use OPTIONS or GET\n".encode()
        elif scope["path"] != "/favicon.ico":
            sent: dict[str, list[str]] = {}
            for name, value in scope["headers"]:
                sent.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
            encoder, content_type = choose_encoder(",".join(sent.get("accept", [])))
            params = parse_qs(scope["query_string"].decode("latin-1"))
            source: Collector = registry.restricted_registry(params["name[]"]) if "name[]" in params else registry
            body = encoder(source)
            headers.append((b"content-type", content_type.encode()))
            if gzip_accepted(",".join(sent.get("accept-encoding", []))):
                body = gzip.compress(body)
                headers.append((b"content-encoding", b"gzip"))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class _ModelInfo(Collector):
    """rerank_model_info{model, precision} 1 for each served model: the precision it computes in, as
    GetModelInfo, TEI /info, NIM /v1/models and the serve banner report it."""

    def __init__(self, served: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self.served = served

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "rerank_model_info",
            "Each served model (1), by name and the precision it computes in",
            labels=["model", "precision"],
        )
        for model, precision in self.served():
            family.add_metric([model, precision], 1)
        yield family


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and any `extra` fields."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "request_id"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
