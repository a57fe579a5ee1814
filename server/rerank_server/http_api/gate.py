"""The HTTP call policy, the twin of interceptors.CallPolicy (their shared mechanics are calls.Calls):
every HTTP call passes through it.

In order: a request id (the caller's `x-request-id`, or a new one; echoed in the response and attached
to log lines), the bearer token (auth.check_authorization, the same check as gRPC; a raw token is
accepted too since LlamaIndex's TEI client sends one), refusal while draining (503), the body size
limit (413 from Content-Length before reading, or as soon as a streamed body passes it), then the
call, timed, counted by surface, route and status, logged as one JSON "call finished" line, inside a
server span. The routes declared open (registry.OPEN_PATHS: health) pass without a token and during a
drain, like gRPC health; the API description pages need the token, like gRPC reflection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from opentelemetry import trace
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerank_server import calls
from rerank_server.auth import check_authorization
from rerank_server.calls import Calls
from rerank_server.http_api.errors import Kind
from rerank_server.http_api.json_scan import Excess, excess, not_utf8
from rerank_server.http_api.registry import OBJECT_LISTS, OPEN_PATHS, ROUTES, shape_for
from rerank_server.tracing import tracer

# Per accepted document: its string, or an object's fields (Cohere v1 documents may be objects).
JSON_OBJECTS_PER_DOCUMENT = 16
# Items other than strings of the body's top-level lists, in all, per accepted document (object documents, NIM's
# passages). Past max_documents a list is refused by its route (400 naming the field); this bounds the per-item
# errors that refusal writes first (see json_scan).
LIST_ITEMS_PER_DOCUMENT = 2
# The methods a span is named after; any other token (up to the header limit, from anyone) names it "HTTP", as
# OpenTelemetry's HTTP conventions do, so that span names stay a small fixed set.
STANDARD_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def span_name(method: str, route: str) -> str:
    """The server span's name: `POST /v2/rerank`, or `HTTP /v2/rerank` for a method not in STANDARD_METHODS."""
    return f"{method if method in STANDARD_METHODS else 'HTTP'} {route}"


class TooManyValuesError(HTTPException):
    def __init__(self, limit: int, max_documents: int) -> None:
        super().__init__(
            413,
            f"the request body holds more than {limit} JSON values; a request may hold at most {max_documents} "
            "documents (max_documents)",
        )


class TooManyItemsError(HTTPException):
    def __init__(self, limit: int, max_documents: int) -> None:
        super().__init__(
            413,
            f"the request body's lists hold more than {limit} items in all (strings aside, but in passages); a "
            f"request may hold at most {max_documents} documents (max_documents)",
        )


class NotUtf8Error(HTTPException):
    def __init__(self, encoding: str) -> None:
        super().__init__(400, f"the body is not valid JSON (not UTF-8: it reads as {encoding.upper()}); send UTF-8")


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a streamed body passes the limit; FastAPI lets HTTPException through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body passes the limit of {limit} bytes (max_message_bytes)")


class BodyTimeoutError(HTTPException):
    """Raised from `receive` when the body has not arrived whole within --http-body-timeout-s."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g}s (http_body_timeout_s)")


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        calls: Calls,
        token: str | None,
        max_body_bytes: int,
        max_documents: int,
        body_timeout_s: float,
        other_paths: Iterable[str] = (),
    ) -> None:
        """`other_paths`: paths beside the declared routes named in metrics as themselves (the API
        description pages)."""
        self.app = app
        self.calls = calls
        self.metrics = calls.metrics
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.max_documents = max_documents
        self.max_json_objects = JSON_OBJECTS_PER_DOCUMENT * max_documents + 64
        self.max_list_items = LIST_ITEMS_PER_DOCUMENT * max_documents + 64
        self.body_timeout_s = body_timeout_s
        # Paths named in metrics as themselves; any other is counted as "other" (bounded label values).
        self.labels = frozenset(route.path for route in ROUTES) | frozenset(other_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        shape = shape_for(path)
        route = path if path in self.labels else calls.OTHER
        headers = _headers(scope)
        rid = calls.start_request(headers.get(b"x-request-id", [b""])[0])
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
                if self.calls.draining:  # the client's next call opens a new connection: to another replica
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        started = time.perf_counter()
        refusal = self._refusal(path, headers)
        if refusal is not None:
            kind, message = refusal
            await shape.response(kind, message)(scope, receive, send_with_id)
            self.calls.finished(shape.surface, route, status, time.perf_counter() - started)
            return

        try:
            with (
                self.calls.running(),
                tracer.start_as_current_span(span_name(scope["method"], route), kind=trace.SpanKind.SERVER),
            ):
                await self.app(scope, self._limited(receive), send_with_id)
        except asyncio.CancelledError:
            # The server stopped with the call still running (past --shutdown-grace-s): say so, and that a
            # retry may succeed elsewhere, instead of the 500 uvicorn writes for a cancelled call.
            # The call ends here, answered: re-raised, the cancellation would reach uvicorn, which logs it as
            # an error of the application.
            if not started_response:
                stopped = shape.response(Kind.UNAVAILABLE, "the server stopped before the call finished; retry")
                await stopped(scope, receive, send_with_id)
        finally:
            self.calls.finished(shape.surface, route, status, time.perf_counter() - started)

    def _refusal(self, path: str, headers: dict[bytes, list[bytes]]) -> tuple[Kind, str] | None:
        """Why a call is refused before it runs (no token, draining, body too large), or None."""
        if path in OPEN_PATHS:
            return None
        if self.token is not None and not check_authorization(
            headers.get(b"authorization", []), self.token, allow_raw=True
        ):
            self.calls.unauthenticated()
            return Kind.UNAUTHENTICATED, calls.UNAUTHENTICATED
        if self.calls.refuse_if_draining():
            return Kind.UNAVAILABLE, calls.DRAINING
        length = headers.get(b"content-length")
        if length and length[0].isdigit() and int(length[0]) > self.max_body_bytes:
            self.metrics.rejected.labels(reason="body_too_large").inc()
            return (
                Kind.TOO_LARGE,
                f"the request body is {int(length[0])} bytes; the limit is {self.max_body_bytes} (max_message_bytes)",
            )
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that counts body bytes and stops at the limit (chunked bodies have no Content-Length)
        or past --http-body-timeout-s, then checks the whole body's encoding (UTF-8) and JSON value and list item
        counts before handing it on in one message."""
        seen = 0
        chunks: list[bytes] = []
        delivered = False
        deadline = time.monotonic() + self.body_timeout_s

        async def limited() -> Message:
            nonlocal seen, delivered
            if delivered:  # after the body: disconnects
                return await receive()
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    self.metrics.rejected.labels(reason="body_timeout").inc()
                    raise BodyTimeoutError(self.body_timeout_s) from None
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
            encoding = not_utf8(body)
            if encoding is not None:
                raise NotUtf8Error(encoding)
            found = await excess(body, self.max_json_objects, self.max_list_items, OBJECT_LISTS)
            if found is not None:
                self.metrics.rejected.labels(reason="too_many_values").inc()
                if found is Excess.ITEMS:
                    raise TooManyItemsError(self.max_list_items, self.max_documents)
                raise TooManyValuesError(self.max_json_objects, self.max_documents)
            return {"type": "http.request", "body": body, "more_body": False}

        return limited


def _headers(scope: Scope) -> dict[bytes, list[bytes]]:
    headers: dict[bytes, list[bytes]] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers
