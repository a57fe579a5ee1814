"""Failures of the request path, in plain Python: each carries an ErrorCode and the request fields at fault.

The core raises them; every API surface maps them to its own shape (the gRPC servicer to a status with
google.rpc.BadRequest details, the HTTP routes to each API's status and JSON body), so no surface
invents an error of its own.
"""

from __future__ import annotations

import enum
import re
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
    counted = f"{count:,}" if count is not None else f"more than {limit:,}"
    return field_error(
        InputLimitError, field, f"holds {counted} entries; the limit is {limit:,} per request (max_documents)"
    )


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


# The most of a caller's value (a model name, a path, a number's digits) a refusal repeats: the rest only grows
# the answer (gRPC's status message travels in a header, which the caller's channel refuses past its metadata
# limit) and the log. Every refusal that quotes the caller cuts what it quotes here (cut, shown, shown_number).
SHOWN_CHARACTERS = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def cut(text: str, unit: str = "characters", length: int | None = None) -> str:
    """`text` as a refusal repeats it: its first SHOWN_CHARACTERS, then an ellipsis and its full length (`length`
    `unit`, by default its characters), control characters written as \\xNN escapes."""
    if len(text) > SHOWN_CHARACTERS:
        text = f"{text[:SHOWN_CHARACTERS]}… ({len(text) if length is None else length:,} {unit})"
    return _CONTROL.sub(lambda control: f"\\x{ord(control.group()):02x}", text)


def shown(name: str) -> str:
    """`name` (a string the caller sent) quoted for a refusal, cut to SHOWN_CHARACTERS with its full length said."""
    if len(name) <= SHOWN_CHARACTERS:
        return f"'{cut(name)}'"
    return f"'{cut(name[:SHOWN_CHARACTERS])}…' ({len(name):,} characters)"


def shown_number(value: int | float | str) -> str:
    """A number the caller sent, as a refusal repeats it: a number of 4,300 digits is cut to SHOWN_CHARACTERS with
    its digits counted."""
    text = str(value)
    return cut(text, "digits", len(text.lstrip("-")))


# Names of a caller's list a refusal repeats (rank_fields may hold 64 names of any length).
SHOWN_NAMES = 4


def named(names: Sequence[str]) -> str:
    """A list of names the caller sent, each shown(), the first SHOWN_NAMES of them and how many more."""
    listed = ", ".join(shown(name) for name in names[:SHOWN_NAMES])
    return listed + (f" and {len(names) - SHOWN_NAMES:,} more" if len(names) > SHOWN_NAMES else "")
