"""The SDK's exception tree: every failed call raises a subclass of RerankError.

RerankError
├── InvalidRequestError     INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION
├── ModelNotFoundError      NOT_FOUND (the request names a model the server does not serve)
├── ResourceExhaustedError  RESOURCE_EXHAUSTED (a limit or the server's capacity)
├── RerankTimeoutError      DEADLINE_EXCEEDED
├── UnavailableError        UNAVAILABLE (server down, draining or restarting: safe to retry)
├── AuthenticationError     UNAUTHENTICATED, PERMISSION_DENIED
├── CancelledError          CANCELLED (or a call on a closed client)
└── ServerError             INTERNAL, UNKNOWN and anything else
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

from rerank_client.pb import rerank_pb2


class RerankError(Exception):
    """A call to the rerank service failed.

    `code` is the gRPC status, `details` the server's message, and `field_violations` the request
    fields at fault (from the google.rpc.BadRequest the server attaches to request errors).
    `request_id` is the id the server handled and logged the call under (its `x-request-id`: the
    caller's `request_id` when valid, else one of its own); None when no answer came from the server
    (a refusal before sending, a connection that failed) and for a stream message's error.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        field_violations: Sequence[rerank_pb2.FieldViolation] = (),
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations = list(field_violations)
        self.request_id = request_id


class InvalidRequestError(RerankError):
    """The request was refused as malformed or outside what the model accepts."""


class ModelNotFoundError(RerankError):
    """The request named a model the server does not serve; the message names the served ones."""


class ResourceExhaustedError(RerankError):
    """A configured limit was exceeded or the server is overloaded."""


class RerankTimeoutError(RerankError):
    """The call's deadline passed before the answer came."""


class UnavailableError(RerankError):
    """The service cannot answer right now; the call may be retried."""


class AuthenticationError(RerankError):
    """The call lacked valid credentials."""


class CancelledError(RerankError):
    """The call was cancelled."""


class ServerError(RerankError):
    """The server failed while handling a valid request."""


_BY_CODE: dict[grpc.StatusCode, type[RerankError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: RerankTimeoutError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


_CODE_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}
_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"


def _request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def _violations(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> list[rerank_pb2.FieldViolation]:
    for key, value in trailing_metadata or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            found = []
            for detail in status.details:
                bad_request = error_details_pb2.BadRequest()
                if detail.Unpack(bad_request):
                    found += [
                        rerank_pb2.FieldViolation(field=v.field, description=v.description)
                        for v in bad_request.field_violations
                    ]
            return found
    return []


def from_rpc_error(error: grpc.RpcError) -> RerankError:
    """Translate a grpc.RpcError (sync or aio) into the matching RerankError subclass."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    trailing = error.trailing_metadata()
    violations = _violations(trailing)
    # A failed unary call carries the request id in its trailing metadata (the server sends no headers
    # before an answer, so that the call can be retried); a stream's comes in its initial metadata. Sync
    # errors and aio's AioRpcError both keep the initial metadata (None when none came); the base class
    # declares no such method.
    initial_metadata = getattr(error, "initial_metadata", None)
    initial = initial_metadata() if callable(initial_metadata) else None
    request_id = _request_id(initial) or _request_id(trailing)
    return _BY_CODE.get(code, ServerError)(code, details, violations, request_id)


def from_stream_error(error: rerank_pb2.StreamError) -> RerankError:
    """The RerankError a failed RerankStream message stands for (what the unary call would have raised)."""
    code = _CODE_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, ServerError)(code, error.message, error.field_violations)
