"""The score cache, served: what repeated candidates gain from it, what memory it holds, and that a workload
with no repeats is not slower with it on.

    python -m bench.cache             # ModernBERT-base size, random weights (about 10 minutes on 2 cores)
    python -m bench.cache --quick     # the tests' tiny model, smaller requests (a smoke test)

One checkpoint is exported once (fp32) and served twice at the same time, by `rerank serve
--score-cache-bytes 0` (off) and by `rerank serve --score-cache-bytes <bytes>` (on); only one of them is
sent work at any moment.

- Repeated candidates, on the cache-on server, one call after the other: a query against 300 documents
  (log-normal lengths, median 200 tokens) first, then the same call again (a retry), the next page of the
  same results (same query and candidates, top_n 20: clients page by asking again), the same documents for a
  reformulated query (another query: new pairs, so no hits: a cross-encoder scores the pair, not the
  document), and the first query with half of its candidates replaced. Each row gives the call's time, its
  ratio to the first call, and the cache's hits and misses for it (the frontend's counters).
- No repeats: distinct requests (a new query and new documents each), each sent to both servers, the order
  alternating, so drift and other load hit both alike. The row gives both totals and their ratio.
- Memory: the cache's own account (rerank_score_cache_bytes, entries) and the frontend's RSS growth.

Writes <output>/cache.json and prints Markdown tables.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TOKENIZER_DIR, machine_info, quick_parser
from bench.served import ServedStack, export_random, process_rss
from bench.workloads import FULL, QUICK, Request, Shape, TextMaker, document_lengths
from rerank_client import RerankClient
from rerank_server.testing import TINY_CONFIG

MIB = 2**20
HITS = "rerank_score_cache_hits_total"
MISSES = "rerank_score_cache_misses_total"


@dataclass(frozen=True)
class Plan:
    shape: Shape
    documents: int  # of the repeated request
    distinct_requests: int  # of the no-repeat workload
    distinct_documents: int  # per request of the no-repeat workload
    cache_bytes: int


FULL_PLAN = Plan(FULL, documents=300, distinct_requests=8, distinct_documents=64, cache_bytes=256 * MIB)
QUICK_PLAN = Plan(QUICK, documents=300, distinct_requests=4, distinct_documents=16, cache_bytes=16 * MIB)


def make_request(
    maker: TextMaker, documents: int, rng: random.Random, lengths: np.random.Generator, shape: Shape
) -> Request:
    return maker.request(rng.randint(8, 32), document_lengths(documents, lengths, shape), rng)


def call(client: RerankClient, query: str, documents: list[str], top_n: int = 0) -> tuple[float, list[float]]:
    """Seconds of one Rerank call, and its logits in document order."""
    started = time.perf_counter()
    response = client.rerank(query, documents, top_n=top_n or None)
    seconds = time.perf_counter() - started
    logits = [float("nan")] * len(documents)
    for result in response.results:
        logits[result.index] = result.logit
    return seconds, logits


def counters(stack: ServedStack) -> tuple[float, float]:
    metrics = stack.frontend_metrics()
    return metrics.get(HITS, 0.0), metrics.get(MISSES, 0.0)


def repeated(stack: ServedStack, maker: TextMaker, plan: Plan, seed: int) -> list[dict[str, Any]]:
    rng, lengths = random.Random(seed), np.random.default_rng(seed)
    first = make_request(maker, plan.documents, rng, lengths, plan.shape)
    other_query = make_request(maker, 1, rng, lengths, plan.shape).query
    fresh = make_request(maker, plan.documents // 2, rng, lengths, plan.shape).documents
    documents = list(first.documents)
    half_new = documents[: plan.documents - len(fresh)] + list(fresh)
    calls = [
        ("first call (cold)", first.query, documents, 0),
        ("the same call again (a retry)", first.query, documents, 0),
        ("the next page (same query and candidates, top_n 20)", first.query, documents, 20),
        ("a reformulated query, same candidates", other_query, documents, 0),
        ("the first query, half of the candidates new", first.query, half_new, 0),
    ]
    rows: list[dict[str, Any]] = []
    reference: list[float] = []
    with RerankClient(stack.target, timeout=3600) as client:
        call(client, "warm-up", ["a short document"])
        for title, query, docs, top_n in calls:
            hits, misses = counters(stack)
            seconds, logits = call(client, query, docs, top_n)
            after_hits, after_misses = counters(stack)
            if not reference:
                reference = logits
            row = {"call": title, "documents": len(docs), "seconds": seconds}
            row.update(hits=after_hits - hits, misses=after_misses - misses)
            if query == first.query and docs is documents and top_n == 0:
                row["logits_equal_first_call"] = logits == reference
            rows.append(row)
    return rows


def no_repeats(off: ServedStack, on: ServedStack, maker: TextMaker, plan: Plan, seed: int) -> dict[str, Any]:
    rng, lengths = random.Random(seed + 1), np.random.default_rng(seed + 1)
    requests = [
        make_request(maker, plan.distinct_documents, rng, lengths, plan.shape) for _ in range(plan.distinct_requests)
    ]
    totals = {"off": 0.0, "on": 0.0}
    with RerankClient(off.target, timeout=3600) as to_off, RerankClient(on.target, timeout=3600) as to_on:
        for client in (to_off, to_on):
            call(client, "warm-up", ["a short document"])
        hits_before = counters(on)[0]
        for index, request in enumerate(requests):
            order = [("off", to_off), ("on", to_on)]
            for name, client in order if index % 2 == 0 else reversed(order):
                totals[name] += call(client, request.query, list(request.documents))[0]
    return {
        "requests": len(requests),
        "documents_per_request": plan.distinct_documents,
        "tokens": sum(r.tokens for r in requests),
        "seconds_off": totals["off"],
        "seconds_on": totals["on"],
        "on_over_off": totals["on"] / totals["off"],
        "hits": counters(on)[0] - hits_before,
    }


def main(argv: list[str] | None = None) -> int:
    args = quick_parser("cache", __doc__, "the tests' tiny model and smaller requests").parse_args(argv)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    maker = TextMaker(TOKENIZER_DIR)
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "cache_bytes": plan.cache_bytes}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder:
        work = Path(folder)
        config = TINY_CONFIG if args.quick else {"initializer_range": 0.02}
        export_random(work, seed=args.seed, **config)
        print("exported; starting both servers", file=sys.stderr, flush=True)
        off = ServedStack.start(work / "repository", work / "off.log", extra_args=["--score-cache-bytes=0"])
        try:
            on = ServedStack.start(
                work / "repository", work / "on.log", extra_args=[f"--score-cache-bytes={plan.cache_bytes}"]
            )
            try:
                idle_rss = process_rss([on.frontend])
                results["repeated"] = repeated(on, maker, plan, args.seed)
                print(f"repeated: {results['repeated']}", file=sys.stderr, flush=True)
                results["no_repeats"] = no_repeats(off, on, maker, plan, args.seed)
                print(f"no repeats: {results['no_repeats']}", file=sys.stderr, flush=True)
                metrics = on.frontend_metrics()
                results["memory"] = {
                    "cache_bytes": metrics.get("rerank_score_cache_bytes", 0.0),
                    "cache_entries": metrics.get("rerank_score_cache_entries", 0.0),
                    "frontend_rss_growth_bytes": process_rss([on.frontend]) - idle_rss,
                }
            finally:
                on.stop()
        finally:
            off.stop()
    table = report(results)
    results["table"] = table
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cache.json").write_text(json.dumps(results, indent=2))
    print(table)
    return 0


def report(results: dict[str, Any]) -> str:
    rows = results["repeated"]
    first = rows[0]["seconds"]
    lines = [
        f"| served, score cache on ({results['cache_bytes'] / MIB:.0f} MiB) | documents | seconds "
        "| first call's time / this one's | hits | misses |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['call']} | {row['documents']} | {row['seconds']:.3f} | {first / row['seconds']:.1f} "
            f"| {row['hits']:.0f} | {row['misses']:.0f} |"
        )
    none = results["no_repeats"]
    memory = results["memory"]
    lines += [
        "",
        "| no repeats, same requests to both servers | requests x documents | cache off s | cache on s | on / off "
        "| hits |",
        "|---|--:|--:|--:|--:|--:|",
        f"| distinct queries and documents | {none['requests']} x {none['documents_per_request']} "
        f"| {none['seconds_off']:.2f} | {none['seconds_on']:.2f} | {none['on_over_off']:.3f} | {none['hits']:.0f} |",
        "",
        f"cache after both workloads: {memory['cache_entries']:.0f} entries, {memory['cache_bytes'] / MIB:.2f} MiB "
        f"by its account; frontend RSS {memory['frontend_rss_growth_bytes'] / MIB:+.1f} MiB since start.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
