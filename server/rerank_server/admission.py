"""Backpressure: a bound on the tokens admitted to the model at once, over all calls.

A call whose tokens would pass the bound is refused at once with RESOURCE_EXHAUSTED instead of
queueing behind the others, so admitted calls keep a bounded latency (about the bound divided by
the model's throughput) and an overloaded server sheds load instead of growing queues and memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rerank_server.errors import OverloadedError
from rerank_server.observability import Metrics


class TokenAdmission:
    """Counts admitted tokens; used from the event loop only, so it needs no lock."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self.inflight = 0

    @contextmanager
    def admit(self, tokens: int) -> Iterator[None]:
        # An idle server admits any single request within max_total_tokens (<= capacity, see Settings).
        if self.inflight and self.inflight + tokens > self.capacity:
            self.metrics.rejected.labels(reason="capacity").inc()
            raise OverloadedError(
                f"the service is at capacity: {self.inflight} tokens in flight, {tokens} more asked, "
                f"max_inflight_tokens is {self.capacity}; retry later or elsewhere"
            )
        self.inflight += tokens
        self.metrics.inflight_tokens.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= tokens
            self.metrics.inflight_tokens.set(self.inflight)
