"""HTTP beside gRPC: the same `rerank serve` answering workloads (b) and (c) of bench/workloads.py through
the Cohere v2 route (POST /v2/rerank, JSON) and through the gRPC Rerank call, in alternating rounds.

    python -m bench.http                # ModernBERT-base-sized random model, FULL workloads (long on 2 cores)
    python -m bench.http --size demo    # `make demo`'s small model, FULL workloads, a few minutes
    python -m bench.http --quick        # the tests' tiny model on QUICK workloads, ~1 min (a smoke test)

A smaller model makes the HTTP overhead a larger share of each call, so its ratio is the stricter one.

Reports pairs/s per protocol and workload (the median of the rounds) and HTTP / gRPC; the target is
HTTP >= 0.95 x gRPC. Both protocols reach one frontend process, one core and one Triton, so the ratio is
the cost of JSON over HTTP/1.1 against protobuf over HTTP/2, on top of the same scoring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import workloads
from bench.common import RERANK, ROOT, TOKENIZER_DIR
from bench.served import ServedStack
from bench.workloads import Request, Workload
from rerank_client import AsyncRerankClient
from rerank_server.first_contact import DEMO_CONFIG
from rerank_server.testing import TINY_CONFIG, save_random_checkpoint

TARGET_RATIO = 0.95
# Random checkpoints: ModernBERT-base's sizes (transformers' defaults, initializer 0.02), make demo's, the tests'.
SIZES: dict[str, dict[str, Any]] = {"base": {"initializer_range": 0.02}, "demo": DEMO_CONFIG, "tiny": TINY_CONFIG}


Call = Callable[[Request], Awaitable[list[float]]]


async def run_workload(call: Call, workload: Workload, repeats: int) -> float:
    """Every client sends its requests `repeats` times, one at a time, all clients at once; pairs/s."""

    async def client(requests: tuple[Request, ...]) -> int:
        pairs = 0
        for _ in range(repeats):
            for request in requests:
                scores = await call(request)
                if len(scores) != request.pairs:
                    raise RuntimeError(f"{len(scores)} results for {request.pairs} documents")
                pairs += request.pairs
        return pairs

    started = time.perf_counter()
    pairs = sum(await asyncio.gather(*(client(requests) for requests in workload.clients)))
    return pairs / (time.perf_counter() - started)


async def measure(target: str, base_url: str, built: dict[str, Workload], rounds: int, repeats: int) -> dict[str, Any]:
    # aiohttp, not httpx: the client shares the machine's cores with the server, and a pure-Python HTTP client
    # costs more CPU per call than gRPC's C core, which would charge the client's cost to the server.
    async with (
        AsyncRerankClient(target, timeout=3600) as grpc_client,
        aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=3600)) as http_client,
    ):

        async def grpc_call(request: Request) -> list[float]:
            response = await grpc_client.rerank(request.query, list(request.documents))
            return [r.score for r in sorted(response.results, key=lambda r: r.index)]

        async def http_call(request: Request) -> list[float]:
            body = {"query": request.query, "documents": list(request.documents)}
            async with http_client.post("/v2/rerank", json=body) as response:
                response.raise_for_status()
                results = (await response.json())["results"]
            return [r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])]

        calls: dict[str, Call] = {"grpc": grpc_call, "http": http_call}
        # Warm-up, and the same scores through both.
        for workload in (built["b"], built["c"]):
            request = workload.clients[0][0]
            grpc_scores, http_scores = await grpc_call(request), await http_call(request)
            worst = max(abs(a - b) for a, b in zip(grpc_scores, http_scores, strict=True))
            if worst > 1e-6:
                raise RuntimeError(f"HTTP and gRPC scores differ by {worst} on {workload.name}")
            await run_workload(grpc_call, workload, 1)
            await run_workload(http_call, workload, 1)
        rates: dict[str, dict[str, list[float]]] = {"b": {"grpc": [], "http": []}, "c": {"grpc": [], "http": []}}
        for round_ in range(rounds):
            order = ("grpc", "http") if round_ % 2 == 0 else ("http", "grpc")  # alternate: no drift favours one
            for name in ("b", "c"):
                for protocol in order:
                    rate = await run_workload(calls[protocol], built[name], repeats)
                    rates[name][protocol].append(rate)
                    print(f"  round {round_ + 1} {name} {protocol}: {rate:.1f} pairs/s", flush=True)
    summary: dict[str, Any] = {}
    for name, by_protocol in rates.items():
        grpc_rate, http_rate = statistics.median(by_protocol["grpc"]), statistics.median(by_protocol["http"])
        per_round = [h / g for h, g in zip(by_protocol["http"], by_protocol["grpc"], strict=True)]
        summary[name] = {
            "workload": built[name].title,
            "grpc_pairs_per_s": grpc_rate,
            "http_pairs_per_s": http_rate,
            "http_over_grpc": http_rate / grpc_rate,
            "http_over_grpc_per_round": per_round,
            "rounds": by_protocol,
            "met": http_rate / grpc_rate >= TARGET_RATIO,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, QUICK workloads (a smoke test)")
    parser.add_argument("--size", choices=list(SIZES), default=None, help="model size (default base; tiny quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per protocol (default 5; 2 quick)")
    parser.add_argument("--repeats", type=int, default=1, help="times each client sends its requests per round")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "http.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    built = workloads.build(TOKENIZER_DIR, shape=workloads.QUICK if args.quick else workloads.FULL)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as folder:
        work = Path(folder)
        size = args.size or ("tiny" if args.quick else "base")
        save_random_checkpoint(work / "checkpoint", TOKENIZER_DIR, seed=0, **SIZES[size])
        export = [RERANK, "export", "--model", str(work / "checkpoint"), "--output", str(work / "repository")]
        done = subprocess.run([*export, "--precision", "fp32"], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        stack = ServedStack.start(work / "repository", work / "serve.log", extra_args=["--http-timeout-s=3600"])
        try:
            summary = asyncio.run(measure(stack.target, stack.http_url, built, rounds, args.repeats))
        finally:
            stack.stop()
    result = {
        "quick": args.quick,
        "size": args.size or ("tiny" if args.quick else "base"),
        "rounds": rounds,
        "cpus": len(os.sched_getaffinity(0)),
        "workloads": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print("| workload | gRPC pairs/s | HTTP pairs/s | HTTP / gRPC | target >= 0.95 |")
    print("|---|---|---|---|---|")
    for item in summary.values():
        print(
            f"| {item['workload']} | {item['grpc_pairs_per_s']:.1f} | {item['http_pairs_per_s']:.1f} | "
            f"{item['http_over_grpc']:.3f} | {'met' if item['met'] else 'MISSED'} |"
        )
    return 0 if all(item["met"] for item in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
