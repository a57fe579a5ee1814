"""RerankClient and AsyncRerankClient: twins over one channel configuration and one set of types.

Both wrap the generated stub, build requests with the same functions, apply a default deadline to
every call, and raise the exceptions of rerank_client.errors instead of grpc.RpcError.
"""

from __future__ import annotations

import asyncio
import json
import operator
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias, cast

import grpc
import grpc.aio

from rerank_client.errors import REQUEST_ID_KEY, CancelledError, InvalidRequestError, from_rpc_error
from rerank_client.pb import SERVICE_NAME, rerank_pb2, rerank_pb2_grpc

DEFAULT_TIMEOUT_S = 30.0
# Rerank requests carry whole documents; gRPC's 4 MiB default is too small for 1,000 long ones.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# A Truncation value (e.g. rerank_pb2.TRUNCATION_CHUNK), its name ("end", "start", "none", "chunk") or None.
TruncationArg: TypeAlias = "rerank_pb2.Truncation | str | None"
_TRUNCATION_NAMES = {
    "end": rerank_pb2.TRUNCATION_END,
    "none": rerank_pb2.TRUNCATION_NONE,
    "chunk": rerank_pb2.TRUNCATION_CHUNK,
    "start": rerank_pb2.TRUNCATION_START,
}


def truncation_value(truncation: TruncationArg) -> rerank_pb2.Truncation:
    """The enum value for a Truncation value, a name ("end", "start", "none", "chunk") or None (the default)."""
    if truncation is None:
        return rerank_pb2.TRUNCATION_UNSPECIFIED
    if isinstance(truncation, str):
        try:
            return _TRUNCATION_NAMES[truncation.lower()]
        except KeyError:
            raise ValueError(f"truncation must be one of {sorted(_TRUNCATION_NAMES)}, got {truncation!r}") from None
    return truncation


# A surrogate code point: alone in a str (Python pairs none), and UTF-8 cannot carry it.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The largest uint32, the most RerankRequest.priority and ScoreRequest.priority hold.
_UINT32_MAX = 2**32 - 1


def _refused(field: str, description: str) -> InvalidRequestError:
    """The caller's InvalidRequestError naming `field`, raised before anything is sent."""
    violation = rerank_pb2.FieldViolation(field=field, description=description)
    return InvalidRequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", [violation])


def _check_text(field: str, text: str | None) -> None:
    """Refuse text UTF-8 cannot carry (a lone surrogate, e.g. from a command line's undecodable bytes) as
    the caller's InvalidRequestError naming `field`, before anything is sent; protobuf would raise a
    UnicodeEncodeError that names nothing."""
    if isinstance(text, str) and _SURROGATE.search(text):
        raise _refused(field, "holds a lone surrogate, which UTF-8 cannot carry")


def _priority_value(priority: int | None) -> int:
    """The request's priority field for `priority` (None: 0, the default). The field is a uint32: a
    negative, fractional or larger value is the caller's InvalidRequestError naming `priority`, before
    anything is sent (protobuf would raise a ValueError or TypeError that names nothing)."""
    if priority is None:
        return 0
    try:
        value = None if isinstance(priority, bool) else operator.index(priority)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= _UINT32_MAX:
        raise _refused("priority", f"must be an integer from 0 to {_UINT32_MAX}, got {priority!r}")
    return value


def build_rerank_request(
    query: str,
    documents: Sequence[str],
    *,
    top_n: int | None = None,
    return_documents: bool = False,
    truncation: TruncationArg = None,
    max_length: int | None = None,
    chunk_overlap: int | None = None,
    model: str | None = None,
    priority: int | None = None,
) -> rerank_pb2.RerankRequest:
    """The RerankRequest for these arguments. Validation of the values is the server's job, but for text
    UTF-8 cannot carry and a priority outside the field's range (InvalidRequestError, before sending)."""
    if isinstance(documents, str):
        # A bare string is a Sequence[str] too; iterating it would rerank its characters.
        raise TypeError("documents must be a sequence of strings, not a single string")
    documents = list(documents)
    _check_text("query", query)
    for i, document in enumerate(documents):
        _check_text(f"documents[{i}]", document)
    _check_text("model", model)
    request = rerank_pb2.RerankRequest(
        query=query,
        documents=documents,
        top_n=top_n or 0,
        return_documents=return_documents,
        truncation=truncation_value(truncation),
        max_length=max_length or 0,
        model=model or "",
        priority=_priority_value(priority),
    )
    if chunk_overlap is not None:
        request.chunk_overlap = chunk_overlap
    return request


def build_score_request(
    pairs: Iterable[tuple[str, str]],
    *,
    truncation: TruncationArg = None,
    max_length: int | None = None,
    chunk_overlap: int | None = None,
    model: str | None = None,
    priority: int | None = None,
) -> rerank_pb2.ScoreRequest:
    pairs = list(pairs)
    for i, (text_a, text_b) in enumerate(pairs):
        _check_text(f"pairs[{i}].text_a", text_a)
        _check_text(f"pairs[{i}].text_b", text_b)
    _check_text("model", model)
    request = rerank_pb2.ScoreRequest(
        pairs=[rerank_pb2.TextPair(text_a=a, text_b=b) for a, b in pairs],
        truncation=truncation_value(truncation),
        max_length=max_length or 0,
        model=model or "",
        priority=_priority_value(priority),
    )
    if chunk_overlap is not None:
        request.chunk_overlap = chunk_overlap
    return request


def stream_request(id: str, query: str, documents: Sequence[str], **options: Any) -> rerank_pb2.RerankStreamRequest:
    """One RerankStream message: an id of your choice and the arguments of `rerank`."""
    _check_text("id", id)
    return rerank_pb2.RerankStreamRequest(id=id, request=build_rerank_request(query, documents, **options))


def _model_info_request(model: str | None) -> rerank_pb2.GetModelInfoRequest:
    _check_text("model", model)
    return rerank_pb2.GetModelInfoRequest(model=model or "")


class _Requests:
    """A stream's requests as the call reads them. An exception they raise (stream_request refusing a
    message included) fails the call, which gRPC reports as UNKNOWN (blocking) or as a local cancellation
    (asyncio); it is kept here, for the SDK to raise in the call's place."""

    def __init__(
        self, requests: Iterable[rerank_pb2.RerankStreamRequest] | AsyncIterable[rerank_pb2.RerankStreamRequest]
    ) -> None:
        self._requests = requests
        self.error: Exception | None = None

    def iterate(self) -> Iterator[rerank_pb2.RerankStreamRequest]:
        try:
            yield from cast(Iterable[rerank_pb2.RerankStreamRequest], self._requests)
        except Exception as error:
            self.error = error
            raise

    async def aiterate(self) -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        try:
            if isinstance(self._requests, AsyncIterable):
                async for request in self._requests:
                    yield request
            else:
                for request in self._requests:
                    yield request
        except Exception as error:
            self.error = error
            raise


# Unary calls are idempotent (scoring has no side effects): retried on UNAVAILABLE, which the server
# answers while draining or while its model server restarts. Streams are not retried.
_IDEMPOTENT_METHODS = ("Rerank", "Score", "GetModelInfo", "ListModels")


def service_config(retries: int) -> str:
    """gRPC service config: round_robin over every address of the target, and retries with backoff."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME, "method": m} for m in _IDEMPOTENT_METHODS],
                "retryPolicy": {
                    "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel or server options that raise the largest message sent and received (gRPC's default
    is 4 MiB received) to max_message_bytes; the SDK, the server and its Triton client all use them."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def channel_options(max_message_bytes: int, retries: int = 3) -> list[tuple[str, Any]]:
    return [
        *message_size_options(max_message_bytes),
        ("grpc.service_config", service_config(retries)),
        ("grpc.enable_retries", 1),
        # gRPC keeps a request for its retries only up to this size (256 KiB by default: a call of a hundred
        # 3 KB documents would never be retried); any request the channel may send.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        # Keepalive: find dead connections (a replica gone without a FIN) within ~40 s, idle or not.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def tls_credentials(
    root_certificates: str | Path | None = None,
    certificate_chain: str | Path | None = None,
    private_key: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: the CA to trust (default: the system's), and for mTLS the
    client's certificate chain and key."""

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(read(root_certificates), read(private_key), read(certificate_chain))


# What a gRPC (HTTP/2) metadata value may not hold: anything but visible ASCII and the space (gRPC refuses
# even a tab).
_NOT_HEADER_VALUE = re.compile("[^\x20-\x7e]")


def _check_token(token: str | None) -> None:
    """Refuse a token a header value cannot carry (a newline, a non-ASCII character) when the client is
    made: gRPC would fail every call with INTERNAL "Invalid metadata", or raise a UnicodeEncodeError. The
    message gives the position, never the token."""
    if token is None:
        return
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    if (bad := _NOT_HEADER_VALUE.search(token)) is not None:
        raise ValueError(
            f"token: the character at position {bad.start()} cannot be sent in a gRPC header "
            "(only visible ASCII and spaces can)"
        )


# The most of a caller's request id the server keeps (it cuts a longer one).
REQUEST_ID_MAX = 128


def _check_request_id(request_id: str | None) -> None:
    """Refuse a request id the server would not use as given (it replaces one outside visible ASCII and
    cuts one past REQUEST_ID_MAX): the caller's logs would hold another id than the service's."""
    if request_id is None:
        return
    if not isinstance(request_id, str):
        raise _refused("request_id", f"must be a str, not {type(request_id).__name__}")
    if len(request_id) > REQUEST_ID_MAX:
        raise _refused("request_id", f"is {len(request_id)} characters long; at most {REQUEST_ID_MAX} are sent")
    if (bad := _NOT_HEADER_VALUE.search(request_id)) is not None:
        raise _refused(
            "request_id",
            f"the character at position {bad.start()} cannot be sent in a gRPC header "
            "(only visible ASCII and spaces can)",
        )


class _ClientConfig:
    """What both twins share: where to connect, how, the default deadline and the call metadata."""

    def __init__(
        self,
        target: str,
        timeout: float | None,
        credentials: grpc.ChannelCredentials | None,
        max_message_bytes: int,
        retries: int,
        token: str | None,
    ) -> None:
        _check_token(token)
        self.target = target
        self.timeout = timeout
        self.credentials = credentials
        self.options = channel_options(max_message_bytes, retries)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.closed = False

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def call_metadata(self, request_id: str | None) -> tuple[tuple[str, str], ...] | None:
        """The client's metadata, and `x-request-id` when the call has one. gRPC's retries resend the
        call's metadata: every attempt carries the same id. A closed client's call fails here, CANCELLED, as
        the TypeScript and Go clients' do (gRPC itself raises ValueError or its own UsageError)."""
        if self.closed:
            raise CancelledError(grpc.StatusCode.CANCELLED, "the client is closed")
        _check_request_id(request_id)
        if not request_id:
            return self.metadata
        return (*(self.metadata or ()), (REQUEST_ID_KEY, request_id))


class RerankClient:
    """Blocking client. Use as a context manager, or call close().

    `target` is any gRPC target: `host:port`, or `dns:///rerank.ns.svc.cluster.local:50051` to spread
    calls round-robin over every address the name resolves to (a headless Service's pods).
    `timeout` is the default deadline in seconds of every call (None: no deadline); a call's own
    `timeout` argument overrides it. For RerankStream it bounds the whole stream. `credentials`
    turns on TLS (see `tls_credentials`), `token` sends `authorization: Bearer <token>` (visible ASCII
    and spaces only: another character is a ValueError here), and `retries` is how often an idempotent
    call is retried, with backoff, on UNAVAILABLE.

    Every call takes `request_id`, sent as `x-request-id` (for a stream, once for the whole stream; a
    retry resends the same one): the id the server logs the call under, to find it from the caller's own
    logs. Up to 128 visible ASCII characters and spaces, which the server uses as given; another value is
    an InvalidRequestError naming `request_id`, before sending. Without one the server makes its own id.
    Every RerankError from the server carries the id it used as `request_id`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._config = _ClientConfig(target, timeout, credentials, max_message_bytes, retries, token)
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
        truncation: TruncationArg = None,
        max_length: int | None = None,
        chunk_overlap: int | None = None,
        model: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> rerank_pb2.RerankResponse:
        """Score `documents` against `query` with `model` (None: the server's default); best first.
        `priority`: lower is handled first, None or 0 first of all; above 0 (background work) the call is
        refused first under load and queued behind calls at 0."""
        request = build_rerank_request(
            query,
            documents,
            top_n=top_n,
            return_documents=return_documents,
            truncation=truncation,
            max_length=max_length,
            chunk_overlap=chunk_overlap,
            model=model,
            priority=priority,
        )
        response: rerank_pb2.RerankResponse = self._call(self._stub.Rerank, request, timeout, request_id)
        return response

    def score(
        self,
        pairs: Iterable[tuple[str, str]],
        *,
        truncation: TruncationArg = None,
        max_length: int | None = None,
        chunk_overlap: int | None = None,
        model: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> rerank_pb2.ScoreResponse:
        """Score (text_a, text_b) pairs with `model` (None: the server's default), in request order;
        `priority` as in `rerank`."""
        request = build_score_request(
            pairs,
            truncation=truncation,
            max_length=max_length,
            chunk_overlap=chunk_overlap,
            model=model,
            priority=priority,
        )
        response: rerank_pb2.ScoreResponse = self._call(self._stub.Score, request, timeout, request_id)
        return response

    def rerank_stream(
        self,
        requests: Iterable[rerank_pb2.RerankStreamRequest],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[rerank_pb2.RerankStreamResponse]:
        """Send independent rerank requests (see `stream_request`); answers come as they complete.

        A failed message is answered with `error` set (rerank_client.errors.from_stream_error turns it
        into the exception the unary call would have raised); a failure of the stream itself raises, and
        so does an exception `requests` raise (stream_request's InvalidRequestError included), as itself.
        """
        metadata = self._config.call_metadata(request_id)
        source = _Requests(requests)
        try:
            yield from self._stub.RerankStream(
                source.iterate(), timeout=self._config.deadline(timeout), metadata=metadata
            )
        except grpc.RpcError as error:
            raise (source.error or from_rpc_error(error)) from None

    def model_info(
        self, *, model: str | None = None, timeout: float | None = None, request_id: str | None = None
    ) -> rerank_pb2.GetModelInfoResponse:
        """A served model (None: the default one), its maximum length and the service's limits."""
        response: rerank_pb2.GetModelInfoResponse = self._call(
            self._stub.GetModelInfo, _model_info_request(model), timeout, request_id
        )
        return response

    def list_models(
        self, *, timeout: float | None = None, request_id: str | None = None
    ) -> rerank_pb2.ListModelsResponse:
        """Every served model, and the name of the default one."""
        response: rerank_pb2.ListModelsResponse = self._call(
            self._stub.ListModels, rerank_pb2.ListModelsRequest(), timeout, request_id
        )
        return response

    def _call(self, method: Any, request: Any, timeout: float | None, request_id: str | None) -> Any:
        metadata = self._config.call_metadata(request_id)
        try:
            return method(request, timeout=self._config.deadline(timeout), metadata=metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._config.closed = True
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
        token: str | None = None,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._config = _ClientConfig(target, timeout, credentials, max_message_bytes, retries, token)
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
        truncation: TruncationArg = None,
        max_length: int | None = None,
        chunk_overlap: int | None = None,
        model: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> rerank_pb2.RerankResponse:
        """Score `documents` against `query` with `model` (None: the server's default); best first.
        `priority`: lower is handled first, None or 0 first of all; above 0 (background work) the call is
        refused first under load and queued behind calls at 0."""
        request = build_rerank_request(
            query,
            documents,
            top_n=top_n,
            return_documents=return_documents,
            truncation=truncation,
            max_length=max_length,
            chunk_overlap=chunk_overlap,
            model=model,
            priority=priority,
        )
        response: rerank_pb2.RerankResponse = await self._call(self._stub.Rerank, request, timeout, request_id)
        return response

    async def score(
        self,
        pairs: Iterable[tuple[str, str]],
        *,
        truncation: TruncationArg = None,
        max_length: int | None = None,
        chunk_overlap: int | None = None,
        model: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> rerank_pb2.ScoreResponse:
        """Score (text_a, text_b) pairs with `model` (None: the server's default), in request order;
        `priority` as in `rerank`."""
        request = build_score_request(
            pairs,
            truncation=truncation,
            max_length=max_length,
            chunk_overlap=chunk_overlap,
            model=model,
            priority=priority,
        )
        response: rerank_pb2.ScoreResponse = await self._call(self._stub.Score, request, timeout, request_id)
        return response

    async def rerank_stream(
        self,
        requests: Iterable[rerank_pb2.RerankStreamRequest] | AsyncIterable[rerank_pb2.RerankStreamRequest],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        """Send independent rerank requests (see `stream_request`); answers come as they complete."""
        metadata = self._config.call_metadata(request_id)
        source = _Requests(requests)
        call = self._stub.RerankStream(source.aiterate(), timeout=self._config.deadline(timeout), metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise (source.error or from_rpc_error(error)) from None
        except asyncio.CancelledError:
            # gRPC cancels the call when the requests raise; a cancellation of the caller's task stays one.
            if source.error is None:
                raise
            raise source.error from None
        finally:
            call.cancel()  # no-op once the stream ended; stops it if the caller stopped reading

    async def model_info(
        self, *, model: str | None = None, timeout: float | None = None, request_id: str | None = None
    ) -> rerank_pb2.GetModelInfoResponse:
        """A served model (None: the default one), its maximum length and the service's limits."""
        response: rerank_pb2.GetModelInfoResponse = await self._call(
            self._stub.GetModelInfo, _model_info_request(model), timeout, request_id
        )
        return response

    async def list_models(
        self, *, timeout: float | None = None, request_id: str | None = None
    ) -> rerank_pb2.ListModelsResponse:
        """Every served model, and the name of the default one."""
        response: rerank_pb2.ListModelsResponse = await self._call(
            self._stub.ListModels, rerank_pb2.ListModelsRequest(), timeout, request_id
        )
        return response

    async def _call(self, method: Any, request: Any, timeout: float | None, request_id: str | None) -> Any:
        metadata = self._config.call_metadata(request_id)
        try:
            return await method(request, timeout=self._config.deadline(timeout), metadata=metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def close(self) -> None:
        self._config.closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
