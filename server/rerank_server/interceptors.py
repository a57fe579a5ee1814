"""Rules every RerankService call passes through, before and after the service itself.

In order: a request id (the caller's `x-request-id`, or a new one, echoed in the initial metadata
and attached to log lines), bearer-token authentication, refusal while draining, then the call,
timed and counted by RPC and status, inside a server span. Health and reflection calls pass
untouched, so probes keep working without tokens and during a drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace

from rerank_server.observability import Metrics, request_id
from rerank_server.tracing import tracer

log = logging.getLogger(__name__)

RERANK_SERVICE_PREFIX = "/rerank.v1.RerankService/"


class CallPolicy(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, bearer_token: str | None) -> None:
        self.metrics = metrics
        self._expected_authorization = None if bearer_token is None else f"Bearer {bearer_token}".encode()
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
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(RERANK_SERVICE_PREFIX):
            return handler
        rpc = method.removeprefix(RERANK_SERVICE_PREFIX)
        metadata = {m.key: m.value for m in details.invocation_metadata or ()}
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
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._end(rpc, code, started)

    async def _begin(self, rpc: str, metadata: dict[str, Any], context: grpc.aio.ServicerContext) -> float:
        """Admit the call or abort it; returns its start time."""
        rid = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:128]
        request_id.set(rid)
        await context.send_initial_metadata((("x-request-id", rid),))
        if self._expected_authorization is not None:
            presented = str(metadata.get("authorization", "")).encode()
            if not hmac.compare_digest(presented, self._expected_authorization):
                self.metrics.calls.labels(rpc=rpc, code=grpc.StatusCode.UNAUTHENTICATED.name).inc()
                self.metrics.rejected.labels(reason="unauthenticated").inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if self.draining:
            self.metrics.calls.labels(rpc=rpc, code=grpc.StatusCode.UNAVAILABLE.name).inc()
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
        self.metrics.calls.labels(rpc=rpc, code=code.name).inc()
        self.metrics.latency.labels(rpc=rpc).observe(elapsed)
        log.info("call finished", extra={"rpc": rpc, "code": code.name, "duration_ms": round(elapsed * 1000, 2)})
