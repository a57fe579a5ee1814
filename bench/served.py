"""The served path under load: `rerank serve` (frontend + local Triton) as a child process, the
psutil sampling of its processes, Triton's metrics, and asyncio clients driving it."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import RERANK, TOKENIZER_DIR
from bench.workloads import Request, Workload
from rerank_client import AsyncRerankClient
from rerank_server.testing import free_port, save_random_checkpoint, wait_until_serving
from rerank_server.triton_launcher import tail

TRITON_NAMES = ("tritonserver", "triton_python_backend_stub")
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$")


def process_cpu(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of these processes (children not included); gone processes count 0."""
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def process_rss(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Sampler:
    """Samples the RSS of the frontend and of Triton (tritonserver + its Python-backend stubs)."""

    def __init__(self, frontend: psutil.Process, triton: list[psutil.Process], interval_s: float = 0.2) -> None:
        self.frontend, self.triton, self.interval_s = frontend, triton, interval_s
        self.peak_frontend = 0
        self.peak_triton = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def reset_peaks(self) -> None:
        self.peak_frontend = process_rss([self.frontend])
        self.peak_triton = process_rss(self.triton)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_frontend = max(self.peak_frontend, process_rss([self.frontend]))
            self.peak_triton = max(self.peak_triton, process_rss(self.triton))

    def start(self) -> None:
        self.reset_peaks()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def export_random(
    work: Path, seed: int = 0, export_args: Sequence[str] = ("--precision", "fp32"), **config: Any
) -> Path:
    """A random-weight checkpoint of `config`'s sizes saved in `work` (once) and exported by `rerank export`
    with `export_args` (fp32 unless they say otherwise) into work/repository: the model repository."""
    checkpoint = work / "checkpoint"
    if not checkpoint.exists():
        save_random_checkpoint(checkpoint, TOKENIZER_DIR, seed=seed, **config)
    repository = work / "repository"
    export = [RERANK, "export", "--model", str(checkpoint), "--output", str(repository), "--overwrite"]
    done = subprocess.run([*export, *export_args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"rerank export failed:\n{done.stderr[-3000:]}")
    return repository


@dataclass
class Snapshot:
    wall: float
    frontend_cpu: float
    triton_cpu: float
    client_cpu: float
    metrics: dict[str, float]


@dataclass
class ServedStack:
    """A running `rerank serve --model-repository ...` with its own ports."""

    process: subprocess.Popen[bytes]
    target: str
    metrics_url: str
    log_path: Path
    frontend: psutil.Process
    triton: list[psutil.Process] = field(default_factory=list)
    http_url: str = ""
    frontend_metrics_url: str = ""

    @classmethod
    def start(
        cls, repository: Path, log_path: Path, timeout_s: float = 900.0, extra_args: Sequence[str] = ()
    ) -> ServedStack:
        port, grpc_port, http_port, metrics_port, frontend_metrics_port, frontend_http_port = (
            free_port() for _ in range(6)
        )
        command = [
            RERANK,
            "serve",
            f"--model-repository={repository}",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--http-port={frontend_http_port}",
            f"--triton-grpc-port={grpc_port}",
            f"--triton-http-port={http_port}",
            f"--triton-metrics-port={metrics_port}",
            f"--metrics-port={frontend_metrics_port}",
            "--log-level=WARNING",
            *extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        target = f"127.0.0.1:{port}"
        if not wait_until_serving(target, process, timeout_s):
            code = process.poll()
            process.kill()
            why = f"exited with {code}" if code is not None else f"did not start within {timeout_s:.0f}s"
            raise RuntimeError(f"rerank serve {why}:\n{tail(log_path)}")
        frontend = psutil.Process(process.pid)
        triton = [p for p in frontend.children(recursive=True) if p.name() in TRITON_NAMES]
        if not any(p.name() == "tritonserver" for p in triton):
            raise RuntimeError("no tritonserver process under rerank serve")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        http_url = f"http://127.0.0.1:{frontend_http_port}"
        frontend_metrics_url = f"http://127.0.0.1:{frontend_metrics_port}/metrics"
        return cls(process, target, metrics_url, log_path, frontend, triton, http_url, frontend_metrics_url)

    def servers(self) -> list[psutil.Process]:
        """The tritonserver process."""
        return [p for p in self.triton if p.name() == "tritonserver"]

    def stubs(self, model: str | None = None) -> list[psutil.Process]:
        """The Python-backend stubs (one per model instance), of `model` only when named: a stub is started
        with its model's path."""
        marker = None if model is None else f"{os.sep}{model}{os.sep}"
        return [
            p
            for p in self.triton
            if p.name() == "triton_python_backend_stub" and (marker is None or any(marker in a for a in p.cmdline()))
        ]

    def stop(self, timeout_s: float = 60.0) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def metrics(self) -> dict[str, float]:
        """Triton's Prometheus metrics of the model, summed over label sets that differ only by version."""
        return scrape(self.metrics_url)

    def settled_metrics(self, timeout_s: float = 5.0) -> dict[str, float]:
        """metrics() once two reads 0.1 s apart agree: the model answers each request as soon as its pairs are
        scored, and Triton records the execution's statistics (nv_inference_exec_count, compute times) only
        after the execution ends, just after the last answer a run's client saw."""
        deadline = time.perf_counter() + timeout_s
        previous, current = None, self.metrics()
        while current != previous and time.perf_counter() < deadline:
            time.sleep(0.1)
            previous, current = current, self.metrics()
        return current

    def frontend_metrics(self) -> dict[str, float]:
        """The frontend's Prometheus metrics, summed over models (and other labels but `kind`)."""
        return scrape(self.frontend_metrics_url)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            time.perf_counter(),
            process_cpu([self.frontend]),
            process_cpu(self.triton),
            self_cpu(),
            self.metrics(),
        )


def scrape(url: str, where: dict[str, str] | None = None) -> dict[str, float]:
    """Prometheus metrics by name (name:kind where a `kind` label is set), summed over other labels;
    `where`: only the series with these label values."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC.match(line.strip())
        if not match or match.group(3) == "NaN":
            continue
        name, labels = match.group(1), match.group(2) or ""
        if where and not all(f'{key}="{value}"' in labels for key, value in where.items()):
            continue
        kind = re.search(r'kind="([^"]+)"', labels)
        key = f"{name}:{kind.group(1)}" if kind else name
        values[key] = values.get(key, 0.0) + float(match.group(3))
    return values


@dataclass
class Completed:
    latency_s: float
    pairs: int
    tokens: int  # usage.input_tokens as the server counted them


async def drive(
    target: str, workload: Workload, repeats: int, on_done: Callable[[int], None], timeout_s: float = 3600.0
) -> list[Completed]:
    """Every client of the workload sends its requests `repeats` times, one at a time; all clients at once."""
    done: list[Completed] = []

    async def client(requests: tuple[Request, ...]) -> None:
        async with AsyncRerankClient(target, timeout=timeout_s) as rerank:
            for _ in range(repeats):
                for request in requests:
                    start = time.perf_counter()
                    response = await rerank.rerank(request.query, list(request.documents))
                    latency = time.perf_counter() - start
                    if len(response.results) != request.pairs:
                        raise RuntimeError(f"{len(response.results)} results for {request.pairs} documents")
                    done.append(Completed(latency, request.pairs, int(response.usage.input_tokens)))
                    on_done(request.pairs)

    await asyncio.gather(*(client(requests) for requests in workload.clients))
    return done


async def served_logits(
    target: str, request: Request, timeout_s: float = 3600.0, model: str | None = None
) -> tuple[np.ndarray, str]:
    """One rerank call's logits in document order, and the precision GetModelInfo reports, of `model` (None:
    the default one)."""
    async with AsyncRerankClient(target, timeout=timeout_s) as rerank:
        info = await rerank.model_info(model=model)
        response = await rerank.rerank(request.query, list(request.documents), model=model)
    logits = np.full(request.pairs, np.nan)
    for result in response.results:
        logits[result.index] = result.logit
    return logits, str(info.precision)
