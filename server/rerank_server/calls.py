"""What the gRPC call policy (interceptors.CallPolicy) and the HTTP gate (http_api/gate.Gate) share: the
calls in flight over both surfaces, draining, the request id, the refusals' wording, and how a finished
call is counted and logged. One `Calls` serves both, so a drain waits for every surface's calls at once."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from rerank_server.observability import Metrics, call_model, request_id, start_call_model

log = logging.getLogger(__name__)

DRAINING = "the server is shutting down; retry elsewhere"
# The HTTP health probes' answers while draining and while the model cannot answer (TEI's and NIM's).
SHUTTING_DOWN = "the server is shutting down"
MODEL_NOT_READY = "the model is not ready"
UNAUTHENTICATED = "missing or invalid token (authorization: Bearer <token>)"
# The metadata key (gRPC) of the request id, as callers send it and the server answers it.
REQUEST_ID_KEY = "x-request-id"
# Longest request id kept from a caller's x-request-id.
REQUEST_ID_MAX = 128
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
# The metrics label of a method or path no API declares: label values stay a fixed set.
OTHER = "other"


def start_request(sent: str | bytes | None) -> str:
    """The call's request id: the caller's x-request-id (cut to REQUEST_ID_MAX) where it is printable
    ASCII, or a new one. It is set for the log lines written while the call runs, beside the holder of the
    model the call chooses (observability.chose_model). gRPC refuses to send a
    metadata value outside 0x20-0x7E (the echo failed as INTERNAL), and a log line is no place for control
    characters."""
    if isinstance(sent, bytes):
        sent = sent.decode("latin-1")
    sent = (sent or "")[:REQUEST_ID_MAX]
    rid = sent if _PRINTABLE.fullmatch(sent) else uuid.uuid4().hex
    request_id.set(rid)
    start_call_model()
    return rid


class Calls:
    """Calls in flight over every surface, draining, and each finished call's metrics and log line."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def refuse_if_draining(self) -> bool:
        """True (and counted) while draining: the caller refuses the call with DRAINING."""
        if self.draining:
            self.metrics.rejected.labels(reason="draining").inc()
        return self.draining

    def unauthenticated(self) -> None:
        self.metrics.rejected.labels(reason="unauthenticated").inc()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count the call in flight (rerank_inflight_calls) while the block runs."""
        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight_calls.inc()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
            self.metrics.inflight_calls.dec()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def finished(self, surface: str, rpc: str, code: str | int, elapsed_s: float) -> None:
        """Count a finished call (refused ones too) by surface, RPC (or route), status and the served model it
        chose ("" for none); time and log it."""
        model = call_model()
        self.metrics.calls.labels(surface=surface, rpc=rpc, code=str(code), model=model).inc()
        self.metrics.latency.labels(surface=surface, rpc=rpc, model=model).observe(elapsed_s)
        log.info(
            "call finished",
            extra={
                "surface": surface,
                "rpc": rpc,
                "code": code,
                "model": model,
                "duration_ms": round(elapsed_s * 1000, 2),
            },
        )
