"""Triton's batching delay (`rerank export --max-queue-delay-us`), served: what it costs a call that finds the
model idle, and what it gives concurrent callers; and what Triton's priority levels (`--triton-priority`)
cost the same calls.

For each delay (and each of --priority-delays, exported with --triton-priority too) the tests' tiny model is
exported (fp32) and served by `rerank serve` (local Triton), then:
- **one at a time**: --calls small Rerank calls (two short documents), each sent when the last is answered:
  the latency distribution, and how many took STALL_S or more;
- **concurrent**: --clients clients, each sending the same small calls one after another for --seconds:
  calls per second and the latency percentiles.
The tiny model makes the model's own time small, so what is measured is the path through Triton's
scheduler: the delay itself, and the calls its delayed-batching path holds.

    python -m bench.queue_delay                  # delays 0, 100 and 2000 us, and 2000 with priority levels
    python -m bench.queue_delay --quick          # fewer calls (a smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, cpu_pressure, machine_info
from bench.measure import latency_summary
from bench.served import ServedStack, export_random
from rerank_client import AsyncRerankClient
from rerank_server.testing import TINY_CONFIG

QUERY = "what is the capital of China?"
# A call that waits this long behind an idle model has been held by the scheduler, not by work: the tiny
# model answers these calls in milliseconds.
STALL_S = 0.25


@dataclass
class Row:
    delay_us: int
    triton_priority: bool  # exported with --triton-priority
    configured_us: int  # what the exported config.pbtxt says Triton waits
    sequential_calls: int
    sequential_median_ms: float
    sequential_p99_ms: float
    sequential_max_ms: float
    stalls: int  # sequential calls of STALL_S or more
    concurrent_clients: int
    concurrent_calls_per_s: float
    concurrent_p50_ms: float
    concurrent_p99_ms: float
    concurrent_max_ms: float
    concurrent_stalls: int


async def one_at_a_time(target: str, calls: int) -> list[float]:
    latencies = []
    async with AsyncRerankClient(target, timeout=60) as client:
        for i in range(calls):
            start = time.perf_counter()
            await client.rerank(QUERY, [f"Beijing {i}", "The weather is nice today"])
            latencies.append(time.perf_counter() - start)
    return latencies


async def concurrent(target: str, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def client(n: int) -> None:
        async with AsyncRerankClient(target, timeout=60) as rerank:
            i = 0
            while time.perf_counter() < end:
                start = time.perf_counter()
                await rerank.rerank(QUERY, [f"Beijing {n}-{i}", "The weather is nice today"])
                latencies.append(time.perf_counter() - start)
                i += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies


def measure(work: Path, delay_us: int, priority: bool, calls: int, clients: int, seconds: float) -> Row:
    args = ["--precision", "fp32", f"--max-queue-delay-us={delay_us}", *(["--triton-priority"] if priority else [])]
    repository = export_random(work, export_args=args, **TINY_CONFIG)
    config = (repository / "reranker" / "config.pbtxt").read_text()
    configured = re.search(r"max_queue_delay_microseconds: (\d+)", config)
    if ("priority_levels" in config) != priority:
        raise SystemExit(f"the export with {args} wrote priority_levels: {'priority_levels' in config}")
    stack = ServedStack.start(repository, work / f"serve-{delay_us}{'-priority' if priority else ''}.log")
    try:
        asyncio.run(one_at_a_time(stack.target, 20))  # connections and first runs
        sequential = asyncio.run(one_at_a_time(stack.target, calls))
        together = asyncio.run(concurrent(stack.target, clients, seconds))
    finally:
        stack.stop()
    alone, busy = latency_summary(sequential), latency_summary(together)
    return Row(
        delay_us=delay_us,
        triton_priority=priority,
        configured_us=int(configured.group(1)) if configured else -1,
        sequential_calls=len(sequential),
        sequential_median_ms=alone["p50"],
        sequential_p99_ms=alone["p99"],
        sequential_max_ms=alone["max"],
        stalls=sum(t >= STALL_S for t in sequential),
        concurrent_clients=clients,
        concurrent_calls_per_s=len(together) / seconds,
        concurrent_p50_ms=busy["p50"],
        concurrent_p99_ms=busy["p99"],
        concurrent_max_ms=busy["max"],
        concurrent_stalls=sum(t >= STALL_S for t in together),
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| delay (us) | Triton priority levels | one at a time: calls | median ms | p99 ms | worst ms "
        "| calls of 0.25 s or more "
        "| concurrent clients | calls/s | p50 ms | p99 ms | worst ms | calls of 0.25 s or more |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.delay_us:,} | {'2' if r.triton_priority else 'none'} | {r.sequential_calls:,} "
            f"| {r.sequential_median_ms:.1f} | {r.sequential_p99_ms:.1f} "
            f"| {r.sequential_max_ms:.0f} | {r.stalls} | {r.concurrent_clients} | {r.concurrent_calls_per_s:.0f} "
            f"| {r.concurrent_p50_ms:.1f} | {r.concurrent_p99_ms:.1f} | {r.concurrent_max_ms:.0f} "
            f"| {r.concurrent_stalls} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_delay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, shorter concurrent runs")
    parser.add_argument("--delays", default="0,100,2000", help="max_queue_delay_microseconds values, comma-separated")
    parser.add_argument(
        "--priority-delays",
        default="2000",
        help="delays measured again exported with --triton-priority, comma-separated ('' for none)",
    )
    parser.add_argument("--calls", type=int, default=None, help="sequential calls per delay (default 2000)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=None, help="concurrent run per delay (default 20)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "queue_delay.json")
    args = parser.parse_args(argv)
    calls = args.calls or (100 if args.quick else 2000)
    seconds = args.seconds or (2.0 if args.quick else 20.0)
    variants = [(int(d), False) for d in args.delays.split(",")]
    variants += [(int(d), True) for d in args.priority_delays.split(",") if d.strip()]
    pressure = cpu_pressure()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-queue-delay-") as folder:
        for delay, priority in variants:
            print(f"delay {delay} us{', priority levels' if priority else ''} ...", file=sys.stderr, flush=True)
            rows.append(measure(Path(folder), delay, priority, calls, args.clients, seconds))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "cpu_pressure_at_start": pressure,
        "cpu_pressure_at_end": cpu_pressure(),
        "seconds": time.perf_counter() - started,
        "rows": [asdict(r) for r in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(table(rows))
    print(
        f"\n{report['seconds']:.0f} s; CPU pressure {pressure}% at start, {report['cpu_pressure_at_end']}% at end; "
        f"{report['machine'].get('cpu', '')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
