"""Failures of the request path, each tied to the gRPC status the caller gets."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request failed; `code` is the gRPC status the caller receives, the message its details."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BackendUnavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendFailure(ServiceError):
    code = grpc.StatusCode.INTERNAL
