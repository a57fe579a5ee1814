"""Connection-level defences of the HTTP frontend, below the ASGI app: uvicorn's h11 protocol with

- an idle timeout (--http-idle-timeout-s) whenever a connection waits for a request: from the moment it
  opens, after a response, and after the rest of a body the call did not read. uvicorn arms its keep-alive
  timer after a response only, and any byte received disarms it: without this, a connection that never
  sends a byte, or one more byte after an early answer, would be held for ever;
- a header timeout (--http-header-timeout-s) from a request's first byte to the end of its headers: a
  client that sends headers a byte at a time (slowloris) is answered 408 and closed;
- the body timeout (--http-body-timeout-s) on the rest of a body the call did not read, its answer sent
  before the body ended (401, 404, GET /health): h11 discards that rest, and the connection is closed
  once the body is later than the timeout (while a call reads its body, the gate times it: gate.py);
- a write timeout: an answer the client has not read any more of for --http-idle-timeout-s is dropped
  and the connection aborted (close() waits for the client to read it, holding the answer's memory);
- protocol errors (a malformed request line or headers) answered in the JSON shape of the API whose path
  the request line names, instead of uvicorn's text/plain "Invalid HTTP request received.", and counted,
  without uvicorn's warning line for each (anyone can send a malformed request: one line per request of a
  few bytes would let any client flood the log; `rerank_rejected_total{reason="invalid_http"}` counts them);
  h11 takes a request with both Content-Length and Transfer-Encoding, a way to smuggle a second request
  past a proxy that reads the other length (RFC 9112 6.1): it is refused so too;
- no protocol upgrades: WebSocket and h2c upgrade headers are ignored (uvicorn runs with ws="none"), the
  request answered as plain HTTP, without uvicorn's warning per request;
- a bound on the chunks of a chunked body (MAX_BODY_CHUNKS): h11 and uvicorn spend about 5 us of the
  event loop on each chunk, all the chunks of one read in one callback, so a body of 1-byte chunks (6 bytes
  each on the wire) cost 0.1-0.2 s of the loop per 256 KiB read, and 16 MiB of them over a minute of CPU,
  with no token needed (any path takes a body). Past the bound the request is answered 413 in its API's
  shape and the connection closed, at most MAX_BODY_CHUNKS chunks (about 40 ms) after its body began.

A listening socket that runs out of file descriptors is guarded here too (GuardedSocket).
"""

from __future__ import annotations

import asyncio
import errno
import http
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, TypeAlias

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from rerank_server.http_api.errors import Kind
from rerank_server.http_api.registry import shape_for
from rerank_server.observability import Metrics
from rerank_server.settings import Settings

log = logging.getLogger(__name__)

# What uvicorn's h11 protocol logs, at WARNING, for every request h11 cannot parse, before it calls
# send_400_response (GuardedProtocol's, which counts it).
_INVALID_REQUEST_WARNING = "Invalid HTTP request received."


def _not_a_protocol_error(record: logging.LogRecord) -> bool:
    """uvicorn's logger's filter: its warning per malformed request is dropped, everything else kept."""
    return not (record.levelno == logging.WARNING and record.msg == _INVALID_REQUEST_WARNING)


logging.getLogger("uvicorn.error").addFilter(_not_a_protocol_error)

# The request line's path, from the first bytes of a request (for the shape of a protocol error).
_REQUEST_LINE = re.compile(rb"[A-Z]{1,16} (/[^ ?#\r\n]*)")
# Bytes of a request kept to read its request line from.
_HEAD_BYTES = 2048
# Chunks a chunked request body may come in. Each costs the loop about 5 us whatever its size, so this
# bounds a body's chunk handling to about 40 ms of a core, in one callback at most (a 256 KiB read holds
# up to 43,000 chunks). Clients that stream JSON send a chunk per piece they write: a file's blocks (4 KiB
# and up: a 16 MiB body, the largest accepted, in 4,096) or a document or field at a time (a request holds
# at most 1,000 documents); chunks of 2 KiB on average carry the largest body within the bound.
MAX_BODY_CHUNKS = 8192

_Event: TypeAlias = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


def error_bytes(status: int, kind: Kind, message: str, path: str) -> bytes:
    """A complete HTTP/1.1 error response in the shape of the API at `path`, closing the connection."""
    shape = shape_for(path)
    body = json.dumps(shape.body(status, kind, message)).encode()  # the status it is sent with
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class GuardedConnection(h11.Connection):
    """h11's server connection refusing two things h11 lets through: a request with both Content-Length and
    Transfer-Encoding (`ambiguous_length`), and a body past MAX_BODY_CHUNKS chunks (`too_many_chunks`). Each
    callback answers and closes the connection; no further event is reported. `request_at` is when the last
    request's headers ended, from which its body's timeout runs."""

    def __init__(self, ambiguous_length: Callable[[], None], too_many_chunks: Callable[[], None], *args: Any) -> None:
        super().__init__(h11.SERVER, *args)
        self.ambiguous_length = ambiguous_length
        self.too_many_chunks = too_many_chunks
        self.chunks = 0
        self.request_at = 0.0

    def next_event(self) -> _Event:
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.chunks = 0
            self.request_at = time.monotonic()
            names = {name for name, _ in event.headers}  # lowercased by h11
            if {b"content-length", b"transfer-encoding"} <= names:
                self.ambiguous_length()
                return h11.NEED_DATA  # uvicorn stops handling events until more data comes: none will
        elif isinstance(event, h11.Data) and event.chunk_start:  # a chunk's first bytes, whatever the reads
            self.chunks += 1
            if self.chunks > MAX_BODY_CHUNKS:
                self.too_many_chunks()
                return h11.NEED_DATA
        return event


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the idle, header, body and write timeouts, JSON protocol errors, the bound
    on body chunks and no upgrades; see the module."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    metrics: Metrics | None = None
    conn: GuardedConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        # uvicorn's connection, with the refusals (and h11's default size of headers, as uvicorn's has).
        self.conn = GuardedConnection(self._ambiguous_length, self._too_many_chunks, *(() if size is None else (size,)))
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive = self.idle_timeout_s  # type: ignore[assignment]  # uvicorn's int; a float works
        self._watch()  # the first request must begin within the idle timeout, as any later one must

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._write_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and len(self._head) < _HEAD_BYTES:
            self._head = (self._head + data)[:_HEAD_BYTES]
        super().data_received(data)  # disarms the idle timer, whatever the bytes
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head = self.conn.trailing_data[0][:_HEAD_BYTES]  # a pipelined request's first bytes, if any
        self._watch()
        self._watch_writes()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def _unsupported_upgrade_warning(self) -> None:
        """Upgrades are not served (ws="none"): the request is answered as plain HTTP, and not logged, which
        would give any client two warning lines per request."""

    def _watch(self) -> None:
        """Arm the timer for what the connection waits for, and stop the others: the idle timer for a request,
        the header timer for the rest of a request's headers, the body timer for the rest of a body the call
        did not read (its answer sent). While a call runs none: the gate times its body and the call."""
        if self.transport.is_closing():
            return
        waiting = self.conn.their_state is h11.IDLE
        headers = waiting and bool(self.conn.trailing_data[0])
        unread = self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY
        if waiting and not headers and self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.idle_timeout_s, self.timeout_keep_alive_handler)
        elif unread:
            self._unset_keepalive_if_required()
        if headers and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)
        elif not headers and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if unread and self._body_timer is None:
            left = self.conn.request_at + self.body_timeout_s - time.monotonic()
            self._body_timer = self.loop.call_later(max(0.0, left), self._body_timed_out)
        elif not unread and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self._count("header_timeout")
        message = f"the request's headers did not arrive within {self.header_timeout_s:g}s (http_header_timeout_s)"
        self._refuse(408, Kind.REQUEST_TIMEOUT, message)

    def _body_timed_out(self) -> None:
        """The rest of a body the call did not read is late: its answer went out, so nothing is sent."""
        self._body_timer = None
        if self.transport.is_closing():
            return
        self._count("body_timeout")
        self.transport.close()

    def _watch_writes(self) -> None:
        """Time the answer waiting in the write buffer (the kernel's socket buffer full): it must move within
        the idle timeout, or the connection is aborted (close() would wait for the client to read it)."""
        left = self.transport.get_write_buffer_size()
        if left and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.idle_timeout_s, self._check_writes, left)

    def _check_writes(self, before: int) -> None:
        self._write_timer = None
        left = self.transport.get_write_buffer_size()
        if left and left >= before:
            self._count("write_timeout")
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a reset: the kernel drops what it holds of the answer too (megabytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        else:
            self._watch_writes()

    def _too_many_chunks(self) -> None:
        self._count("too_many_chunks")
        if self.conn.our_state is h11.SEND_RESPONSE:  # none begun (GET /health may answer before its body ends)
            message = (
                f"the request body comes in more than {MAX_BODY_CHUNKS} chunks (transfer-encoding: chunked); "
                "send it in larger chunks, or with a content-length"
            )
            self._refuse(413, Kind.TOO_LARGE, message)
        self.transport.close()

    def _ambiguous_length(self) -> None:
        self._count("invalid_http")
        message = (
            "the request has both content-length and transfer-encoding, which leaves its end ambiguous "
            "(RFC 9112 6.1); send one of them"
        )
        self._refuse(400, Kind.INVALID, message)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: 400 in the shape of its API (when its request line names a path)."""
        self._count("invalid_http")
        message = "the request is not valid HTTP/1.1 (request line or headers malformed, or headers over 16 KiB)"
        self._refuse(400, Kind.INVALID, message)

    def _refuse(self, status: int, kind: Kind, message: str) -> None:
        """Answer `status` in the shape of the path the request line names, and close."""
        self.transport.write(error_bytes(status, kind, message, self._path()))
        self.transport.close()

    def _path(self) -> str:
        found = _REQUEST_LINE.match(self._head)
        return found.group(1).decode("latin-1") if found else ""

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()


def guarded_protocol(settings: Settings, metrics: Metrics) -> type[GuardedProtocol]:
    """The protocol class for uvicorn's Config(http=...), with this server's timeouts and metrics."""
    attributes = {
        "header_timeout_s": settings.http_header_timeout_s,
        "body_timeout_s": settings.http_body_timeout_s,
        "idle_timeout_s": settings.http_idle_timeout_s,
        "metrics": metrics,
    }
    return type("ServerProtocol", (GuardedProtocol,), attributes)


# accept() errors that mean the process (or the system) is out of descriptors or memory for a new socket.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# After one such error, how long further accepts report "nothing to accept" instead of retrying.
_QUIET_S = 0.5
# At most one log line per this many seconds about refused connections.
_LOG_EVERY_S = 10.0


class GuardedSocket(socket.socket):
    """A listening socket that reports running out of descriptors once per asyncio retry, not per backlog slot.

    asyncio's accept loop, on EMFILE, logs the error (with a traceback), pauses the socket for a second,
    and then goes on calling accept() up to `backlog` times in the same turn, logging and scheduling a
    retry for each: thousands of log lines and retries a second. Here the first failure goes to asyncio
    as it is (which pauses the socket); the next ones, until _QUIET_S later, say "nothing to accept",
    which ends asyncio's loop. Each failure is counted (rerank_accept_errors_total), and
    `quiet_exception_handler` keeps asyncio's own report of it to one line per _LOG_EVERY_S.
    """

    on_exhausted: Callable[[], None] = staticmethod(lambda: None)
    _quiet_until = 0.0

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() < self._quiet_until:
            raise BlockingIOError(errno.EAGAIN, "paused after running out of descriptors")
        try:
            return super().accept()
        except OSError as error:
            if error.errno in _EXHAUSTED:
                self._quiet_until = time.monotonic() + _QUIET_S
                self.on_exhausted()
            raise


def quiet_exception_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Install a loop exception handler that reports accept()'s resource errors at most once per
    _LOG_EVERY_S, with how many there were since, and hands every other report to asyncio's default."""
    last = -_LOG_EVERY_S
    suppressed = 0

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last, suppressed
        error = context.get("exception")
        if not (isinstance(error, OSError) and error.errno in _EXHAUSTED and "accept" in context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - last < _LOG_EVERY_S:
            suppressed += 1
            return
        log.error(
            "cannot accept connections: %s (%d more since the last report; rerank_accept_errors_total counts "
            "them). Raise the descriptor limit (ulimit -n) or cap connections in front of the server",
            error,
            suppressed,
        )
        last, suppressed = now, 0

    loop.set_exception_handler(handle)
