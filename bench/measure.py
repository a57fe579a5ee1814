"""Measuring one system on one workload: in-process engines and baselines request by request, and the
served stack under its workload's concurrent clients; each gives one measurement (a results.json row)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import Progress
from bench.workloads import Request, Workload


def pair_inputs(tokenizer: Any, request: Request) -> tuple[np.ndarray, np.ndarray]:
    """The ragged batch the frontend would send: ids laid end to end, and each pair's length."""
    encoded = tokenizer.encode_batch([(request.query, d) for d in request.documents])
    lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
    if tuple(lengths.tolist()) != request.pair_lengths:
        raise RuntimeError("the exported tokenizer disagrees with the planned pair lengths")
    return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encoded]), lengths


def latency_summary(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000
    return {
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }


def measurement(
    system: str,
    workload: Workload,
    *,
    repeats: int,
    latencies: list[float],
    wall_s: float,
    pairs: int,
    tokens: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "system": system,
        "workload": workload.kind,
        "workload_title": workload.title,
        "concurrency": workload.concurrency,
        "repeats": repeats,
        "requests": len(latencies),
        "pairs": pairs,
        "tokens": tokens,
        "wall_s": wall_s,
        "pairs_per_s": pairs / wall_s,
        "tokens_per_s": tokens / wall_s,
        "latency_ms": latency_summary(latencies),
        **extra,
    }


def timed_requests(
    system: str,
    workload: Workload,
    repeats: int,
    score: Callable[[int], np.ndarray],
    progress: Progress,
    padding_waste: float,
) -> tuple[dict[str, Any], np.ndarray]:
    """Score the workload's requests one after the other, `repeats` times; score(i) scores request i.
    Returns the measurement and the last request's logits."""
    progress.stage(f"{system} {workload.name}")
    latencies: list[float] = []
    last = np.zeros(0)
    start = time.perf_counter()
    for _ in range(repeats):
        for index, request in enumerate(workload.requests):
            t0 = time.perf_counter()
            last = np.asarray(score(index))
            latencies.append(time.perf_counter() - t0)
            progress.advance(request.pairs)
    wall = time.perf_counter() - start
    result = measurement(
        system,
        workload,
        repeats=repeats,
        latencies=latencies,
        wall_s=wall,
        pairs=workload.pairs * repeats,
        tokens=workload.tokens * repeats,
        padding_waste=padding_waste,
    )
    return result, last


def run_inprocess(
    system: str, engine: Any, tokenizer: Any, workload: Workload, repeats: int, progress: Progress
) -> tuple[dict[str, Any], np.ndarray]:
    """Score each request with PackedReranker.score, one after the other (tokenizing is not timed)."""
    inputs = [pair_inputs(tokenizer, r) for r in workload.requests]
    padded = sum(b.padded_tokens for _, lengths in inputs for b in engine.plan(lengths))
    real = sum(int(lengths.sum()) for _, lengths in inputs)
    return timed_requests(system, workload, repeats, lambda i: engine.score(*inputs[i]), progress, padded / real)


def run_batched(
    system: str,
    workload: Workload,
    repeats: int,
    predict: Callable[[Request], np.ndarray],
    progress: Progress,
    order: Callable[[Request], np.ndarray] | None = None,
    batch: int = 32,
) -> tuple[dict[str, Any], np.ndarray]:
    """A baseline that scores each request's pairs in batches of `batch` padded to their longest:
    `predict` maps a request to its pairs' logits; `order` is the order it batches them in (None:
    request order), used to count its padding."""
    padded = 0
    for request in workload.requests:
        lengths = np.asarray(request.pair_lengths)
        if order is not None:
            lengths = lengths[order(request)]
        padded += sum(
            int(lengths[i : i + batch].max()) * lengths[i : i + batch].size for i in range(0, lengths.size, batch)
        )
    requests = workload.requests
    return timed_requests(system, workload, repeats, lambda i: predict(requests[i]), progress, padded / workload.tokens)


def run_crossencoder(
    model: Any, workload: Workload, repeats: int, progress: Progress
) -> tuple[dict[str, Any], np.ndarray]:
    """model.predict over each request's pairs with its defaults (batch_size 32, length-sorted batches)."""

    def by_characters(request: Request) -> np.ndarray:
        # CrossEncoder orders pairs by length (characters), longest first, and pads each batch of 32.
        return np.argsort([-(len(request.query) + len(d)) for d in request.documents], kind="stable")

    return run_batched(
        "crossencoder",
        workload,
        repeats,
        lambda request: model.predict([(request.query, d) for d in request.documents]),
        progress,
        order=by_characters,
    )


def run_served(
    stack: Any, workload: Workload, repeats: int, sampler: Any, progress: Progress, system: str = "served"
) -> dict[str, Any]:
    from bench.served import drive

    progress.stage(f"{system} {workload.name} c{workload.concurrency}")
    sampler.reset_peaks()
    stack.settled_metrics()  # statistics of executions before this run are in `before`
    before = stack.snapshot()
    completed = asyncio.run(drive(stack.target, workload, repeats, progress.advance))
    after = stack.snapshot()
    wall = after.wall - before.wall
    frontend_cpu = after.frontend_cpu - before.frontend_cpu
    triton_cpu = after.triton_cpu - before.triton_cpu
    settled = stack.settled_metrics()  # the run's times come from `after`; its Triton statistics from here
    delta = {k: settled.get(k, 0.0) - before.metrics.get(k, 0.0) for k in settled}
    real = delta.get("rerank_model_tokens_total:real", 0.0)
    padded = delta.get("rerank_model_tokens_total:padded", 0.0)
    executions = delta.get("nv_inference_exec_count", 0.0)
    served_tokens = sum(c.tokens for c in completed)
    if served_tokens != workload.tokens * repeats:
        progress.log(
            f"  note: the server counted {served_tokens} tokens, the workload plans {workload.tokens * repeats}"
        )
    return measurement(
        system,
        workload,
        repeats=repeats,
        latencies=[c.latency_s for c in completed],
        wall_s=wall,
        pairs=sum(c.pairs for c in completed),
        tokens=served_tokens,
        padding_waste=padded / real if real else None,
        frontend_cpu_s=frontend_cpu,
        triton_cpu_s=triton_cpu,
        client_cpu_s=after.client_cpu - before.client_cpu,
        frontend_cpu_share=frontend_cpu / (frontend_cpu + triton_cpu) if frontend_cpu + triton_cpu else None,
        cpu_utilisation=(frontend_cpu + triton_cpu) / (wall * len(os.sched_getaffinity(0))),
        frontend_peak_rss_mib=sampler.peak_frontend / 2**20,
        triton_peak_rss_mib=sampler.peak_triton / 2**20,
        triton={
            "executions": executions,
            "requests": delta.get("nv_inference_request_success", 0.0),
            "requests_per_execution": delta.get("nv_inference_count", 0.0) / executions if executions else None,
            "queue_s": delta.get("nv_inference_queue_duration_us", 0.0) / 1e6,
            "compute_s": delta.get("nv_inference_compute_infer_duration_us", 0.0) / 1e6,
        },
    )
