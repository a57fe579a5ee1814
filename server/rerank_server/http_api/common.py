"""What the route modules share: the core and settings of the app, and a call to the core under the
HTTP deadline (--http-timeout-s; HTTP has no gRPC deadline to carry one)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from rerank_server.core import RerankCore
from rerank_server.errors import DeadlineExceededError
from rerank_server.settings import Settings

T = TypeVar("T")


@dataclass
class HttpContext:
    """What every route reads, kept on app.state.context."""

    core: RerankCore
    settings: Settings
    draining: Callable[[], bool]


def context(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.context
    return ctx


async def call_core(request: Request, work: Callable[[float], Awaitable[T]]) -> T:
    """Run `work(deadline)` (a core call); past --http-timeout-s it is cancelled and the call gets 504."""
    timeout_s = context(request).settings.http_timeout_s
    deadline = time.monotonic() + timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await work(deadline)
    except TimeoutError:
        raise DeadlineExceededError(f"no answer within {timeout_s:g}s (http_timeout_s)") from None


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))
