"""The first call after ready: how much slower the first Rerank call to a freshly started `rerank serve` is
than the same call once the model has run, with the export's warm-up and without it.

    python -m bench.warmup                # ModernBERT-base size, random weights, fp32 (a few minutes)
    python -m bench.warmup --demo         # `make demo`'s small model on the same requests (seconds per start)
    python -m bench.warmup --quick        # the tests' tiny model (a smoke test; figures are meaningless)

It exports one checkpoint (`rerank export --precision fp32`) and serves it twice per round: as exported
(config.pbtxt's model_warmup runs before Triton reports the model ready) and with the model_warmup block
removed. Each time it records the seconds from start to SERVING, then times the first call of one of bench.run's
requests (`--request`: b, 64 documents of 16 to 1,024 tokens, or a, 16 documents of 256 tokens) and `--calls`
more of the same call. Writes
<output>/warmup.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bench import workloads
from bench.common import ROOT, TOKENIZER_DIR, write_report
from bench.models import FULL_INITIALIZER_RANGE, QUICK_CONFIG
from bench.served import ServedStack, export_random
from rerank_client import RerankClient
from rerank_server.first_contact import DEMO_CONFIG

WARM, NO_BUDGET, COLD = "warm-up (as exported)", "warm-up without its budget request", "no warm-up"


def without_warmup(repository: Path, into: Path, keep: Callable[[str], bool] = lambda name: False) -> Path:
    """A copy of the repository whose models run only the warm-up requests `keep` names (none: their first call
    pays the first run)."""
    shutil.copytree(repository, into)
    for path in into.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        kept = [warmup for warmup in config.model_warmup if keep(warmup.name)]
        del config.model_warmup[:]
        config.model_warmup.extend(kept)
        path.write_text(text_format.MessageToString(config))
    return into


def warmup_names(repository: Path) -> set[str]:
    return {
        warmup.name
        for path in repository.glob("*/config.pbtxt")
        for warmup in text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()).model_warmup
    }


def serve_and_call(repository: Path, log_path: Path, request: workloads.Request, calls: int) -> dict[str, Any]:
    """Start `rerank serve`, then the first call of `request` and `calls` more, one after the other."""
    started = time.perf_counter()
    stack = ServedStack.start(repository, log_path)
    ready_s = time.perf_counter() - started
    try:
        with RerankClient(stack.target, timeout=600) as client:
            client.model_info()  # the channel, so that the first Rerank call times the model alone
            seconds = []
            for _ in range(1 + calls):
                t0 = time.perf_counter()
                answer = client.rerank(request.query, list(request.documents))
                seconds.append(time.perf_counter() - t0)
                if len(answer.results) != request.pairs:
                    raise RuntimeError(f"{len(answer.results)} results for {request.pairs} documents")
    finally:
        stack.stop()
    steady = float(np.median(seconds[1:]))
    return {"ready_s": ready_s, "first_s": seconds[0], "steady_s": steady, "first_over_steady": seconds[0] / steady}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warmup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and the small workloads")
    parser.add_argument("--demo", action="store_true", help="`make demo`'s small model (random weights)")
    parser.add_argument("--rounds", type=int, default=2, help="starts of each variant, alternating")
    parser.add_argument("--calls", type=int, default=5, help="calls after the first (their median: steady)")
    parser.add_argument("--request", choices=("a", "b"), default="b", help="bench.run's (a) or (b) request")
    parser.add_argument("--export-args", default="--precision fp32", help="`rerank export` arguments")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    built = workloads.build(TOKENIZER_DIR, shape=workloads.QUICK if args.quick else workloads.FULL)
    request = built["b"].requests[0] if args.request == "b" else built["a1"].requests[0]
    with tempfile.TemporaryDirectory(prefix="bench-warmup-") as folder:
        work = Path(folder)
        config = (
            QUICK_CONFIG if args.quick else DEMO_CONFIG if args.demo else {"initializer_range": FULL_INITIALIZER_RANGE}
        )
        warm = export_random(work, export_args=args.export_args.split(), **config)
        repositories = {WARM: warm, COLD: without_warmup(warm, work / "cold")}
        if "budget" in warmup_names(warm):  # what the budget request adds to the planned shapes
            repositories[NO_BUDGET] = without_warmup(warm, work / "no-budget", keep=lambda name: name != "budget")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in repositories}
        for round_ in range(args.rounds):
            for name, repository in repositories.items():
                result = serve_and_call(repository, work / f"serve-{round_}-{len(runs[name])}.log", request, args.calls)
                print(f"{name}, round {round_ + 1}: {result}", file=sys.stderr, flush=True)
                runs[name].append(result)
    lines = [
        f"| ({args.request}), {request.pairs} documents, {request.tokens} tokens | start to SERVING s | first call s "
        "| later calls s (median) | first / later |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, results in runs.items():
        for result in results:
            lines.append(
                f"| {name} | {result['ready_s']:.1f} | {result['first_s']:.3f} | {result['steady_s']:.3f} "
                f"| {result['first_over_steady']:.2f} |"
            )
    write_report(
        args.output, "warmup", argv, "\n".join(lines), quick=args.quick, demo=args.demo, request=args.request, runs=runs
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
