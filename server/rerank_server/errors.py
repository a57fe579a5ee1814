"""Failures of the request path, each tied to the gRPC status the caller gets."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request failed; `code` is the gRPC status the caller receives, the message its details."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceededError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BackendUnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendFailureError(ServiceError):
    code = grpc.StatusCode.INTERNAL
