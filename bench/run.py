"""Reranking throughput benchmark on seeded workloads: in-process engines in each CPU precision (ONNX
Runtime fp32 and int8, PyTorch fp32 and bf16 padded, the packed engine), sentence-transformers'
CrossEncoder, and the served gRPC path (frontend + Triton) for an fp32 export and a `--precision auto`
one, with every precision's ranking agreement against fp32 and the CPU's flags.

    python -m bench.run                 # full size (ModernBERT-base shapes, random weights); see README
    python -m bench.run --quick         # a tiny model, for CI smoke tests (figures are meaningless)
    python -m bench.run --checkpoint /models/gte-reranker-modernbert-base

Writes <output>/results.json, results.md (the table for docs/performance.md) and results.png.

The parts: workloads (the seeded requests), models (checkpoint and exports), steps (which system runs
on what), measure (one system on one workload, in process or served), profiles (operator profile and
GEMM check), report (ratios, table, plot), common (paths, machine, progress).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench import report, workloads
from bench.common import ROOT, TOKENIZER_DIR, Progress, cpu_pressure, machine_info
from bench.models import FULL_INITIALIZER_RANGE, auto_choice, prepare_models
from bench.steps import FULL_PLAN, QUICK_PLAN, measure, planned_pairs
from bench.workloads import Workload


@contextlib.contextmanager
def working_directory(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as temporary:
        yield Path(temporary)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repetitions (CI smoke test)")
    parser.add_argument("--checkpoint", type=Path, help="a real ModernBertForSequenceClassification checkpoint")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results", help="default: bench/results/")
    parser.add_argument(
        "--workdir", type=Path, help="keep the checkpoint and exports here and reuse them (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the workloads and the random weights")
    parser.add_argument(
        "--initializer-range",
        type=float,
        default=None,
        help=f"std of the random weights (default {FULL_INITIALIZER_RANGE}; not with --checkpoint)",
    )
    parser.add_argument(
        "--export-args", default="", help="extra `rerank export` arguments, e.g. '--max-batch-tokens 4096'"
    )
    parser.add_argument("--skip-crossencoder", action="store_true", help="do not run sentence-transformers")
    parser.add_argument("--skip-int8", action="store_true", help="no int8 export and measurement")
    parser.add_argument("--skip-torch", action="store_true", help="no in-process PyTorch or packed-engine runs")
    parser.add_argument("--skip-auto", action="store_true", help="no `--precision auto` export (in-process and served)")
    parser.add_argument("--skip-served", action="store_true", help="do not start rerank serve")
    parser.add_argument("--skip-profile", action="store_true", help="no operator profile and GEMM check")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.initializer_range is not None:
        parser.error("--initializer-range applies to the random model only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    machine = machine_info()
    built = workloads.build(TOKENIZER_DIR, seed=args.seed, shape=workloads.QUICK if args.quick else workloads.FULL)
    progress = Progress(planned_pairs(args, plan, built), enabled=not args.no_progress)
    args.output.mkdir(parents=True, exist_ok=True)
    measurements: list[dict[str, Any]] = []
    agreements: dict[str, Any] = {}
    profile: dict[str, Any] = {}
    try:
        with working_directory(args.workdir) as workdir:
            models = prepare_models(args, workdir, progress)
            # Read while the working folder exists: without --workdir it is a temporary one.
            parameters = models.parameters()
            auto = auto_choice(models)
            measurements, agreements, profile = measure(args, plan, models, built, workdir, progress)
    finally:
        progress.close()
    machine["cpu_pressure_end"] = cpu_pressure()
    machine["load_average_end"] = os.getloadavg()[0]
    results: dict[str, Any] = {
        "schema": 1,
        "created": created,
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "model": {
            "description": models.description,
            "checkpoint": str(models.checkpoint) if args.checkpoint else None,
            "config": {
                k: models.config.get(k)
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                    "local_attention",
                    "max_position_embeddings",
                    "initializer_range",
                )
            },
            "serving": {
                "max_batch_tokens": parameters.max_batch_tokens,
                "intra_op_threads": parameters.intra_op_threads,
                "precision": parameters.precision,
            },
            "auto": auto,
        },
        "plan": asdict(plan),
        "workloads": {name: _describe(w) for name, w in built.items()},
        "measurements": measurements,
        "agreement": agreements,
        "ratios": report.ratios(measurements, agreements, auto),
        "profile": profile,
        "failures": profile.pop("failures", []),
        "elapsed_s": time.perf_counter() - started,
    }
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    table = report.markdown(results)
    (args.output / "results.md").write_text(table)
    report.plot(results, args.output / "results.png")
    print(table)
    for r in results["ratios"]:
        print(f"{r['name']}: {r['value']:.3f} (target ≥ {r['target']}: {'met' if r['met'] else 'MISSED'})")
    print(f"wrote {args.output}/results.json, results.md, results.png in {results['elapsed_s']:.0f}s")
    for failure in results["failures"]:
        print(f"FAILED: {failure['system']} {failure['workload']}: {failure['error']}")
    return 1 if results["failures"] else 0


def _describe(workload: Workload) -> dict[str, Any]:
    lengths = np.array([n for r in workload.requests for n in r.pair_lengths])
    return {
        "title": workload.title,
        "clients": workload.concurrency,
        "requests": len(workload.requests),
        "pairs": workload.pairs,
        "tokens": workload.tokens,
        "pair_tokens": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
