"""Backpressure: a bound on the tokens admitted to the model at once, over all calls.

A call whose tokens would pass the bound is refused at once with RESOURCE_EXHAUSTED instead of
queueing behind the others, so admitted calls keep a bounded latency (about the bound divided by
the model's throughput) and an overloaded server sheds load instead of growing queues and memory.

Background calls (priority above 0) may hold only a share of the bound together, so that under load
they are refused first and a call at priority 0 still finds room: Cohere's priority promises that the
most important calls are the least likely to be dropped.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from rerank_server.errors import OverloadedError
from rerank_server.observability import Metrics


class TokenAdmission:
    """Counts admitted tokens; used from the event loop only, so it needs no lock."""

    def __init__(self, capacity: int, metrics: Metrics, background_share: float = 1.0) -> None:
        self.capacity = capacity
        self.background_capacity = int(capacity * background_share)
        self.metrics = metrics
        self.inflight = 0

    @contextmanager
    def admit(self, tokens: int, background: bool = False) -> Iterator[None]:
        # An idle server admits any single request within max_total_tokens (<= capacity, see Settings).
        limit = self.background_capacity if background else self.capacity
        if self.inflight and self.inflight + tokens > limit:
            share = ""
            if background and limit < self.capacity:
                self.metrics.rejected.labels(reason="background_capacity").inc()
                share = f"; calls above priority 0 may hold {limit} of them (background_inflight_share)"
            else:
                self.metrics.rejected.labels(reason="capacity").inc()
            raise OverloadedError(
                f"the service is at capacity: {self.inflight} tokens in flight, {tokens} more asked, "
                f"max_inflight_tokens is {self.capacity}{share}; retry later or elsewhere"
            )
        self.inflight += tokens
        self.metrics.inflight_tokens.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= tokens
            self.metrics.inflight_tokens.set(self.inflight)


class PrioritySlots:
    """At most `slots` holders at once (the tokenizer threads); waiters enter background last, each kind in
    arrival order, so a call at priority 0 waits for the work already running, never for queued background
    calls. Used from the event loop only, so it needs no lock."""

    def __init__(self, slots: int) -> None:
        self.free = slots
        self._waiting: list[tuple[bool, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @asynccontextmanager
    async def hold(self, background: bool = False) -> AsyncIterator[None]:
        if self.free and not self._waiting:
            self.free -= 1
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (background, next(self._arrival), turn))
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._release()  # handed the slot just as the caller gave up: pass it on
                else:
                    turn.cancel()  # left in the heap; _release skips it
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            turn = heapq.heappop(self._waiting)[2]
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1
