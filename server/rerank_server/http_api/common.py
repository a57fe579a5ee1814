"""What the route modules share: how a flavour declares its routes (HttpApi), how their JSON bodies are
parsed (standard JSON only: StandardJsonRoute), the core and settings of the app, and a call to the core under
the HTTP deadline (--http-timeout-s; HTTP has no gRPC deadline to carry one)."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError, ValidatorFunctionWrapHandler, model_validator

from rerank_server.core import RerankCore
from rerank_server.errors import DeadlineExceededError, ErrorCode, ServiceError, cut
from rerank_server.http_api.errors import ErrorShape, plain_errors
from rerank_server.settings import Settings

T = TypeVar("T")
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


@dataclass(frozen=True)
class Route:
    """One declared route: what the gate, the error handlers and the metrics know of it."""

    path: str
    method: str
    shape: ErrorShape  # how its errors (and those of paths under it) are written
    open: bool = False  # no token needed, and answered while draining: probes
    ranks: bool = False  # ranks documents through the core: every error path applies to it


def _no_constant(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not standard JSON, which has no NaN, Infinity or -Infinity", "", 0)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise json.JSONDecodeError(
            f"the number {cut(text)} is out of range: a number must be finite, within a double's ±1.8e308", "", 0
        )
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # past Python's limit on an integer's digits (sys.get_int_max_str_digits)
        digits = sys.get_int_max_str_digits()
        number = cut(text, "digits", len(text.lstrip("-")))
        raise json.JSONDecodeError(f"the integer {number} has too many digits: at most {digits:,}", "", 0) from None


def loads_standard(body: bytes) -> Any:
    """`json.loads`, refusing what standard JSON does not have and Python's parser accepts: NaN, Infinity and
    -Infinity, and numbers past a double's range (1e400 would be inf). No route can use them, and an echoed
    object document holding one could not be written back as JSON (a 500 after the model ran).

    The JSONDecodeError becomes FastAPI's json_invalid, answered 400 (422: TEI, NIM) before any route runs."""
    return json.loads(body, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer)


class RequestBody(BaseModel):
    """A route's JSON body: its validation errors are written in plain words (http_api.errors.plain_errors), the
    same for every API, whatever route or field."""

    @model_validator(mode="wrap")
    @classmethod
    def _plain_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(data)
        except ValidationError as error:
            raise ValidationError.from_exception_data(error.title, plain_errors(error.errors())) from None


class StandardJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_standard(await self.body())
        return self._json


class StandardJsonRoute(APIRoute):
    """A route whose JSON body FastAPI parses with loads_standard (FastAPI's documented way to change how a
    request is read: a custom Request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(StandardJsonRequest(request.scope, request.receive))

        return route


class HttpApi:
    """One API flavour's routes, declared once: `@api.post(path, ...)` adds the FastAPI route and records
    it, and registry.py derives the gate's routes, the open paths and the error shapes from the records."""

    def __init__(self, tag: str, shape: ErrorShape, object_lists: frozenset[str] = frozenset()) -> None:
        self.router = APIRouter(tags=[tag], route_class=StandardJsonRoute)
        self.shape = shape
        # Its request fields that are lists of objects, where a string item is an error too (the gate counts
        # them: json_scan).
        self.object_lists = object_lists
        self.routes: list[Route] = []

    def post(
        self, path: str, *, shape: ErrorShape | None = None, ranks: bool = False, **fastapi: Any
    ) -> Callable[[Endpoint], Endpoint]:
        return self._route("POST", path, shape, False, ranks, fastapi)

    def get(
        self, path: str, *, shape: ErrorShape | None = None, open: bool = False, **fastapi: Any
    ) -> Callable[[Endpoint], Endpoint]:
        return self._route("GET", path, shape, open, False, fastapi)

    def _route(
        self, method: str, path: str, shape: ErrorShape | None, open: bool, ranks: bool, fastapi: dict[str, Any]
    ) -> Callable[[Endpoint], Endpoint]:
        self.routes.append(Route(path, method, shape or self.shape, open, ranks))
        add = self.router.post if method == "POST" else self.router.get
        return add(path, **fastapi)


@dataclass
class HttpContext:
    """What every route reads, kept on app.state.context."""

    core: RerankCore
    settings: Settings
    draining: Callable[[], bool]


def context(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.context
    return ctx


# The `model` request field, as each flavour's OpenAPI description states it.
MODEL_FIELD = (
    "a served model's name (GET /v1/models lists them); absent: the default model; another name: 404, "
    "unless the server serves one model: then that model answers"
)


def requested_model(request: Request, name: str | None) -> str:
    """The served model's name a request's `model` field chooses ("": the default); see ServedModels.for_client."""
    return context(request).core.models.for_client(name or "")


async def call_core(request: Request, work: Callable[[float], Awaitable[T]]) -> T:
    """Run `work(deadline)` (a core call); past --http-timeout-s it is cancelled and the call gets 504.

    A caller that disconnects cancels it too (its tokenization, queue places and Triton requests stop),
    as a cancelled gRPC call does: nobody is left to read the answer."""
    timeout_s = context(request).settings.http_timeout_s
    deadline = time.monotonic() + timeout_s
    call = asyncio.ensure_future(work(deadline))
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({call, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not call.done():
            call.cancel()
    expired = DeadlineExceededError(f"no answer within {timeout_s:g}s (http_timeout_s)")
    if call in done:
        try:
            return call.result()
        except DeadlineExceededError:
            # The core saw the same deadline pass first (a race of a few ms): the caller hears one reason.
            raise expired from None
    if watcher in done:
        raise CallerGoneError("the caller disconnected")
    raise expired


class CallerGoneError(ServiceError):
    code = ErrorCode.CANCELLED


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: receive() then waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))
