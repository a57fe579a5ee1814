"""Assembles and runs the frontend: the gRPC server, its health and reflection services, and the
optional local Triton it fronts. `run()` is what `rerank serve` calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rerank_client._proto.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from rerank_server.service import RerankService
from rerank_server.settings import Settings
from rerank_server.tokenization import PairTokenizer
from rerank_server.triton_backend import ModelInfo, TritonBackend
from rerank_server.triton_launcher import LocalTriton, TritonPorts

log = logging.getLogger(__name__)

RERANK_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name
HEALTH_SERVICES = ("", RERANK_SERVICE)


def tokenizer_folder(settings: Settings, model: ModelInfo) -> Path:
    if settings.tokenizer is not None:
        return settings.tokenizer
    if settings.model_repository is None:
        raise ValueError(
            "with --triton-url, give --tokenizer or --model-repository so the frontend finds the tokenizer"
        )
    return settings.model_repository / model.name / model.version / model.tokenizer_dir


class Frontend:
    """The grpc.aio server with RerankService, grpc.health.v1 and reflection, over one backend."""

    def __init__(self, settings: Settings, backend: TritonBackend, model: ModelInfo, tokenizer: PairTokenizer) -> None:
        self.settings = settings
        self.backend = backend
        self.health = health.aio.HealthServicer()
        self._executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
            ]
        )
        service = RerankService(settings, tokenizer, backend, model, self._executor)
        rerank_pb2_grpc.add_RerankServiceServicer_to_server(service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (RERANK_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        self.port = self._server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {settings.host}:{settings.port}")
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._set_health(await self.backend.is_ready())
        await self._server.start()
        self._watcher = asyncio.create_task(self._watch_backend(), name="health-watcher")

    async def _set_health(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    async def _watch_backend(self) -> None:
        """Health follows Triton's model readiness: SERVING only while the model can answer."""
        ready = None
        while True:
            now = await self.backend.is_ready()
            if now != ready:
                log.log(logging.INFO if now else logging.WARNING, "model %s", "ready" if now else "NOT ready")
                await self._set_health(now)
                ready = now
            await asyncio.sleep(self.settings.health_interval_s)

    async def stop(self, grace_s: float) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        self._executor.shutdown(wait=False, cancel_futures=True)


async def run(settings: Settings) -> int:
    """Start (or reach) Triton, start the frontend, serve until SIGINT/SIGTERM, stop both."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async with AsyncExitStack() as stack:
        triton: LocalTriton | None = None
        url = settings.triton_url
        if url is None:
            assert settings.model_repository is not None  # Settings.validated() guarantees it
            ports = TritonPorts(settings.triton_grpc_port, settings.triton_http_port, settings.triton_metrics_port)
            triton = LocalTriton(settings.model_repository, ports, settings.triton_log)
            triton.start()
            stack.callback(triton.stop)
            url = triton.grpc_url
        backend = TritonBackend(
            url,
            settings.model_name,
            request_max_tokens=settings.triton_request_max_tokens,
            max_message_bytes=settings.max_message_bytes,
        )
        stack.push_async_callback(backend.close)

        log.info("waiting for model %r on Triton at %s", settings.model_name, url)
        if not await _wait_for_model(backend, triton, settings, stop):
            return 1 if not stop.is_set() else 0
        model = await backend.model_info()
        max_length = min(settings.max_length or model.max_length, model.max_length)
        tokenizer = PairTokenizer.from_dir(tokenizer_folder(settings, model), max_length)

        frontend = Frontend(settings, backend, model, tokenizer)
        await frontend.start()
        print(
            f"rerank: serving {model.source_model} ({model.precision}, max {max_length} tokens) "
            f"on {settings.host}:{frontend.port}; Triton at {url}",
            flush=True,
        )
        await _until_stopped(stop, triton)
        log.info("stopping: in-flight calls have %.0fs to finish", settings.shutdown_grace_s)
        await frontend.stop(settings.shutdown_grace_s)
    return 0 if triton is None or stop.is_set() else 1


async def _wait_for_model(
    backend: TritonBackend, triton: LocalTriton | None, settings: Settings, stop: asyncio.Event
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.startup_timeout_s
    while not await backend.is_ready():
        if stop.is_set():
            return False
        if triton is not None and triton.exit_code() is not None:
            log.error("tritonserver exited with %s during start-up:\n%s", triton.exit_code(), triton.log_tail())
            return False
        if loop.time() > deadline:
            log.error("model %r not ready after %.0fs", settings.model_name, settings.startup_timeout_s)
            if triton is not None:
                log.error("tritonserver log:\n%s", triton.log_tail())
            return False
        await asyncio.sleep(0.5)
    return True


async def _until_stopped(stop: asyncio.Event, triton: LocalTriton | None) -> None:
    """Wait for a stop signal; a local Triton that dies ends the wait too."""
    while not stop.is_set():
        if triton is not None and triton.exit_code() is not None:
            log.error("tritonserver exited with %s:\n%s", triton.exit_code(), triton.log_tail())
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
