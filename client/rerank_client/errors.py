"""The SDK's exception tree: every failed call raises a subclass of RerankError.

RerankError
├── InvalidRequestError     INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION
├── ResourceExhaustedError  RESOURCE_EXHAUSTED (a limit or the server's capacity)
├── RerankTimeoutError      DEADLINE_EXCEEDED
├── UnavailableError        UNAVAILABLE (server down, draining or restarting: safe to retry)
├── AuthenticationError     UNAUTHENTICATED, PERMISSION_DENIED
├── CancelledError          CANCELLED
└── ServerError             INTERNAL, UNKNOWN and anything else
"""

from __future__ import annotations

import grpc


class RerankError(Exception):
    """A call to the rerank service failed. `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidRequestError(RerankError):
    """The request was refused as malformed or outside what the model accepts."""


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
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: RerankTimeoutError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def from_rpc_error(error: grpc.RpcError) -> RerankError:
    """Translate a grpc.RpcError (sync or aio) into the matching RerankError subclass."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    return _BY_CODE.get(code, ServerError)(code, details)
