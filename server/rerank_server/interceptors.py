"""Rules every RerankService call passes through, before and after the service itself.

In order: a request id (the caller's `x-request-id`, or a new one, echoed in the response's metadata:
a stream's initial metadata, a unary call's initial metadata with its answer or its trailing metadata
when it fails, and attached to log lines), bearer-token authentication, refusal while draining, then the call,
timed and counted by RPC and status, inside a server span. Health calls pass untouched, so probes
keep working without tokens and during a drain; reflection needs the token like the API (it is
the API's schema, and tools such as grpcurl send the header), but is neither counted nor drained.

Authentication happens before the request is read: a call without the right token gets a handler
that never reads (so never decodes) its message, however large, and answers UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry import trace

from rerank_client.pb import METHOD_PREFIX, SERVICE, SERVICE_NAME
from rerank_server import calls
from rerank_server.auth import check_authorization
from rerank_server.calls import Calls
from rerank_server.tracing import tracer

HEALTH_SERVICE_PREFIX = "/" + health_pb2.DESCRIPTOR.services_by_name["Health"].full_name + "/"
# The RPCs named in metrics; any other method name a caller sends is counted as "other".
RPCS = frozenset(method.name for method in SERVICE.methods)


def rpc_label(method: str) -> str:
    """The metrics label of a RerankService method path: its RPC name if the service has it, else "other"."""
    name = method.removeprefix(METHOD_PREFIX)
    return name if name in RPCS else calls.OTHER


class CallPolicy(grpc.aio.ServerInterceptor):
    def __init__(self, calls: Calls, bearer_token: str | None) -> None:
        self.calls = calls
        self._token = bearer_token

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
        rerank = method.startswith(METHOD_PREFIX)
        if self._token is not None and not check_authorization(
            [m.value for m in pairs if m.key == "authorization"], self._token
        ):
            return self._unauthenticated(rpc_label(method) if rerank else None, metadata)
        handler = await continuation(details)
        if handler is None or not rerank:
            return handler
        rpc = rpc_label(method)
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
            started = time.perf_counter()
            calls.start_request(metadata.get(calls.REQUEST_ID_KEY))
            await context.send_initial_metadata(request_id_metadata())
            self.calls.unauthenticated()
            if rpc is not None:
                self.calls.finished("grpc", rpc, grpc.StatusCode.UNAUTHENTICATED.name, time.perf_counter() - started)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, calls.UNAUTHENTICATED)
            yield  # unreachable: abort raises; makes this an async generator

        return grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=_discard)

    def _unary(self, rpc: str, metadata: dict[str, Any], behavior: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observed(rpc, metadata, context, unary=True):
                response = await behavior(request, context)
            await context.send_initial_metadata(request_id_metadata())
            return response

        return unary

    def _streaming(self, rpc: str, metadata: dict[str, Any], behavior: Any) -> Any:
        """A coroutine writing each response (gRPC's reader-writer form), not an async generator yielding it.

        gRPC cancels a call (its caller cancelled, or its deadline passed) by cancelling the task that sends
        the responses. A generator suspended at a `yield` (its response being sent) would be left there and
        closed later by the garbage collector, in another task: the call counted UNKNOWN (GeneratorExit is
        no Exception) and its span's context detached in a Context it was not attached in, an ERROR with a
        traceback per cancelled stream. Here the cancellation reaches this coroutine, in its own task, and
        the handler's generator is closed there (aclosing)."""

        async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            async with (
                self._observed(rpc, metadata, context),
                contextlib.aclosing(behavior(requests, context)) as responses,
            ):
                async for response in responses:
                    await context.write(response)

        return streaming

    @contextlib.asynccontextmanager
    async def _observed(
        self, rpc: str, metadata: dict[str, Any], context: grpc.aio.ServicerContext, unary: bool = False
    ) -> AsyncIterator[None]:
        """Admit the call (or abort it), then time, count and log it inside a server span.

        A unary call sends no headers before its answer: a failed one ends with its status alone (the request
        id in the trailing metadata), which gRPC clients may retry. Headers sent first commit the call, and
        clients' retry policies (the SDKs' on UNAVAILABLE: a drain, Triton restarting) no longer apply to it."""
        started = time.perf_counter()
        calls.start_request(metadata.get(calls.REQUEST_ID_KEY))
        if unary:
            context.set_trailing_metadata(request_id_metadata())
        else:
            await context.send_initial_metadata(request_id_metadata())
        # Draining: the server sent GOAWAY and takes no new streams; this refuses the few it accepted before.
        if self.calls.refuse_if_draining():
            self.calls.finished("grpc", rpc, grpc.StatusCode.UNAVAILABLE.name, time.perf_counter() - started)
            await context.abort(grpc.StatusCode.UNAVAILABLE, calls.DRAINING)
        code = grpc.StatusCode.UNKNOWN
        try:
            with (
                self.calls.running(),
                tracer.start_as_current_span(f"{SERVICE_NAME}/{rpc}", kind=trace.SpanKind.SERVER),
            ):
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
            self.calls.finished("grpc", rpc, code.name, time.perf_counter() - started)


def request_id_metadata() -> tuple[tuple[str, str], ...]:
    """The call's request id (calls.start_request) as gRPC metadata."""
    return ((calls.REQUEST_ID_KEY, calls.request_id.get()),)


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
