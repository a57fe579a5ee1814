"""A served call beside other work on the same cores: the default export's time per call, alone and with one
core kept busy by another process, under each OpenMP wait policy of the PyTorch engines.

    python -m bench.contention           # ModernBERT-base size, random weights, the default export (minutes)
    python -m bench.contention --quick   # the tests' tiny model (a smoke test; figures are meaningless)

It exports one checkpoint (`rerank export`, auto unless `--export-args` say otherwise) and serves it once per
policy and round (`OMP_WAIT_POLICY` ACTIVE: threads spin between parallel regions; PASSIVE: they sleep, what the
model package sets unless the environment names one; libgomp's own default, which the package replaces: spin
300,000 rounds, then sleep, as GOMP_SPINCOUNT=300000), times `--calls` calls of bench.run's (a) request (16
documents of 256 tokens) alone and then beside `python3 -c "while True: pass"`, and counts the CPU seconds the
model's Triton stub spent per call. Writes <output>/contention.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import psutil

from bench import workloads
from bench.common import ROOT, TOKENIZER_DIR, write_report
from bench.models import FULL_INITIALIZER_RANGE, QUICK_CONFIG
from bench.served import ServedStack, export_random
from rerank_client import RerankClient

# The environment each policy is served with (the stub inherits it from rerank serve and Triton).
POLICIES: dict[str, dict[str, str]] = {
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BUSY = [sys.executable, "-c", "while True: pass"]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def timed_calls(stack: ServedStack, request: workloads.Request, calls: int) -> dict[str, float]:
    """`calls` calls of `request`, one after the other: the median seconds and the stub's CPU seconds per call."""
    stubs = stack.stubs()
    before = cpu_seconds(stubs)
    seconds = []
    with RerankClient(stack.target, timeout=900) as client:
        for _ in range(calls):
            started = time.perf_counter()
            answer = client.rerank(request.query, list(request.documents))
            seconds.append(time.perf_counter() - started)
            if len(answer.results) != request.pairs:
                raise RuntimeError(f"{len(answer.results)} results for {request.pairs} documents")
    return {"seconds": float(np.median(seconds)), "stub_cpu_s": (cpu_seconds(stubs) - before) / calls}


def serve_and_measure(repository: Path, log_path: Path, policy: str, request: workloads.Request, calls: int) -> Any:
    for name in OPENMP_VARIABLES:  # inherited by rerank serve, Triton and its stub
        os.environ.pop(name, None)
    os.environ.update(POLICIES[policy])
    stack = ServedStack.start(repository, log_path)
    try:
        # What the stub runs under (the model package keeps a policy its environment names).
        stub_environment = stack.stubs()[0].environ()
        stub_policy = {name: stub_environment[name] for name in OPENMP_VARIABLES if name in stub_environment}
        with RerankClient(stack.target, timeout=900) as client:
            client.rerank(request.query, list(request.documents))  # the first run's costs out of the way
        alone = timed_calls(stack, request, calls)
        busy = subprocess.Popen(BUSY)
        try:
            time.sleep(0.5)
            beside = timed_calls(stack, request, calls)
        finally:
            busy.kill()
            busy.wait()
    finally:
        stack.stop()
    return {
        "alone": alone,
        "busy": beside,
        "busy_over_alone": beside["seconds"] / alone["seconds"],
        "stub_policy": stub_policy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and the small workloads")
    parser.add_argument("--rounds", type=int, default=2, help="starts per policy, alternating")
    parser.add_argument("--calls", type=int, default=5, help="timed calls alone and beside the busy core")
    parser.add_argument("--export-args", default="", help="`rerank export` arguments (default: auto)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    request = workloads.build(TOKENIZER_DIR, shape=workloads.QUICK if args.quick else workloads.FULL)["a1"].requests[0]
    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in POLICIES}
    # Each policy sets the OpenMP variables the served processes inherit; the caller's come back after.
    with mock.patch.dict(os.environ), tempfile.TemporaryDirectory(prefix="bench-contention-") as folder:
        work = Path(folder)
        config = QUICK_CONFIG if args.quick else {"initializer_range": FULL_INITIALIZER_RANGE}
        repository = export_random(work, export_args=args.export_args.split(), **config)
        exported = json.loads(next(repository.glob("*/1/export.json")).read_text())
        for round_ in range(args.rounds):
            for policy in POLICIES:
                log = work / f"serve-{policy}-{round_}.log"
                result = serve_and_measure(repository, log, policy, request, args.calls)
                print(f"{policy}, round {round_ + 1}: {result}", file=sys.stderr, flush=True)
                runs[policy].append(result)
    served_as = f"{exported.get('precision')} ({exported.get('runtime')})"
    lines = [
        f"| OpenMP threads waiting, {served_as}, (a) {request.pairs} documents, {request.tokens} tokens | alone s "
        "| one core busy s "
        "| busy / alone | stub CPU s per call, alone | stub CPU s per call, busy |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for policy, results in runs.items():
        for result in results:
            alone, busy = result["alone"], result["busy"]
            lines.append(
                f"| {policy} | {alone['seconds']:.3f} | {busy['seconds']:.3f} | {result['busy_over_alone']:.2f} "
                f"| {alone['stub_cpu_s']:.3f} | {busy['stub_cpu_s']:.3f} |"
            )
    write_report(args.output, "contention", argv, "\n".join(lines), quick=args.quick, served_as=served_as, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
