"""Errors in each HTTP API's own shape and status: one mapper per shape, from the core's ServiceError.

The core decides what went wrong (errors.ErrorCode); an API surface only decides how to say it. Every
failure becomes a Kind, each shape maps a Kind to its API's status (Cohere says 400 where TEI and NIM
say 422) and writes its body: Cohere `{"message"}`, Jina `{"detail"}` (same path as Cohere v1, so that
body carries both keys), TEI `{"error", "error_type"}`, NIM `{"status", "title", "detail", "type"}`, vLLM
OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from starlette.responses import JSONResponse

from rerank_server.errors import (
    EmptyInputError,
    ErrorCode,
    InputLimitError,
    OverloadedError,
    ServiceError,
    UntokenizableTextError,
    cut,
    shown,
    shown_number,
)

# Seconds a client is told to wait before retrying an overloaded or unavailable server (Retry-After).
RETRY_AFTER_S = 1


class Kind(enum.Enum):
    INVALID = "invalid_request"  # malformed JSON, wrong types, values out of range
    EMPTY = "empty"  # invalid by an empty list: no documents
    UNTOKENIZABLE = "untokenizable"  # invalid by a text the tokenizer cannot take (a lone surrogate)
    OVER_LIMIT = "over_limit"  # invalid by a size limit: too many documents, a text or query too long
    TOO_LARGE = "too_large"  # the body or the request's tokens pass a server limit
    REQUEST_TIMEOUT = "request_timeout"  # the request's headers or body did not arrive in time
    OVERLOADED = "overloaded"  # the admission budget is spent: retry later
    UNAVAILABLE = "unavailable"  # Triton down, or this server draining
    DEADLINE = "deadline_exceeded"
    UNAUTHENTICATED = "unauthenticated"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"


_STATUS = {
    Kind.INVALID: 400,
    Kind.EMPTY: 400,
    Kind.UNTOKENIZABLE: 400,
    Kind.OVER_LIMIT: 400,
    Kind.TOO_LARGE: 413,
    Kind.REQUEST_TIMEOUT: 408,
    Kind.OVERLOADED: 429,
    Kind.UNAVAILABLE: 503,
    Kind.DEADLINE: 504,
    Kind.UNAUTHENTICATED: 401,
    Kind.CANCELLED: 499,
    Kind.INTERNAL: 500,
    Kind.NOT_FOUND: 404,
    Kind.METHOD_NOT_ALLOWED: 405,
}

_KIND = {
    ErrorCode.INVALID_ARGUMENT: Kind.INVALID,
    ErrorCode.NOT_FOUND: Kind.NOT_FOUND,
    ErrorCode.RESOURCE_EXHAUSTED: Kind.TOO_LARGE,
    ErrorCode.UNAVAILABLE: Kind.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: Kind.DEADLINE,
    ErrorCode.CANCELLED: Kind.CANCELLED,
    ErrorCode.INTERNAL: Kind.INTERNAL,
    ErrorCode.UNAUTHENTICATED: Kind.UNAUTHENTICATED,
}


def kind_of(error: ServiceError) -> Kind:
    """The core's error as a Kind: at capacity (retry later) is told apart from too large (do not retry), and
    bad input by what is wrong with it where an API tells those apart (TEI)."""
    if isinstance(error, OverloadedError):
        return Kind.OVERLOADED
    if isinstance(error, InputLimitError):
        return Kind.OVER_LIMIT
    if isinstance(error, EmptyInputError):
        return Kind.EMPTY
    if isinstance(error, UntokenizableTextError):
        return Kind.UNTOKENIZABLE
    return _KIND[error.code]


@dataclass(frozen=True)
class ErrorShape:
    """How one API writes its errors: its surface name (the metrics label), statuses and body."""

    surface: str
    body: Callable[[int, Kind, str], dict[str, Any]]
    statuses: Mapping[Kind, int] = field(default_factory=dict)

    def status(self, kind: Kind) -> int:
        return self.statuses.get(kind, _STATUS[kind])

    def response(self, kind: Kind, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """The error's answer, with `headers` beside this module's (a 405's Allow, which RFC 9110 requires)."""
        status = self.status(kind)
        headers = dict(headers or {})
        if kind in (Kind.OVERLOADED, Kind.UNAVAILABLE):
            headers["retry-after"] = str(RETRY_AFTER_S)
        if kind is Kind.UNAUTHENTICATED:
            headers["www-authenticate"] = "Bearer"
        if kind in (Kind.TOO_LARGE, Kind.REQUEST_TIMEOUT):
            # The body may be unread (or unfinished): the connection cannot carry another request.
            headers["connection"] = "close"
        # Text from the request (a field name) may hold lone surrogates, which UTF-8 cannot carry.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return JSONResponse(self.body(status, kind, message), status_code=status, headers=headers)

    def error_response(self, error: ServiceError) -> JSONResponse:
        return self.response(kind_of(error), error.message)


_TEI_TYPES = {
    Kind.INVALID: "Validation",
    Kind.EMPTY: "Empty",
    Kind.UNTOKENIZABLE: "Tokenizer",
    Kind.OVER_LIMIT: "Validation",
    Kind.TOO_LARGE: "Validation",
    Kind.REQUEST_TIMEOUT: "Timeout",
    Kind.OVERLOADED: "Overloaded",
    Kind.UNAVAILABLE: "Unhealthy",
    Kind.DEADLINE: "Timeout",
    Kind.UNAUTHENTICATED: "Unauthorized",
    Kind.CANCELLED: "Cancelled",
    Kind.INTERNAL: "Backend",
    Kind.NOT_FOUND: "NotFound",
    Kind.METHOD_NOT_ALLOWED: "MethodNotAllowed",
}

COHERE = ErrorShape("cohere", lambda status, kind, message: {"message": message})
# POST /v1/rerank answers Cohere v1 and Jina clients alike: Cohere's SDK reads `message`, Jina's `detail`.
COHERE_JINA = ErrorShape("cohere", lambda status, kind, message: {"message": message, "detail": message})
# TEI: 413 for its validation errors (input past a limit: TEI up to 1.8's status, kept, see docs/http.md), 400
# for no texts, 422 for a body it cannot read or a tokenizer error, 424 for a failing backend (its own statuses).
TEI = ErrorShape(
    "tei",
    lambda status, kind, message: {"error": message, "error_type": _TEI_TYPES[kind]},
    {Kind.INVALID: 422, Kind.UNTOKENIZABLE: 422, Kind.OVER_LIMIT: 413, Kind.INTERNAL: 424},
)


def _phrase(status: int, kind: Kind) -> str:
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else kind.value


# NIM (FastAPI-based): 422 for a body its schema refuses, 400 for input past a limit (a passage too long with
# truncate NONE, as NIM answers its "exceeds maximum allowed token size"); langchain-nvidia-ai-endpoints
# prints status, title and detail.
NIM = ErrorShape(
    "nim",
    lambda status, kind, message: {
        "status": status,
        "title": _phrase(status, kind),
        "detail": message,
        "type": kind.value,
    },
    {Kind.INVALID: 422, Kind.EMPTY: 422, Kind.UNTOKENIZABLE: 422},
)
# vLLM (OpenAI's error object): 400 for validation, its type named after the status (BadRequestError).
VLLM = ErrorShape(
    "vllm",
    lambda status, kind, message: {
        "error": {
            "message": message,
            "type": _phrase(status, kind).title().replace(" ", "").replace("-", "") + "Error",
            "param": None,
            "code": status,
        }
    },
)


# -- a request body's validation errors, in plain words -------------------------------------------------------
#
# Pydantic says "Input should be a valid dictionary or instance of Text" and names a union's members in the
# field's path ("documents[0].dict[str,any]"). Each request body (common.RequestBody) has its errors rewritten
# here: the path is the request's own, the words say what the field must be and what it got (the value cut:
# errors.cut), once per field.

# What a field must be, by pydantic's error type; {name}s are the error's context.
_MUST = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "too_long": "must hold at most {max_length} items",
    "too_short": "must hold at least {min_length} items",
    "literal_error": "must be {expected}",
}
# Types named in a path by pydantic, where a value may be one of several (str | dict[str, Any]): not fields.
_UNION_MEMBER = re.compile(r"str|int|float|bool|bytes|none|.*[^A-Za-z0-9_].*")
# The error types whose message is the caller's value's fault only by its kind: "(got a list)".
_NOT_ECHOED = frozenset({"missing", "too_long", "too_short"})


def got(value: Any) -> str:
    """What the caller sent, in JSON's words, a string or number cut (errors.cut)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return shown_number(value)
    if isinstance(value, str):
        return f"the string {shown(value)}"
    if isinstance(value, list | tuple):
        return "a list"
    return "an object" if isinstance(value, dict) else "a value of another kind"


def _must(error: ErrorDetails) -> str:
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind in _MUST:
        return _MUST[kind].format(**{key: cut(str(value)) for key, value in context.items()})
    message = error["msg"].removeprefix("Value error, ")
    return message.replace("Input should be", "must be", 1) if message.startswith("Input should be") else message


def plain_errors(errors: list[ErrorDetails]) -> list[InitErrorDetails]:
    """Pydantic's errors of a request body rewritten in plain words: one per field (a union's members merged,
    "must be a string or an object"), saying what the field must be and what it got. The message is the error's
    whole text, without the field's name, which the HTTP error handler writes before it."""
    merged: dict[tuple[int | str, ...], tuple[list[str], ErrorDetails]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        member = next(
            (i for i, part in enumerate(loc) if isinstance(part, str) and _UNION_MEMBER.fullmatch(part)), None
        )
        if member is not None:
            loc = loc[:member]
        musts, _ = merged.setdefault(loc, ([], error))
        must = _must(error)
        if must not in musts:
            musts.append(must)
    plain: list[InitErrorDetails] = []
    for loc, (musts, error) in merged.items():
        text = musts[0] + "".join(" or " + must.removeprefix("must be ") for must in musts[1:])
        if not loc and error["type"] in ("dict_type", "model_type", "model_attributes_type"):
            text = "the body must be a JSON object"
        if error["type"] == "too_long":
            held = (error.get("ctx") or {}).get("actual_length")
            text += f" (it holds {held:,})" if isinstance(held, int) else ""
        elif error["type"] not in _NOT_ECHOED:
            text += f" (got {got(error['input'])})"
        # The whole text is the template's one field, so that no brace in it is read as a placeholder.
        custom = PydanticCustomError(error["type"], "{plain}", {"plain": text})
        plain.append(InitErrorDetails(type=custom, loc=loc, input=error["input"]))
    return plain
