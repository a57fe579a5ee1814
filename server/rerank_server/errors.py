"""Failures of the request path, in plain Python: each carries an ErrorCode and the request fields at fault.

The core raises them; every API surface maps them to its own shape (the gRPC servicer to a status with
google.rpc.BadRequest details, the HTTP routes to each API's status and JSON body), so no surface
invents an error of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class ErrorCode(enum.Enum):
    """What went wrong, named as the gRPC status it becomes (the gRPC surface maps by name)."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"


class ServiceError(Exception):
    """A request failed; `code` says how, `message` says why, `violations` name the fields at fault."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, violations: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = list(violations)


def field_error(cls: type[ServiceError], field: str, description: str) -> ServiceError:
    """An error about one request field: the message is the description, the violation names the field."""
    return cls(f"{field}: {description}", [(field, description)])


class InvalidRequestError(ServiceError):
    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFoundError(ServiceError):
    """The request names a model the server does not serve."""

    code = ErrorCode.NOT_FOUND


class InputLimitError(InvalidRequestError):
    """The request's input passes a size limit: too many documents, a query past max_query_tokens, a text
    that does not fit with truncation off. Invalid like any bad input (gRPC INVALID_ARGUMENT); TEI says
    413 and NIM 400 for these where both say 422 for other bad input."""


class EmptyInputError(InvalidRequestError):
    """A list the request must fill holds nothing (no documents, no pairs). Invalid like any bad input; TEI
    answers it apart (400, error_type Empty) from its other validation errors."""


class UntokenizableTextError(InvalidRequestError):
    """A text the tokenizer cannot take: one holding a lone surrogate (JSON's "\\ud800" escape), which no UTF-8
    can carry. Invalid like any bad input; TEI answers it as a tokenizer error (error_type Tokenizer)."""


def too_many_documents(field: str, limit: int, count: int | None = None) -> ServiceError:
    """`field` holds more entries than max_documents allows; `count` when known (a scan of the wire stops
    just past the limit, so it knows only that there are more)."""
    counted = str(count) if count is not None else f"more than {limit}"
    return field_error(InputLimitError, field, f"{counted} exceed the limit of {limit} per request (max_documents)")


class LimitExceededError(ServiceError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class OverloadedError(LimitExceededError):
    """The service is at capacity (not the request too large): the same call may succeed later.

    gRPC answers RESOURCE_EXHAUSTED like any limit; HTTP answers 429 with Retry-After instead of 413.
    """


class BackendUnavailableError(ServiceError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceededError(ServiceError):
    code = ErrorCode.DEADLINE_EXCEEDED


class BackendFailureError(ServiceError):
    code = ErrorCode.INTERNAL


# The most of a name a caller sent (a model name, a path) an error message repeats: the rest only grows the
# answer (gRPC's status message travels in a header, which the caller's channel refuses past its metadata
# limit).
SHOWN_NAME_CHARACTERS = 100


def shown(name: str) -> str:
    """`name` quoted for an error message, cut to SHOWN_NAME_CHARACTERS with its full length said."""
    if len(name) <= SHOWN_NAME_CHARACTERS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARACTERS]!r}... ({len(name):,} characters)"
