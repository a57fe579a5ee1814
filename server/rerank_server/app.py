"""Assembles and runs the frontend: the gRPC server with its health and reflection services, the
call policy (auth, draining, metrics), and the local Triton it may supervise. `run()` is what
`rerank serve` calls.

Lifecycle: start (or reach) Triton, wait for the model, serve. On SIGTERM or Ctrl-C: health turns
NOT_SERVING, clients are moved away (gRPC's GOAWAY, HTTP connections closed after their answer), in-flight
calls get up to --shutdown-grace-s to finish, then the server and the local Triton stop and the process
exits 0. A local Triton that dies is restarted with backoff while the frontend keeps answering (UNAVAILABLE,
fast) until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from rerank_client import message_size_options
from rerank_client.pb import SERVICE_NAME
from rerank_server.calls import Calls
from rerank_server.core import build_core
from rerank_server.handlers import health_service_handler, rerank_service_handler
from rerank_server.http_api.server import HttpFrontend
from rerank_server.interceptors import CallPolicy
from rerank_server.models import Loader, ModelSync, ServedModel, ServedModels
from rerank_server.observability import Metrics
from rerank_server.service import RerankService
from rerank_server.settings import Settings
from rerank_server.tokenization import PairTokenizer
from rerank_server.triton_backend import ModelInfo, TritonServer
from rerank_server.triton_launcher import LocalTriton, TritonPorts, ports_in_use

log = logging.getLogger(__name__)

RERANK_SERVICE = SERVICE_NAME
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# "" is the server as a whole, RERANK_SERVICE the API: both SERVING only while every served model is ready.
HEALTH_SERVICES = ("", RERANK_SERVICE)
# Seconds the streams that are no calls (health watches, reflection) are given once the drain's calls are done.
STREAMS_LEFT_S = 1.0

# For liveness probes: SERVING while the process runs (until it drains), whatever Triton's state, so
# that a Triton outage makes pods unready without getting healthy frontends restarted.
LIVENESS_SERVICE = "liveness"
# Longest one look at Triton's models may take (each Triton call in it is bounded at 10 s; tokenizers load).
REFRESH_TIMEOUT_S = 60.0


def model_health_service(name: str) -> str:
    """The health service name of one served model: SERVING while it is served and ready."""
    return f"{RERANK_SERVICE}/{name}"


def tokenizer_folder(settings: Settings, model: ModelInfo) -> Path:
    if settings.tokenizer is not None:
        return settings.tokenizer
    if settings.model_repository is None:
        raise ValueError(
            "with --triton-url, give --tokenizer or --model-repository so the frontend finds the tokenizer"
        )
    return settings.model_repository / model.name / model.version / model.tokenizer_dir


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        *message_size_options(settings.max_message_bytes),
        # Clients keep connections alive with pings every 30 s (the SDK's default); allow them.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 60_000),
        # Old connections are closed gracefully so that clients rebalance onto new replicas: new calls
        # go elsewhere at once, and calls in flight may finish however long they take (no grace limit:
        # a 1,000-document call can take minutes on a CPU).
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        # Calls that arrive faster than the event loop takes them wait in gRPC's own queue; past its default of
        # 1,000 gRPC cancels them (CANCELLED, which no client retries). A burst of a few thousand small calls is
        # a busy service's normal load: they wait, and admission answers each (overload: RESOURCE_EXHAUSTED).
        ("grpc.server.max_pending_requests", 10_000),
        ("grpc.server.max_pending_requests_hard_limit", 30_000),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def model_loader(settings: Settings, server: TritonServer) -> Loader:
    """How a model Triton has made ready becomes a ServedModel: its tokenizer read, its length capped."""

    async def load(info: ModelInfo) -> ServedModel:
        max_length = min(settings.max_length or info.max_length, info.max_length)
        folder = tokenizer_folder(settings, info)
        tokenizer = await asyncio.to_thread(PairTokenizer.from_dir, folder, max_length)
        # Its requests name its export: a re-export reloaded before the watcher looks refuses them (StaleModelError).
        return ServedModel(info, tokenizer, server.backend(info.name, info.export_id))

    return load


class Frontend:
    """The grpc.aio server with RerankService, grpc.health.v1 and reflection, over the served models;
    `sync` (None: a fixed set) keeps them in step with Triton."""

    def __init__(
        self,
        settings: Settings,
        models: ServedModels,
        metrics: Metrics,
        sync: ModelSync | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.sync = sync
        self.metrics = metrics
        metrics.served_models = lambda: [(name, models.get(name).info.precision) for name in models.names()]
        self.health = health.aio.HealthServicer()
        # Calls in flight and draining, over gRPC and HTTP alike.
        self.calls = Calls(metrics)
        self.policy = CallPolicy(self.calls, settings.bearer_token)
        # One core for every API surface and model: the gRPC servicer here, the HTTP routes beside it.
        self.core = build_core(settings, models, metrics)
        # A call Triton refused as made for a replaced export makes the watcher look at once.
        self.core.on_stale_model = self._follow_stale
        service = RerankService(self.core, settings)
        self._server = grpc.aio.server(interceptors=[self.policy], options=server_options(settings))
        self._server.add_generic_rpc_handlers((rerank_service_handler(service, settings.max_documents),))
        self._server.add_generic_rpc_handlers((health_service_handler(self.health),))
        reflection.enable_server_reflection((RERANK_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server)
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        # Probes that can do neither TLS nor tokens (Kubernetes' grpc probe) get health alone, in plaintext.
        self._health_server: grpc.aio.Server | None = None
        if settings.health_port:
            self._health_server = grpc.aio.server()
            self._health_server.add_generic_rpc_handlers((health_service_handler(self.health),))
            self._health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
        # The HTTP/JSON APIs on the same loop, core, admission budget, token and TLS files (--http-port 0: off).
        self.http = HttpFrontend(settings, self.core, self.calls) if settings.http_port else None
        self._watcher: asyncio.Task[None] | None = None
        self._following = asyncio.Lock()  # one look at Triton's models at a time (the watcher's, or a call's)
        # Looks that calls refused as stale asked for, by model: one at a time that they all await, and no new one
        # within --health-interval-s of the last, so a burst of such calls makes one look, not one each.
        self._stale_looks: dict[str, asyncio.Task[None]] = {}
        self._stale_looked_at: dict[str, float] = {}
        self._health_names: set[str] = set()  # every model ever served, for its own health service

    async def start(self) -> None:
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._server.start()
        if self.http is not None:
            await self.http.start()
        if self._health_server is not None:
            await self._health_server.start()
        # Ready only once every surface listens: a probe's SERVING must not precede the HTTP port.
        await self._follow_triton()
        await self._set_health()
        self._watcher = asyncio.create_task(self._watch_models(), name="health-watcher")

    async def _set_health(self) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, _status(self.models.all_ready()))
        self._health_names.update(self.models.names())
        for name in sorted(self._health_names):
            await self.health.set(model_health_service(name), _status(self.models.is_ready(name)))

    async def _follow_triton(self, stale: ServedModel | None = None) -> None:
        """One look at Triton's models, serving what it serves now; `stale`: a call found that model replaced in
        Triton, and the look is made now, unless one since has already replaced it."""
        if self.sync is None:
            return
        async with self._following:
            if stale is not None and self.models.find(stale.name) is not stale:
                return
            try:
                # Bounded: one look that hangs (a tokenizer read, a Triton call) must not freeze the served set.
                retired = await asyncio.wait_for(self.sync.refresh(self.models), timeout=REFRESH_TIMEOUT_S)
            except Exception:  # the watcher must outlive any one look at Triton
                log.exception("following Triton's models failed; trying again")
                return
            for model in retired:
                self.core.cache.forget(model.cache_key)

    async def _follow_stale(self, stale: ServedModel) -> None:
        """A call found `stale` replaced in Triton: the look it waits for (the one in flight for that model, or a new
        one unless the model was replaced since or looked at within --health-interval-s; the watcher looks then)."""
        look = self._stale_looks.get(stale.name)
        if look is None or look.done():
            now = time.monotonic()
            recent = now - self._stale_looked_at.get(stale.name, -math.inf) < self.settings.health_interval_s
            if self.models.find(stale.name) is not stale or recent:
                return
            self._stale_looked_at[stale.name] = now
            look = asyncio.ensure_future(self._follow_triton(stale))
            self._stale_looks[stale.name] = look
        await asyncio.shield(look)  # a caller that gives up leaves the look to the others

    async def _watch_models(self) -> None:
        """Health follows Triton: SERVING only while every served model can answer; the served set
        follows its model control."""
        state = None
        while True:
            try:
                await self._follow_triton()
                now = (self.models.all_ready(), tuple(self.models.names()))
                if now != state:
                    waiting = [name for name in now[1] if not self.models.is_ready(name)]
                    if now[0]:
                        log.info("models ready: %s", ", ".join(now[1]))
                    else:
                        log.warning("models NOT ready: %s", ", ".join(waiting) or "none served")
                        if state is not None and state[0]:
                            self.metrics.model_unready.inc()
                    state = now
                await self._set_health()
            except Exception:  # a watcher that died would freeze health and the served set for good
                log.exception("the model watcher's round failed; going on")
            await asyncio.sleep(self.settings.health_interval_s)

    async def drain(self, grace_s: float) -> None:
        """NOT_SERVING, move clients away (gRPC's GOAWAY; HTTP answers close their connections), let in-flight
        calls finish, then stop."""
        if self._watcher is not None:
            self._watcher.cancel()
        self.calls.draining = True
        await self.health.enter_graceful_shutdown()
        # GOAWAY now, not at the end: a client's channel reconnects at once (to another replica: this one
        # stops listening), and gRPC retries on the new connection the calls the GOAWAY refused, while the
        # calls in flight here keep their connection for up to grace_s. Refused on an open connection instead,
        # a client whose one connection a Kubernetes Service pinned here would fail until the drain ended.
        stopping = asyncio.ensure_future(self._server.stop(grace_s))
        if not await self.calls.wait_idle(grace_s):
            log.warning("%d calls still in flight after %.0fs; ending them", self.calls.inflight, grace_s)
        # What is left are no calls: health watches and reflection streams, which would hold the stop for all of
        # grace_s. A second, if shorter, grace lets the last answers be written.
        await self._server.stop(STREAMS_LEFT_S)
        if self.http is not None:
            await self.http.stop()
        await stopping
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.core.close()


async def supervise(
    triton: LocalTriton,
    stop: asyncio.Event,
    metrics: Metrics,
    backoff: tuple[float, ...],
    healthy_s: float,
    live: Callable[[], Awaitable[bool]] | None = None,
    hung_s: float = 0.0,
) -> None:
    """Restart the local Triton whenever it exits, with backoff, until the frontend stops.

    `backoff` (--triton-restart-backoff-s) are the delays, the last one repeating. The delay grows with
    consecutive failures only: a Triton that ran `healthy_s` (--triton-healthy-s) or longer before dying
    is restarted after the first delay again (a crash now and then is not a crash loop).

    A Triton that answered since it started (the first one has: supervision starts once its models are
    ready), then has not for `hung_s` (--triton-hung-s; 0: never), is killed, and so restarted: a process
    that is alive but stuck (a deadlock, a crash whose signal handler never returned) would otherwise fail
    every call until someone restarts the pod. A restarted one is loading its models until it first
    answers, which may take long; --startup-timeout-s bounds the first start.
    """
    loop = asyncio.get_running_loop()
    failures = 0
    started = loop.time()  # when the running Triton was (re)started
    # When the running Triton last answered: supervision starts once it has served its models' readiness,
    # so it has answered now; a restarted one has not until its first live() answer.
    answered: float | None = loop.time()
    probe = live if hung_s > 0 else None  # None: a running Triton is never judged hung
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        code = triton.exit_code()
        if stop.is_set():
            continue
        if code is None:
            if probe is not None and await probe():
                answered = loop.time()
            elif answered is not None and loop.time() - answered >= hung_s:
                silent_s, answered = loop.time() - answered, None
                log.error(
                    "tritonserver has not answered for %.0fs; killing it. Log tail:\n%s", silent_s, triton.log_tail()
                )
                triton.kill()  # the next round sees it exited and restarts it
            continue
        answered = None
        if loop.time() - started >= healthy_s:
            failures = 0
        delay = backoff[min(failures, len(backoff) - 1)]
        log.error("tritonserver exited with %s; restarting in %.0fs. Log tail:\n%s", code, delay, triton.log_tail())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if not stop.is_set():
            failures += 1
            started = loop.time()
            metrics.triton_restarts.inc()
            try:
                triton.start()
            except Exception:  # keep supervising: the next round retries with a longer delay
                log.exception("restarting tritonserver failed")


def raise_descriptor_limit() -> None:
    """Lift the soft limit on open files to the hard one: each connection costs a descriptor, and the
    soft limit (often 1,024) is what an idle-connection flood reaches first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open-file limit raised from %d to %d", soft, hard)


async def run(settings: Settings) -> int:
    """Start (or reach) Triton, start the frontend, serve until SIGINT/SIGTERM, drain, stop both."""
    raise_descriptor_limit()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    metrics = Metrics()
    if settings.triton_url is None:
        taken = ports_in_use(
            {
                "--triton-grpc-port": settings.triton_grpc_port,
                "--triton-http-port": settings.triton_http_port,
                "--triton-metrics-port": settings.triton_metrics_port,
            }
        )
        if taken:
            log.error(
                "the ports of the Triton this server starts are in use on this host (%s): another `rerank serve` or "
                "Triton runs here. Give this one ports of its own (those flags, and --port, --http-port and "
                "--metrics-port), or serve through that Triton with --triton-url",
                ", ".join(taken),
            )
            return 1
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.host, settings)

    async with AsyncExitStack() as stack:
        triton: LocalTriton | None = None
        url = settings.triton_url
        if url is None:
            assert settings.model_repository is not None  # Settings.validated() guarantees it
            ports = TritonPorts(settings.triton_grpc_port, settings.triton_http_port, settings.triton_metrics_port)
            triton = LocalTriton(
                settings.model_repository,
                ports,
                settings.triton_log,
                home=settings.triton_home,
                python_env=settings.triton_python_env,
                models=settings.model_names,
            )
            triton.start()
            stack.callback(triton.stop)
            url = triton.grpc_url
        server = TritonServer(
            url,
            request_max_tokens=settings.triton_request_max_tokens,
            max_message_bytes=settings.max_message_bytes,
            metrics=metrics,
            local=triton is not None,
        )
        stack.push_async_callback(server.close)
        sync = ModelSync(server, model_loader(settings, server), settings.model_names)

        wanted = ", ".join(settings.model_names) if settings.model_names else "every model it loads"
        log.info("waiting for %s on Triton at %s", wanted, url)
        found = await _wait_for_models(sync, triton, settings, stop)
        if not found:
            return 0 if stop.is_set() else 1
        names = sorted(model.name for model in found)
        default = settings.default_model or (settings.model_names or names)[0]
        if default not in names:
            log.error("the default model %r is not among the models Triton has loaded: %s", default, names)
            return 1
        models = ServedModels(found, default)

        frontend = Frontend(settings, models, metrics, sync)
        await frontend.start()
        supervisor = (
            asyncio.create_task(
                supervise(
                    triton,
                    stop,
                    metrics,
                    settings.restart_backoff,
                    settings.triton_healthy_s,
                    server.is_live,
                    settings.triton_hung_s,
                )
            )
            if triton is not None
            else None
        )
        served = ", ".join(
            f"{m.name} ({'default; ' if m.name == default else ''}{m.info.source_model}, {m.info.precision}, "
            f"max {m.tokenizer.max_length} tokens)"
            for m in (models.get(name) for name in names)
        )
        print(
            f"rerank: serving {served} on {settings.host}:{frontend.port}"
            + (f"; HTTP on {settings.host}:{frontend.http.port}" if frontend.http is not None else "")
            + (f"; metrics on {settings.host}:{settings.metrics_port}" if settings.metrics_port else "")
            + f"; Triton at {url}",
            flush=True,
        )
        await stop.wait()
        log.info("draining: in-flight calls have %.0fs to finish", settings.shutdown_grace_s)
        await frontend.drain(settings.shutdown_grace_s)
        if supervisor is not None:
            await supervisor
    log.info("stopped")
    return 0


async def _wait_for_models(
    sync: ModelSync, triton: LocalTriton | None, settings: Settings, stop: asyncio.Event
) -> list[ServedModel]:
    """The models to serve, once Triton has them ready; [] when stopped, Triton died or time ran out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.startup_timeout_s
    while not (found := await sync.discover()):
        if stop.is_set():
            return []
        if triton is not None and triton.exit_code() is not None:
            log.error("tritonserver exited with %s during start-up:\n%s", triton.exit_code(), triton.log_tail())
            return []
        if loop.time() > deadline:
            wanted = settings.model_names or "any model"
            log.error("%s not ready after %.0fs", wanted, settings.startup_timeout_s)
            if triton is not None:
                log.error("tritonserver log:\n%s", triton.log_tail())
            return []
        await asyncio.sleep(0.1)  # a repository index: cheap, and start-up ends sooner
    return found


def _status(ready: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
