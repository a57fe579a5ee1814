"""Failures of the request path, each tied to the gRPC status the caller gets.

Request errors carry google.rpc.BadRequest field violations, sent in the standard
`grpc-status-details-bin` trailer (and inside StreamError for RerankStream messages).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from rerank_client._proto.rerank.v1 import rerank_pb2


class ServiceError(Exception):
    """A request failed; `code` is the gRPC status the caller receives, the message its details."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, violations: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = list(violations)

    def status(self) -> status_pb2.Status:
        """The google.rpc.Status of this error, with a BadRequest when fields are at fault."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                    for field, description in self.violations
                ]
            )
            status.details.add().Pack(bad_request)
        return status

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((rpc_status.GRPC_DETAILS_METADATA_KEY, self.status().SerializeToString()),)

    def stream_error(self) -> rerank_pb2.StreamError:
        return rerank_pb2.StreamError(
            code=self.code.value[0],
            message=self.message,
            field_violations=[rerank_pb2.FieldViolation(field=f, description=d) for f, d in self.violations],
        )


def field_error(cls: type[ServiceError], field: str, description: str) -> ServiceError:
    """An error about one request field: the message is the description, the violation names the field."""
    return cls(f"{field}: {description}", [(field, description)])


class InvalidRequestError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceededError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BackendUnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(ServiceError):
    code = grpc.StatusCode.CANCELLED


class BackendFailureError(ServiceError):
    code = grpc.StatusCode.INTERNAL
