"""Registers RerankService with lenient, bounded request decoding.

gRPC turns a request that fails to decode (random bytes, invalid UTF-8 in a string field) into
INTERNAL before the service sees it. Here decoding failures become a MalformedMessage the handler
answers with INVALID_ARGUMENT, so INTERNAL stays reserved for real server faults.

Before decoding, the wire format is scanned to count the repeated `documents` / `pairs` entries,
only up to max_documents + 1: a 60 MiB message of 31 million empty documents would otherwise cost
about a gigabyte of Python strings (and seconds of a core) before the limit refuses it. The scan
stops as soon as the limit is passed, and other fields are capped too (a well-formed request holds
a handful), so it costs O(max_documents) whatever the message.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2

from rerank_client.pb import SERVICE, rerank_pb2
from rerank_server.errors import ServiceError, too_many_documents
from rerank_server.service import abort, stream_error

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]

# Field numbers from the generated descriptors, so that the scan follows the contract.
_RERANK_DOCUMENTS = rerank_pb2.RerankRequest.DESCRIPTOR.fields_by_name["documents"].number
_SCORE_PAIRS = rerank_pb2.ScoreRequest.DESCRIPTOR.fields_by_name["pairs"].number
_STREAM_ID = rerank_pb2.RerankStreamRequest.DESCRIPTOR.fields_by_name["id"].number
_STREAM_REQUEST = rerank_pb2.RerankStreamRequest.DESCRIPTOR.fields_by_name["request"].number
# Occurrences of the other fields a request may hold: a well-formed one has a handful (each
# singular field once); the cap keeps a message of millions of repeated scalars from costing a
# Python loop over all of them.
_OTHER_FIELDS_LIMIT = 256
_LENGTH_DELIMITED = 2
_WIRE_SIZES = {1: 8, 5: 4}  # fixed64, fixed32


@dataclass(frozen=True)
class MalformedMessage:
    reason: str


@dataclass(frozen=True)
class RefusedMessage:
    """A message refused before decoding (too many entries: errors.too_many_documents)."""

    error: ServiceError
    stream_id: str = ""  # RerankStream: the message's id, for its StreamError

    def stream_response(self) -> rerank_pb2.RerankStreamResponse:
        return rerank_pb2.RerankStreamResponse(id=self.stream_id, error=stream_error(self.error))


class _MalformedError(Exception):
    pass


class _TooManyError(Exception):
    pass


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            break
    raise _MalformedError("truncated or overlong varint")


class _Scan:
    """Counts one repeated field's entries over a message (and, for streams, its nested request)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries = 0
        self.others = 0

    def fields(self, data: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (number, wire type, payload start, payload end) of each field in data[pos:end]."""
        while pos < end:
            key, pos = _varint(data, pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise _MalformedError("field number 0")
            if wire == 0:
                _, after = _varint(data, pos, end)
            elif wire == _LENGTH_DELIMITED:
                size, pos = _varint(data, pos, end)
                after = pos + size
            elif wire in _WIRE_SIZES:
                after = pos + _WIRE_SIZES[wire]
            else:  # groups (proto2 only) and invalid wire types
                raise _MalformedError(f"unsupported wire type {wire}")
            if after > end:
                raise _MalformedError("a field runs past the end of the message")
            yield number, wire, pos, after
            pos = after

    def count(self, data: memoryview, pos: int, end: int, repeated: int) -> None:
        for number, wire, _, _ in self.fields(data, pos, end):
            if number == repeated and wire == _LENGTH_DELIMITED:
                self.entry()
            else:
                self.other()

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limit:
            raise _TooManyError

    def other(self) -> None:
        self.others += 1
        if self.others > _OTHER_FIELDS_LIMIT:
            raise _MalformedError(f"more than {_OTHER_FIELDS_LIMIT} occurrences of non-repeated fields")


def _too_many(field: str, limit: int, stream_id: str = "") -> RefusedMessage:
    return RefusedMessage(too_many_documents(field, limit), stream_id)


def _bounded(message_class: Any, max_documents: int) -> Callable[[bytes], Any]:
    """A deserializer that refuses oversized requests from their wire format, then decodes leniently."""
    name = message_class.DESCRIPTOR.full_name
    scan: Callable[[memoryview], RefusedMessage | None] | None = None
    if name == rerank_pb2.RerankRequest.DESCRIPTOR.full_name:
        scan = functools.partial(_scan_flat, repeated=_RERANK_DOCUMENTS, field="documents", limit=max_documents)
    elif name == rerank_pb2.ScoreRequest.DESCRIPTOR.full_name:
        scan = functools.partial(_scan_flat, repeated=_SCORE_PAIRS, field="pairs", limit=max_documents)
    elif name == rerank_pb2.RerankStreamRequest.DESCRIPTOR.full_name:
        scan = functools.partial(_scan_stream, limit=max_documents)
    return _lenient(message_class, scan)


def _lenient(
    message_class: Any, scan: Callable[[memoryview], RefusedMessage | None] | None = None
) -> Callable[[bytes], Any]:
    """A deserializer that never raises: a message it cannot decode becomes a MalformedMessage, which the
    method's wrapper refuses with INVALID_ARGUMENT (gRPC answers a deserializer's exception with UNKNOWN and
    logs its traceback, for anyone who can reach the port)."""

    undecodable = (
        f"the bytes are not a {message_class.DESCRIPTOR.full_name} (send protobuf's wire format, strings in UTF-8)"
    )

    def decode(data: bytes) -> Any:
        try:
            if scan is not None and (refused := scan(memoryview(data))) is not None:
                return refused
            return message_class.FromString(data)
        except _MalformedError as error:
            return MalformedMessage(str(error))
        except (protobuf_message.DecodeError, ValueError):
            # protobuf's own words ("Error parsing message with type ...") say neither what is wrong nor what to send.
            return MalformedMessage(undecodable)

    return decode


def _scan_flat(data: memoryview, repeated: int, field: str, limit: int) -> RefusedMessage | None:
    try:
        _Scan(limit).count(data, 0, len(data), repeated)
    except _TooManyError:
        return _too_many(field, limit)
    return None


def _scan_stream(data: memoryview, limit: int) -> RefusedMessage | None:
    """RerankStreamRequest: documents of every `request` occurrence (protobuf merges them) count."""
    scan = _Scan(limit)
    id_span = (0, 0)
    too_many = False
    for number, wire, start, end in scan.fields(data, 0, len(data)):
        scan.other()  # every top-level field, `request` included: each occurrence costs a scan
        if number == _STREAM_ID and wire == _LENGTH_DELIMITED:
            id_span = (start, end)
        elif number == _STREAM_REQUEST and wire == _LENGTH_DELIMITED and not too_many:
            try:
                scan.count(data, start, end, _RERANK_DOCUMENTS)
            except _TooManyError:
                too_many = True  # keep reading the (capped) top level for the id, which may come last
    if not too_many:
        return None
    try:
        stream_id = bytes(data[id_span[0] : id_span[1]]).decode()
    except UnicodeDecodeError:
        raise _MalformedError("the id is not valid UTF-8") from None
    return _too_many("documents", limit, stream_id)


async def _refuse(context: grpc.aio.ServicerContext, refused: MalformedMessage | RefusedMessage) -> None:
    if isinstance(refused, RefusedMessage):
        await abort(context, refused.error)
    else:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {refused.reason}")


def _unary(behavior: Any) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedMessage | RefusedMessage):
            await _refuse(context, request)
        return await behavior(request, context)

    return unary


def _streaming(behavior: Any) -> Any:
    """A malformed message ends the request stream: the messages before it are answered, then the
    call ends INVALID_ARGUMENT. A refused (oversized) message is answered with its StreamError, like
    any other failed message, and the stream goes on."""

    async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        malformed: list[MalformedMessage] = []
        # Refusals wait here until the response loop sends them; one slot keeps the reader in step.
        refusals: asyncio.Queue[rerank_pb2.RerankStreamResponse] = asyncio.Queue(maxsize=1)

        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, MalformedMessage):
                    malformed.append(request)
                    return
                if isinstance(request, RefusedMessage):
                    await refusals.put(request.stream_response())
                    continue
                yield request

        responses = aiter(behavior(checked(), context))
        next_response: asyncio.Future[Any] | None = None
        next_refusal: asyncio.Future[Any] | None = None
        try:
            while True:
                if next_response is None:
                    next_response = asyncio.ensure_future(anext(responses))
                if next_refusal is None:
                    next_refusal = asyncio.ensure_future(refusals.get())
                done, _ = await asyncio.wait((next_response, next_refusal), return_when=asyncio.FIRST_COMPLETED)
                if next_refusal in done:
                    yield next_refusal.result()
                    next_refusal = None
                if next_response in done:
                    try:
                        response = next_response.result()
                    except StopAsyncIteration:
                        break
                    next_response = None
                    yield response
            # The request stream is done: the last refusals are in the queue or in the pending get.
            assert next_refusal is not None
            if next_refusal.done():
                yield next_refusal.result()
            else:
                await _cancel(next_refusal)
            next_refusal = None
            while not refusals.empty():
                yield refusals.get_nowait()
        finally:
            for pending in (next_response, next_refusal):
                if pending is None:
                    continue
                if not pending.done():
                    await _cancel(pending)
                elif not pending.cancelled():
                    # Done while the call ended (its deadline, a cancel): read, so that asyncio does not log
                    # an exception nobody retrieved (the end of the requests) as an ERROR for each such call.
                    pending.exception()
        if malformed:
            await _refuse(context, malformed[0])

    return streaming


async def _cancel(future: asyncio.Future[Any]) -> None:
    """Cancel `future` and wait until it has ended. Not `await future` under suppress(CancelledError): that
    would also swallow a cancellation of this task, gRPC's way of ending a call its caller cancelled, and
    the call would end (and be counted) OK."""
    future.cancel()
    await asyncio.wait((future,))
    if not future.cancelled():
        future.exception()  # retrieved (the end of the requests, say): asyncio logs none as never retrieved


def health_service_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """grpc.health.v1 over `servicer`, as grpc_health's add_HealthServicer_to_server registers it, but
    decoding leniently: health needs no token, so a malformed request must cost neither a traceback nor
    an UNKNOWN."""
    handlers = {}
    for method in HEALTH_SERVICE.methods:
        behavior = getattr(servicer, method.name, None)
        if behavior is None:  # a method this grpc_health release does not implement (List)
            continue
        codec = {
            "request_deserializer": _lenient(message_factory.GetMessageClass(method.input_type)),
            "response_serializer": message_factory.GetMessageClass(method.output_type).SerializeToString,
        }
        # Watch streams through context.write, so both kinds take the unary wrapper.
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(_unary(behavior), **codec)
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE.full_name, handlers)


def rerank_service_handler(servicer: Any, max_documents: int) -> grpc.GenericRpcHandler:
    """The generic handler of every RerankService method of `servicer`, decoding leniently and
    refusing requests of more than `max_documents` documents or pairs before decoding them."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        codec = {
            "request_deserializer": _bounded(request_class, max_documents),
            "response_serializer": response_class.SerializeToString,
        }
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_streaming(behavior), **codec)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(behavior), **codec)
        else:
            raise NotImplementedError(f"{method.full_name}: half-streaming methods are not wired")
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
