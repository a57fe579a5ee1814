"""Rules every RerankService call passes through, before and after the service itself.

In order: a request id (the caller's `x-request-id`, or a new one, echoed in the initial metadata
and attached to log lines), bearer-token authentication, refusal while draining, then the call,
timed and counted by RPC and status, inside a server span. Health calls pass untouched, so probes
keep working without tokens and during a drain; reflection needs the token like the API (it is
the API's schema, and tools such as grpcurl send the header), but is neither counted nor drained.

Authentication happens before the request is read: a call without the right token gets a handler
that never reads (so never decodes) its message, however large, and answers UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace

from rerank_server.auth import check_authorization
from rerank_server.observability import Metrics, request_id
from rerank_server.tracing import tracer

log = logging.getLogger(__name__)

RERANK_SERVICE_PREFIX = "/rerank.v1.RerankService/"
HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


class CallPolicy(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, bearer_token: str | None) -> None:
        self.metrics = metrics
        self._token = bearer_token
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method.startswith(HEALTH_SERVICE_PREFIX):
            return await continuation(details)
        pairs = list(details.invocation_metadata or ())
        metadata = {m.key: m.value for m in pairs}
        rerank = method.startswith(RERANK_SERVICE_PREFIX)
        if self._token is not None and not check_authorization(
            [m.value for m in pairs if m.key == "authorization"], self._token
        ):
            return self._unauthenticated(method.removeprefix(RERANK_SERVICE_PREFIX) if rerank else None, metadata)
        handler = await continuation(details)
        if handler is None or not rerank:
            return handler
        rpc = method.removeprefix(RERANK_SERVICE_PREFIX)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, metadata, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(rpc, metadata, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unauthenticated(self, rpc: str | None, metadata: dict[str, Any]) -> grpc.RpcMethodHandler:
        """A handler that answers UNAUTHENTICATED without reading the request.

        It is request-streaming whatever the method (the wire is the same), so gRPC hands it an
        iterator it never advances instead of a decoded message: the message is never turned into
        Python objects, and a 60 MiB one costs nothing beyond gRPC's own receive window.
        """

        async def refuse(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            rid = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:128]
            request_id.set(rid)
            await context.send_initial_metadata((("x-request-id", rid),))
            if rpc is not None:
                self.metrics.calls.labels(surface="grpc", rpc=rpc, code=grpc.StatusCode.UNAUTHENTICATED.name).inc()
            self.metrics.rejected.labels(reason="unauthenticated").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            yield  # unreachable: abort raises; makes this an async generator

        return grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=_discard)

    def _unary(self, rpc: str, metadata: dict[str, Any], behavior: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observed(rpc, metadata, context):
                return await behavior(request, context)

        return unary

    def _streaming(self, rpc: str, metadata: dict[str, Any], behavior: Any) -> Any:
        async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._observed(rpc, metadata, context):
                async for response in behavior(requests, context):
                    yield response

        return streaming

    @contextlib.asynccontextmanager
    async def _observed(
        self, rpc: str, metadata: dict[str, Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Admit the call (or abort it), then time, count and log it inside a server span."""
        started = await self._begin(rpc, metadata, context)
        code = grpc.StatusCode.UNKNOWN
        try:
            with tracer.start_as_current_span(f"rerank.v1.RerankService/{rpc}", kind=trace.SpanKind.SERVER):
                yield
            code = grpc.StatusCode.OK
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the caller cancels and when its deadline passes.
            code = _ended_early(context)
            raise
        except grpc.aio.AbortError:
            # An abort on a call its caller already ended leaves no code set.
            code = context.code() or _ended_early(context)
            raise
        except Exception:
            # Anything else raised once the caller has gone (its deadline passed, or it cancelled) ended a call
            # the caller already saw end: count what it saw. Otherwise the handler failed: UNKNOWN.
            if _caller_gone(context):
                code = _ended_early(context)
            raise
        finally:
            self._end(rpc, code, started)

    async def _begin(self, rpc: str, metadata: dict[str, Any], context: grpc.aio.ServicerContext) -> float:
        """Admit the call (authenticated already) or abort it; returns its start time."""
        rid = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:128]
        request_id.set(rid)
        await context.send_initial_metadata((("x-request-id", rid),))
        if self.draining:
            self.metrics.calls.labels(surface="grpc", rpc=rpc, code=grpc.StatusCode.UNAVAILABLE.name).inc()
            self.metrics.rejected.labels(reason="draining").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight_calls.inc()
        return time.perf_counter()

    def _end(self, rpc: str, code: grpc.StatusCode, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
        self.metrics.inflight_calls.dec()
        self.metrics.calls.labels(surface="grpc", rpc=rpc, code=code.name).inc()
        self.metrics.latency.labels(surface="grpc", rpc=rpc).observe(elapsed)
        log.info("call finished", extra={"rpc": rpc, "code": code.name, "duration_ms": round(elapsed * 1000, 2)})


def _discard(data: bytes) -> None:
    """The deserializer of refused calls: never called in practice (the request is never read)."""
    return None


# The deadline travels as a relative timeout, so the caller's side expires (and cancels the call) a moment
# before the server's clock says so: a call ended this close to its deadline ended by its deadline.
DEADLINE_SLACK_S = 0.1


def _caller_gone(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return (remaining is not None and remaining <= DEADLINE_SLACK_S) or context.cancelled()


def _ended_early(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED or CANCELLED, for a call that ended before its handler did."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
