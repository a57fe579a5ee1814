"""The HTTP call policy, the twin of interceptors.CallPolicy: every HTTP call passes through it.

In order: a request id (the caller's `x-request-id`, or a new one; echoed in the response and attached
to log lines), the bearer token (auth.check_authorization, the same check as gRPC; a raw token is
accepted too since LlamaIndex's TEI client sends one), refusal while draining (503), the body size
limit (413 from Content-Length before reading, or as soon as a streamed body passes it), then the
call, timed, counted by surface, route and status, logged as one JSON "call finished" line, inside a
server span. /health and the OpenAPI pages pass without a token, like gRPC health.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from opentelemetry import trace
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerank_server.auth import check_authorization
from rerank_server.http_api.errors import Kind, shape_for
from rerank_server.observability import Metrics, request_id
from rerank_server.tracing import tracer

log = logging.getLogger(__name__)

# Paths open without a token and during a drain: probes and the API description.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Routes named in metrics as themselves; any other path is counted as "other" (bounded label values).
ROUTES = frozenset({"/v1/rerank", "/v2/rerank", "/rerank", "/info", "/health", "/v1/ranking", "/v1/models"})


# FastAPI parses a JSON body into Python objects whole, before any route sees it: 60 MiB of `"",` would be
# 20 million strings, gigabytes. So the body is scanned first, in C (re), for what becomes an object (strings,
# numbers, arrays, objects), stopping at a bound no valid request reaches: a refusal costs about the body's size.
_JSON_OBJECTS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]|-?[0-9][0-9.eE+-]*')
# Per accepted document: its string, or an object's fields (Cohere v1 documents may be objects).
JSON_OBJECTS_PER_DOCUMENT = 16


def too_many_json_objects(body: bytes, limit: int) -> bool:
    """Whether the JSON body would make more than `limit` Python objects (O(limit) whatever its size)."""
    return any(count > limit for count, _ in enumerate(_JSON_OBJECTS.finditer(body), start=1))


class TooManyValuesError(HTTPException):
    def __init__(self, limit: int, max_documents: int) -> None:
        super().__init__(
            413,
            f"the request body holds more than {limit} JSON values; a request may hold at most {max_documents} "
            "documents (max_documents)",
        )


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a streamed body passes the limit; FastAPI lets HTTPException through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body passes the limit of {limit} bytes (max_message_bytes)")


class Gate:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, token: str | None, max_body_bytes: int, max_documents: int
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.max_documents = max_documents
        self.max_json_objects = JSON_OBJECTS_PER_DOCUMENT * max_documents + 64
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight; False if the timeout passed first."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        shape = shape_for(path)
        route = path if path in ROUTES else "other"
        headers = _headers(scope)
        rid = (headers.get(b"x-request-id", [b""])[0].decode("latin-1") or uuid.uuid4().hex)[:128]
        request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        started = time.perf_counter()
        refusal = self._refusal(path, headers)
        if refusal is not None:
            kind, message = refusal
            await shape.response(kind, message)(scope, receive, send_with_id)
            self._finished(shape.surface, route, status, started)
            return

        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight_calls.inc()
        try:
            with tracer.start_as_current_span(f"{scope['method']} {route}", kind=trace.SpanKind.SERVER):
                await self.app(scope, self._limited(receive), send_with_id)
        except asyncio.CancelledError:
            # The server stopped with the call still running (past --shutdown-grace-s): say so, and that a
            # retry may succeed elsewhere, instead of the 500 uvicorn writes for a cancelled call.
            if not started_response:
                stopped = shape.response(Kind.UNAVAILABLE, "the server stopped before the call finished; retry")
                await stopped(scope, receive, send_with_id)
            raise
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
            self.metrics.inflight_calls.dec()
            self._finished(shape.surface, route, status, started)

    def _refusal(self, path: str, headers: dict[bytes, list[bytes]]) -> tuple[Kind, str] | None:
        """Why a call is refused before it runs (no token, draining, body too large), or None."""
        if path in OPEN_PATHS:
            return None
        if self.token is not None and not check_authorization(
            headers.get(b"authorization", []), self.token, allow_raw=True
        ):
            self.metrics.rejected.labels(reason="unauthenticated").inc()
            return Kind.UNAUTHENTICATED, "missing or invalid token (authorization: Bearer <token>)"
        if self.draining:
            self.metrics.rejected.labels(reason="draining").inc()
            return Kind.UNAVAILABLE, "the server is shutting down; retry elsewhere"
        length = headers.get(b"content-length")
        if length and length[0].isdigit() and int(length[0]) > self.max_body_bytes:
            self.metrics.rejected.labels(reason="body_too_large").inc()
            return (
                Kind.TOO_LARGE,
                f"the request body is {int(length[0])} bytes; the limit is {self.max_body_bytes} (max_message_bytes)",
            )
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that counts body bytes and stops at the limit (chunked bodies have no Content-Length),
        then checks the whole body's JSON object count before handing it on in one message."""
        seen = 0
        chunks: list[bytes] = []
        delivered = False

        async def limited() -> Message:
            nonlocal seen, delivered
            if delivered:  # after the body: disconnects
                return await receive()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > self.max_body_bytes:
                    self.metrics.rejected.labels(reason="body_too_large").inc()
                    raise BodyTooLargeError(self.max_body_bytes)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            delivered = True
            body = b"".join(chunks)
            chunks.clear()
            if too_many_json_objects(body, self.max_json_objects):
                self.metrics.rejected.labels(reason="too_many_values").inc()
                raise TooManyValuesError(self.max_json_objects, self.max_documents)
            return {"type": "http.request", "body": body, "more_body": False}

        return limited

    def _finished(self, surface: str, route: str, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.calls.labels(surface=surface, rpc=route, code=str(status)).inc()
        self.metrics.latency.labels(surface=surface, rpc=route).observe(elapsed)
        log.info(
            "call finished",
            extra={"surface": surface, "rpc": route, "code": status, "duration_ms": round(elapsed * 1000, 2)},
        )


def _headers(scope: Scope) -> dict[bytes, list[bytes]]:
    headers: dict[bytes, list[bytes]] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


def request_id_of(scope: dict[str, Any]) -> str:
    return str(scope.get("state", {}).get("request_id", "-"))
