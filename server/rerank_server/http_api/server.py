"""The HTTP/JSON frontend: a FastAPI app (OpenAPI page at /docs) served by uvicorn on the gRPC server's
own asyncio loop, over the same RerankCore, admission budget, token, TLS files and drain.

Why FastAPI + uvicorn: the request and response models double as the OpenAPI description, which the
APIs' users look for; uvicorn's Server.serve() runs as a task on the running loop (no thread, no second
loop), so HTTP and gRPC calls share one core and one admission budget. uvicorn's own signal handling is
turned off (app.run owns SIGTERM) and its socket is bound here, so a taken port raises instead of exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from rerank_server.calls import Calls
from rerank_server.core import RerankCore
from rerank_server.errors import ServiceError, shown
from rerank_server.http_api.common import HttpContext
from rerank_server.http_api.connection import GuardedSocket, guarded_protocol, quiet_exception_handler
from rerank_server.http_api.errors import Kind
from rerank_server.http_api.gate import Gate
from rerank_server.http_api.registry import APIS, shape_for
from rerank_server.observability import Metrics
from rerank_server.settings import Settings

log = logging.getLogger(__name__)

_KIND_OF_STATUS = {404: Kind.NOT_FOUND, 405: Kind.METHOD_NOT_ALLOWED, 408: Kind.REQUEST_TIMEOUT, 413: Kind.TOO_LARGE}


def create_app(core: RerankCore, settings: Settings, draining: Callable[[], bool] = lambda: False) -> FastAPI:
    app = FastAPI(
        title="rerank-service HTTP APIs",
        description="Cohere (v1, v2), Jina, Hugging Face TEI and NVIDIA NIM compatible rerank endpoints over "
        "the same scoring core as the rerank.v1 gRPC API.",
        version="1",
        # A path with a slash too many is a 404 in its API's shape like any unknown path, not Starlette's
        # empty 307 to the path without it, whose Location is built from the request's Host header (a
        # redirect anywhere the caller names, which a client following it resends its body and token to).
        redirect_slashes=False,
    )
    app.state.context = HttpContext(core, settings, draining)
    for api in APIS:
        app.include_router(api.router)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return shape_for(request.url.path).error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message = validation_message(error.errors())
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type:
            # FastAPI reads a body as JSON only when it says so (curl -d sends a form type by default).
            message = (
                f"send the body as JSON with content-type: application/json (got {shown(content_type)}); {message}"
            )
        return shape_for(request.url.path).response(Kind.INVALID, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = _KIND_OF_STATUS.get(error.status_code, Kind.INVALID)
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if kind is Kind.NOT_FOUND:
            message = f"no route {shown(request.url.path)}; see /docs"
        elif isinstance(error.__cause__, (UnicodeDecodeError, RecursionError)):
            # FastAPI says "There was an error parsing the body" for what json.loads raises besides its syntax.
            message = f"the body is not valid JSON ({_parse_error(error.__cause__, request)})"
        # Starlette's own headers kept: a 405 names the methods the path allows (Allow, RFC 9110 15.5.6).
        return shape_for(request.url.path).response(kind, message, error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return shape_for(request.url.path).response(Kind.INTERNAL, "internal error")

    return app


def validation_message(errors: Any) -> str:
    """Pydantic's errors as one line naming the fields, e.g. `documents[2]: Input should be a valid string`."""
    parts = []
    for error in list(errors)[:5]:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})")
            continue
        if not loc:
            parts.append("the body must be a JSON object" if error.get("type") == "missing" else error["msg"])
            continue
        name = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        parts.append(f"{name}: {error['msg']}")
    more = len(list(errors)) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _parse_error(error: Exception, request: Request) -> str:
    """Why json.loads refused a body other than by its syntax: bytes that are not text, or nesting deeper
    than Python's recursion limit."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    encoding = request.headers.get("content-encoding")
    if encoding:  # the body is read as sent: a compressed one is bytes that are not text
        return f"content-encoding {shown(encoding)} is not supported; send the body uncompressed"
    return f"not UTF-8: {error}"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # app.run handles SIGINT/SIGTERM for both frontends and drains them together.
        yield


def _bind(host: str, port: int, on_exhausted: Callable[[], None]) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = GuardedSocket(family, socket.SOCK_STREAM)
    sock.on_exhausted = on_exhausted
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it. Without it, a response written in two parts (headers, body)
    # waits for the client's delayed ACK: 40 ms per call (measured: 45 ms for GET /v1/models).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class GuardedServer:
    """An ASGI app served by uvicorn on the running loop behind the connection defences of connection.py
    (idle, header, body and write timeouts, the chunk bound, GuardedSocket at the descriptor limit) and
    without uvicorn's logs: the HTTP frontend, and the Prometheus metrics port (observability.Metrics.serve)."""

    def __init__(self, app: Any, settings: Settings, metrics: Metrics, name: str, **tls: Any) -> None:
        config = uvicorn.Config(
            app,
            http=guarded_protocol(settings, metrics),
            ws="none",  # no upgrades: an upgrade request is answered as plain HTTP
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=1,
            **tls,
        )
        self._server = _Server(config)
        self._metrics = metrics
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def listen(self, host: str, port: int) -> None:
        """Bind now (a taken port raises here) and serve from a task on the running loop; connections
        wait in the listen backlog until it runs."""
        quiet_exception_handler(asyncio.get_running_loop())
        sock = _bind(host, port, self._metrics.accept_errors.inc)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._serve(sock), name=self._name)

    async def start(self, host: str, port: int) -> None:
        """listen(), and return once serving (raising why, if the server stopped during start-up)."""
        self.listen(host, port)
        assert self._task is not None
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it stopped
                raise RuntimeError(f"the {self._name} server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._server.serve(sockets=[sock])
        except asyncio.CancelledError:
            # Cancelled without stop() (asyncio.run cancels the tasks left when the server's run ends): the
            # listening socket and the open connections are closed, not left to the garbage collector.
            for server in getattr(self._server, "servers", ()):
                server.close()
            sock.close()
            for connection in list(self._server.server_state.connections):
                connection.shutdown()
            raise


class HttpFrontend:
    """The HTTP server: start() binds and serves, stop() ends it (draining is calls.Calls', shared with gRPC)."""

    def __init__(self, settings: Settings, core: RerankCore, calls: Calls) -> None:
        self.settings = settings
        self.app = create_app(core, settings, lambda: calls.draining)
        descriptions = (
            self.app.openapi_url,
            self.app.docs_url,
            self.app.redoc_url,
            self.app.swagger_ui_oauth2_redirect_url,
        )
        self.gate = Gate(
            self.app,
            calls,
            settings.bearer_token,
            settings.max_message_bytes,
            settings.max_documents,
            settings.http_body_timeout_s,
            other_paths=[path for path in descriptions if path],
        )
        tls: dict[str, Any] = {}
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            tls = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
            if settings.tls_client_ca_file is not None:
                tls |= {"ssl_ca_certs": str(settings.tls_client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        # No access log: the gate logs each call once, as JSON with its request id.
        self._server = GuardedServer(self.gate, settings, calls.metrics, "http-frontend", **tls)

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self) -> None:
        await self._server.start(self.settings.host, self.settings.http_port)

    async def stop(self) -> None:
        await self._server.stop()
