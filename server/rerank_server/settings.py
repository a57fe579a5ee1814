"""Every setting of the frontend, in one place: a flag, a RERANK_* environment variable and a default each.

Precedence: command-line flag > environment variable > default. `Settings.describe()` is what
`rerank serve` prints at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rerank_server import flags
from rerank_server.flags import option

ENV_PREFIX = "RERANK_"


@dataclass(frozen=True)
class Settings:
    # Where the frontend listens.
    host: str = option("0.0.0.0", "address the gRPC frontend binds")
    port: int = option(50051, "port of the gRPC frontend")
    # The HTTP/JSON surfaces (Cohere, Jina, TEI, NIM and vLLM APIs) beside gRPC, on the same core.
    http_port: int = option(8080, "port of the HTTP/JSON frontend (Cohere, Jina, TEI, NIM, vLLM APIs; 0: off)")
    http_timeout_s: float = option(
        120.0, "deadline of an HTTP call, which has no gRPC deadline to carry one (504 past it)"
    )
    http_header_timeout_s: float = option(
        10.0, "time from a request's first byte to the end of its headers (408 and closed past it)"
    )
    http_body_timeout_s: float = option(
        60.0,
        "time from the end of a request's headers to the end of its body (408 and closed past it; closed, if "
        "the answer went before the body ended)",
    )
    http_idle_timeout_s: float = option(
        30.0,
        "an HTTP connection that opens, or finishes a request, and sends nothing for this long is closed; an "
        "answer the client stops reading for this long is dropped and the connection reset",
    )
    # Which Triton, and which model on it.
    model_repository: Path | None = option(
        None, "Triton model repository made by `rerank export`; read for the tokenizer, and served by a local Triton"
    )
    triton_url: str | None = option(
        None, "HOST:PORT of a running Triton's gRPC endpoint; without it `serve` starts a local tritonserver"
    )
    model_name: str | None = option(
        None,
        "models to serve, comma-separated names in the Triton repository (default: every model Triton has "
        "loaded, following the loads and unloads of its model control)",
    )
    default_model: str | None = option(
        None, "the model that answers requests naming none (default: the first of --model-name, else the first by name)"
    )
    tokenizer: Path | None = option(
        None, "folder holding tokenizer.json (default: the one `rerank export` put in the model repository)"
    )
    # Request limits.
    max_length: int | None = option(
        None, "tokens per (query, document) pair, special tokens included (default: the model's limit)"
    )
    max_query_tokens: int = option(2048, "longest query accepted, in tokens")
    max_documents: int = option(1000, "most documents (Rerank) or pairs (Score) accepted in one request")
    max_total_tokens: int = option(
        524288, "most tokens one request may feed the model, over all pairs and windows (RESOURCE_EXHAUSTED past it)"
    )
    chunk_overlap_tokens: int = option(
        64, "tokens consecutive windows share with CHUNK truncation when a request leaves chunk_overlap unset"
    )
    stream_max_in_flight: int = option(32, "messages of one RerankStream scored at once")
    # 16 MiB: the token budget's text is about 2.5 MB, and four refused messages of this size delay other
    # callers by about 100 ms where 60 MiB ones take 275 ms (docs/security.md, python -m bench.messages).
    max_message_bytes: int = option(
        16 * 1024 * 1024, "largest gRPC message or HTTP body accepted (and gRPC message sent), in bytes"
    )
    # How work reaches Triton.
    triton_request_max_tokens: int = option(
        16384, "a rerank request is split into Triton requests of at most this many tokens (length-sorted)"
    )
    tokenizer_threads: int = option(2, "threads that tokenize requests, off the event loop")
    tokenize_queue_max: int = option(
        256,
        "calls tokenizing or waiting for a tokenizer thread at once; past it calls get RESOURCE_EXHAUSTED at once",
    )
    # Backpressure.
    max_inflight_tokens: int = option(
        1048576,
        "tokens admitted to the model at once over all calls; past it calls get RESOURCE_EXHAUSTED at once "
        "(size it to throughput x the latency you accept; at least max_total_tokens)",
    )
    background_inflight_share: float = option(
        0.75,
        "share of max_inflight_tokens that calls above priority 0 may hold together; the rest stays free for "
        "calls at 0, so background work is refused first under load (1: no reserve)",
    )
    # Repeated work.
    score_cache_bytes: int = option(
        0,
        "memory of the score cache, which answers model inputs (pairs, CHUNK windows) already computed without "
        "the model, least recently used forgotten first (about 240 bytes an input); 0: off",
    )
    # Security.
    tls_cert_file: Path | None = option(None, "PEM certificate chain: serve TLS (with --tls-key-file)")
    tls_key_file: Path | None = option(None, "PEM private key of --tls-cert-file")
    tls_client_ca_file: Path | None = option(None, "PEM CA bundle: require client certificates it signed (mTLS)")
    auth_token: str | None = option(
        None,
        "bearer token callers must send (authorization: Bearer ...). A flag's value shows in `ps` to every "
        "user of the host: prefer --auth-token-file or the environment variable, which do not",
        secret=True,
    )
    auth_token_file: Path | None = option(
        None, "file holding the bearer token (out of `ps` and of the environment; wins over --auth-token)"
    )
    health_port: int | None = option(
        None, "extra plaintext port serving only grpc.health.v1, for probes that cannot do TLS or tokens"
    )
    # Observability.
    metrics_port: int = option(9090, "port of the Prometheus /metrics endpoint (0: none)")
    log_format: str = option("json", "json (one object per line, with request ids) or text")
    otel_exporter: str | None = option(
        None, "trace frontend -> Triton with OpenTelemetry: otlp (OTEL_EXPORTER_OTLP_* variables) or console"
    )
    # Connections.
    max_connection_age_s: float = option(
        300.0, "connections are closed (gracefully) after this age, so clients rebalance across replicas"
    )
    # Local Triton (serve mode without --triton-url).
    triton_grpc_port: int = option(8001, "gRPC port of the local Triton")
    triton_http_port: int = option(8000, "HTTP port of the local Triton")
    triton_metrics_port: int = option(8002, "Prometheus metrics port of the local Triton")
    triton_log: Path | None = option(None, "file the local Triton logs to (default: a temporary file)")
    triton_restart_backoff_s: str = option(
        "1,2,5,10,30", "delays before restarting a local Triton that died, seconds, comma-separated; the last repeats"
    )
    triton_healthy_s: float = option(
        30.0, "a local Triton that ran this long before dying is restarted after the first delay again"
    )
    triton_hung_s: float = option(
        60.0,
        "a local Triton that answered, then has not answered its liveness check for this long, is killed "
        "and restarted (0: never)",
    )
    triton_home: Path | None = option(
        None, "folder laid out like the nvidia-pytriton wheel (pytriton/, nvidia_pytriton.libs/) to run instead of it"
    )
    triton_python_env: Path | None = option(
        None, "Python environment (venv folder, this Python's version) whose packages the model imports in Triton"
    )
    # Lifecycle.
    startup_timeout_s: float = option(600.0, "how long to wait for Triton and the model to become ready")
    health_interval_s: float = option(1.0, "how often Triton's model readiness is checked for the health service")
    shutdown_grace_s: float = option(10.0, "how long in-flight calls may finish after SIGTERM or Ctrl-C")
    log_level: str = option("INFO", "logging level")

    @property
    def bearer_token(self) -> str | None:
        """The token callers must present: --auth-token, or the content of --auth-token-file."""
        if self.auth_token_file is not None:
            return self.auth_token_file.read_text().strip()
        return self.auth_token

    @property
    def restart_backoff(self) -> tuple[float, ...]:
        """--triton-restart-backoff-s as seconds."""
        return tuple(float(delay) for delay in self.triton_restart_backoff_s.split(",") if delay.strip())

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One --flag per setting, its help naming its RERANK_* variable and default."""
        flags.add_arguments(cls, parser, ENV_PREFIX)

    @classmethod
    def load(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from flags (if parsed), then RERANK_* variables, then defaults; values are type-checked."""
        environ = os.environ if environ is None else environ
        return cls(**flags.values(cls, args, environ, ENV_PREFIX)).validated()

    @property
    def model_names(self) -> tuple[str, ...] | None:
        """--model-name as names; None: every model Triton has loaded."""
        if self.model_name is None:
            return None
        names = tuple(dict.fromkeys(name.strip() for name in self.model_name.split(",") if name.strip()))
        return names or None

    def validated(self) -> Settings:
        for name in (
            "port",
            "max_query_tokens",
            "max_documents",
            "max_total_tokens",
            "max_message_bytes",
            "triton_request_max_tokens",
            "stream_max_in_flight",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        from rerank_server.score_cache import ENTRY_BYTES  # here: settings load before anything heavy

        if self.score_cache_bytes < 0 or 0 < self.score_cache_bytes < ENTRY_BYTES:
            raise ValueError(
                f"score_cache_bytes must be 0 (no score cache) or at least {ENTRY_BYTES}, the memory one cached "
                f"input takes (got {self.score_cache_bytes}: it would hold none)"
            )
        names = self.model_names
        if self.default_model is not None and names is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not among model_name's {list(names)}")
        if self.http_port < 0:
            raise ValueError("http_port must be a port number, or 0 for no HTTP frontend")
        for name in ("http_timeout_s", "http_header_timeout_s", "http_body_timeout_s", "http_idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_length is not None and self.max_length < 4:
            raise ValueError("max_length must be at least 4")
        if self.tokenizer_threads < 1:
            raise ValueError("tokenizer_threads must be at least 1")
        if self.tokenize_queue_max < 1:
            raise ValueError("tokenize_queue_max must be at least 1")
        try:
            backoff = self.restart_backoff
        except ValueError:
            raise ValueError("triton_restart_backoff_s must be comma-separated seconds, e.g. 1,2,5") from None
        if not backoff or min(backoff) < 0 or self.triton_healthy_s < 0 or self.triton_hung_s < 0:
            raise ValueError(
                "triton_restart_backoff_s needs at least one delay; delays, triton_healthy_s and triton_hung_s >= 0"
            )
        if self.triton_url is None and self.model_repository is None:
            raise ValueError("give --model-repository (to start a local Triton) or --triton-url")
        if self.max_inflight_tokens < self.max_total_tokens:
            raise ValueError("max_inflight_tokens must be at least max_total_tokens, or large requests never run")
        if not 0 < self.background_inflight_share <= 1:
            raise ValueError("background_inflight_share must be above 0 and at most 1")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both --tls-cert-file and --tls-key-file, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file (mTLS) needs --tls-cert-file and --tls-key-file")
        if self.log_format not in ("json", "text"):
            raise ValueError("log_format must be json or text")
        if self.otel_exporter not in (None, "otlp", "console"):
            raise ValueError("otel_exporter must be otlp or console")
        return self

    def describe(self) -> str:
        """One line per setting, for the start-up log; secrets are masked."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lines.append(f"  {f.name} = {'***' if f.metadata.get('secret') and value else value}")
        return "\n".join(lines)
