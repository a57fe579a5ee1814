"""RerankClient and AsyncRerankClient: twins over one channel configuration and one set of types.

Both wrap the generated stub, apply a default deadline to every call, and raise the exceptions of
rerank_client.errors instead of grpc.RpcError.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from rerank_client._proto.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from rerank_client.errors import from_rpc_error

DEFAULT_TIMEOUT_S = 30.0
# Rerank requests carry whole documents; gRPC's 4 MiB default is too small for 1,000 long ones.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def build_rerank_request(
    query: str,
    documents: Sequence[str],
    *,
    top_n: int | None = None,
    return_documents: bool = False,
) -> rerank_pb2.RerankRequest:
    """The RerankRequest for these arguments. Validation of the values is the server's job."""
    if isinstance(documents, str):
        # A bare string is a Sequence[str] too; iterating it would rerank its characters.
        raise TypeError("documents must be a sequence of strings, not a single string")
    return rerank_pb2.RerankRequest(
        query=query,
        documents=list(documents),
        top_n=top_n or 0,
        return_documents=return_documents,
    )


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class _ClientConfig:
    """What both twins share: where to connect, how, and the default deadline."""

    def __init__(
        self,
        target: str,
        timeout: float | None,
        credentials: grpc.ChannelCredentials | None,
        max_message_bytes: int,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.credentials = credentials
        self.options = channel_options(max_message_bytes)

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class RerankClient:
    """Blocking client. Use as a context manager, or call close().

    `timeout` is the default deadline in seconds of every call (None: no deadline); a call's own
    `timeout` argument overrides it.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._config = _ClientConfig(target, timeout, credentials, max_message_bytes)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._config.options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=self._config.options)
        self._stub = rerank_pb2_grpc.RerankServiceStub(self._channel)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        timeout: float | None = None,
    ) -> rerank_pb2.RerankResponse:
        """Score `documents` against `query`; results come best first."""
        request = build_rerank_request(query, documents, top_n=top_n, return_documents=return_documents)
        try:
            response: rerank_pb2.RerankResponse = self._stub.Rerank(request, timeout=self._config.deadline(timeout))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return response

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncRerankClient:
    """asyncio client; the twin of RerankClient. Use as an async context manager, or await close()."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._config = _ClientConfig(target, timeout, credentials, max_message_bytes)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._config.options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=self._config.options)
        self._stub = rerank_pb2_grpc.RerankServiceStub(self._channel)

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        timeout: float | None = None,
    ) -> rerank_pb2.RerankResponse:
        """Score `documents` against `query`; results come best first."""
        request = build_rerank_request(query, documents, top_n=top_n, return_documents=return_documents)
        try:
            response: rerank_pb2.RerankResponse = await self._stub.Rerank(
                request, timeout=self._config.deadline(timeout)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return response

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
