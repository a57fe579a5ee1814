"""Registers RerankService with lenient request decoding.

gRPC turns a request that fails to decode (random bytes, invalid UTF-8 in a string field) into
INTERNAL before the service sees it. Here decoding failures become a MalformedMessage the handler
answers with INVALID_ARGUMENT, so INTERNAL stays reserved for real server faults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory

from rerank_client._proto.rerank.v1 import rerank_pb2

SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["RerankService"]


@dataclass(frozen=True)
class MalformedMessage:
    reason: str


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (protobuf_message.DecodeError, ValueError) as error:
            return MalformedMessage(str(error) or "undecodable message")

    return decode


async def _refuse(context: grpc.aio.ServicerContext, malformed: MalformedMessage) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {malformed.reason}")


def _unary(behavior: Any) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedMessage):
            await _refuse(context, request)
        return await behavior(request, context)

    return unary


def _streaming(behavior: Any) -> Any:
    async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, MalformedMessage):
                    await _refuse(context, request)
                yield request

        async for response in behavior(checked(), context):
            yield response

    return streaming


def rerank_service_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """The generic handler of every RerankService method of `servicer`, decoding leniently."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        codec = {
            "request_deserializer": _lenient(request_class),
            "response_serializer": response_class.SerializeToString,
        }
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_streaming(behavior), **codec)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(behavior), **codec)
        else:
            raise NotImplementedError(f"{method.full_name}: half-streaming methods are not wired")
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
