"""Reranking throughput benchmark on seeded workloads: in-process engines in each CPU precision (ONNX
Runtime fp32 and int8, PyTorch fp32 and bf16 padded, the packed engine), sentence-transformers'
CrossEncoder, and the served gRPC path (frontend + Triton) for an fp32 export and a `--precision auto`
one, with every precision's ranking agreement against fp32 and the CPU's flags.

    python -m bench.run                 # full size (ModernBERT-base shapes, random weights); see README
    python -m bench.run --quick         # a tiny model, for CI smoke tests (figures are meaningless)
    python -m bench.run --checkpoint /models/gte-reranker-modernbert-base

Writes <output>/results.json, results.md (the table for the README) and results.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench import report, workloads
from bench.workloads import Request, Workload
from rerank_server.testing import TINY_CONFIG, exported_parameters
from rerank_triton_model.contract import ModelParameters
from rerank_triton_model.runtimes import ONNXRUNTIME, PACKED, TORCH

if TYPE_CHECKING:
    from rerank_triton_model.reranker_engine import PackedReranker

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "modernbert-tokenizer"
RERANK = str(Path(sys.executable).parent / "rerank")
# The random full-size model: transformers' ModernBertConfig() sizes (ModernBERT-base) and weight init
# (std 0.02); save_random_checkpoint widens the scoring head so that documents' logits spread (README,
# "Ranking agreement on random weights"). 0.1 was tried: a chaotic network that amplifies any error.
FULL_INITIALIZER_RANGE = 0.02
# --quick: the test suite's tiny ModernBERT (4 layers, hidden 64), for the smaller QUICK workloads.
QUICK_CONFIG: dict[str, Any] = TINY_CONFIG


@dataclass(frozen=True)
class Plan:
    """Repetitions of each measured run (each repetition sends every request of the workload once)."""

    ort_a: int
    ort_b: int
    crossencoder_a: int
    crossencoder_b: int
    served_a1: int
    served_a4: int
    served_a16: int
    served_b: int
    served_c: int
    int8_b: int
    variant_a: int = 1  # the other in-process precisions (int8, PyTorch, packed) on (a)
    variant_b: int = 1  # ... on (b)
    inprocess_c: int = 1  # in-process fp32 and the auto export's precision on (c)


FULL_PLAN = Plan(2, 1, 1, 1, 2, 1, 1, 1, 1, 1)
QUICK_PLAN = Plan(3, 3, 2, 2, 3, 2, 1, 2, 2, 3, 2, 2, 2)
# In-process systems by the (runtime, precision) they compute in; a system's name is its label key.
SYSTEMS = {
    (ONNXRUNTIME.name, "fp32"): "onnxruntime",
    (ONNXRUNTIME.name, "int8"): "onnxruntime-int8",
    (TORCH.name, "fp32"): "torch",
    (TORCH.name, "bf16"): "torch-bf16",
    (PACKED.name, "fp32"): "packed",
    (PACKED.name, "bf16"): "packed-bf16",
}


class Progress:
    """A tqdm bar over every pair the run will score, plus log lines that do not break it."""

    def __init__(self, total_pairs: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_pairs, unit="pair", disable=not enabled, dynamic_ncols=True, file=sys.stderr)

    def log(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def stage(self, title: str) -> None:
        self.bar.set_description(title)

    def advance(self, pairs: int) -> None:
        self.bar.update(pairs)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------------- machine


def cpu_pressure() -> float | None:
    """Share of time some runnable task waited for a CPU over the last minute (Linux PSI), in %."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    match = re.search(r"some avg10=[0-9.]+ avg60=([0-9.]+)", text)
    return float(match.group(1)) if match else None


def machine_info() -> dict[str, Any]:
    import importlib.metadata

    import psutil

    from rerank_triton_model.cpu_features import cpu_flags, native_precisions

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version()}
    for name in ("onnxruntime", "torch", "transformers", "sentence-transformers", "tritonclient", "nvidia-pytriton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "cpu": cpu,
        "cpu_flags": sorted(cpu_flags()),
        "native_precisions": native_precisions(cpu_flags()),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "os": platform.platform(),
        "versions": versions,
        "load_average_start": os.getloadavg()[0],
        "cpu_pressure_start": cpu_pressure(),
    }


# ------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class Models:
    checkpoint: Path
    description: str
    config: dict[str, Any]
    fp32_repository: Path
    int8_repository: Path | None
    auto_repository: Path | None = None  # `rerank export --precision auto`
    name: str = "reranker"

    def model_dir(self, int8: bool = False, auto: bool = False) -> Path:
        repository = self.auto_repository if auto else self.int8_repository if int8 else self.fp32_repository
        assert repository is not None
        return repository / self.name

    def parameters(self, int8: bool = False, auto: bool = False) -> ModelParameters:
        return exported_parameters(self.model_dir(int8, auto))


def _run_exports(exports: list[list[str]], progress: Progress) -> None:
    """`rerank export` with each argument list, all at once (most of an export is loading libraries)."""
    running = []
    for args in exports:
        progress.log(f"$ rerank export {' '.join(args)}")
        running.append(subprocess.Popen([RERANK, "export", *args], stderr=subprocess.PIPE, text=True))
    for process in running:
        _, stderr = process.communicate()
        for line in stderr.splitlines():
            if line.startswith(("Exported", "Precision")):
                progress.log(f"  {line}")
        if process.returncode != 0:
            raise RuntimeError(f"rerank export failed ({process.returncode}):\n{stderr[-3000:]}")


def prepare_models(args: argparse.Namespace, workdir: Path, progress: Progress) -> Models:
    """The checkpoint (random unless --checkpoint) and its fp32 and int8 exports; reused when unchanged."""
    if args.checkpoint is not None:
        checkpoint = args.checkpoint.resolve()
        spec: dict[str, Any] = {"checkpoint": str(checkpoint)}
        description = f"checkpoint {checkpoint.name}"
    else:
        base = QUICK_CONFIG if args.quick else {}
        init = args.initializer_range if args.initializer_range is not None else FULL_INITIALIZER_RANGE
        spec = {"random": {**base, "initializer_range": init}, "seed": args.seed}
        checkpoint = workdir / "checkpoint"
        size = "tiny ModernBERT" if args.quick else "ModernBERT-base size"
        description = f"{size}, random weights (initializer_range {init}, seed {args.seed})"
    spec["int8"] = not args.skip_int8
    spec["auto"] = not args.skip_auto
    # Exports copy the model package: reuse them only while it and the exporter are unchanged.
    import hashlib

    import rerank_triton_model
    from rerank_server import export as exporter

    sources: list[str | Path] = [
        *sorted(rerank_triton_model.PACKAGE_DIR.glob("*.py")),
        rerank_triton_model.CONFIG_TEMPLATE,
        *sorted(Path(exporter.__file__).parent.glob("*.py")),
    ]
    spec["sources"] = hashlib.sha256(b"".join(Path(p).read_bytes() for p in sources)).hexdigest()
    spec["export_args"] = args.export_args
    fp32_repository = workdir / "repository"
    int8_repository = workdir / "repository-int8" if not args.skip_int8 else None
    auto_repository = workdir / "repository-auto" if not args.skip_auto else None
    stamp = workdir / "bench-models.json"
    reusable = (
        stamp.is_file()
        and json.loads(stamp.read_text()) == spec
        and (fp32_repository / "reranker" / "config.pbtxt").is_file()
        and all(r is None or (r / "reranker" / "config.pbtxt").is_file() for r in (int8_repository, auto_repository))
    )
    if reusable:
        progress.log(f"Reusing the checkpoint and exports in {workdir}")
    else:
        stamp.unlink(missing_ok=True)
        if args.checkpoint is None:
            from rerank_server.testing import save_random_checkpoint

            progress.stage("random checkpoint")
            progress.log(f"Saving a {description} checkpoint to {checkpoint}")
            shutil.rmtree(checkpoint, ignore_errors=True)
            save_random_checkpoint(checkpoint, TOKENIZER_DIR, seed=args.seed, **spec["random"])
        common = ["--model", str(checkpoint), "--name", "reranker", "--overwrite", *args.export_args.split()]
        exports = [[*common, "--output", str(fp32_repository), "--precision", "fp32"]]
        if int8_repository is not None:
            exports.append([*common, "--output", str(int8_repository), "--precision", "int8"])
        progress.stage("export")
        _run_exports(exports, progress)
        if auto_repository is not None:
            # Alone: auto times the candidates, which other exports running beside it would slow.
            _run_exports([[*common, "--output", str(auto_repository), "--precision", "auto"]], progress)
        stamp.write_text(json.dumps(spec))
    config = json.loads((checkpoint / "config.json").read_text())
    return Models(checkpoint, description, config, fp32_repository, int8_repository, auto_repository)


# ------------------------------------------------------------------------------------ measurements


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
    before = stack.snapshot()
    completed = asyncio.run(drive(stack.target, workload, repeats, progress.advance))
    after = stack.snapshot()
    wall = after.wall - before.wall
    frontend_cpu = after.frontend_cpu - before.frontend_cpu
    triton_cpu = after.triton_cpu - before.triton_cpu
    delta = {k: after.metrics.get(k, 0.0) - before.metrics.get(k, 0.0) for k in after.metrics}
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


def agreement(reference: np.ndarray, other: np.ndarray, top: int = 10) -> dict[str, float]:
    """How far `other` ranks like `reference`: top-k overlap, Spearman, and the error against the spread."""
    from scipy.stats import spearmanr

    top_reference = set(np.argsort(-reference, kind="stable")[:top].tolist())
    top_other = set(np.argsort(-other, kind="stable")[:top].tolist())
    error = other.astype(np.float64) - reference
    spread = float(np.std(reference))
    return {
        "documents": int(reference.size),
        "top10_overlap": len(top_reference & top_other) / top,
        "spearman": float(spearmanr(reference, other).statistic),
        "max_abs_diff": float(np.abs(error).max()),
        "rms_diff": float(np.sqrt(np.mean(error**2))),
        "fp32_logit_std": spread,
        "noise_to_spread": float(np.sqrt(np.mean(error**2)) / spread) if spread else float("inf"),
    }


# ---------------------------------------------------------------------------------------- profiles


def gemm_check(workdir: Path) -> dict[str, Any]:
    """One encoder-sized MatMul (1024 x 768 @ 768 x 2304), one thread: fp32 vs the int8 export's kernels."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rerank_server.export.weights import quantize_int8

    m, k, n = 1024, 768, 2304
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="/layers.0/gemm/MatMul")],  # quantize_int8 wants layers
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), "W")],
    )
    fp32_path, int8_path = workdir / "gemm.onnx", workdir / "gemm-int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(fp32_path))
    quantize_int8(fp32_path, int8_path)
    a = rng.standard_normal((m, k)).astype(np.float32)
    rates = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, {"A": a})
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            session.run(None, {"A": a})
            times.append(time.perf_counter() - t0)
        rates[name] = 2 * m * k * n / min(times) / 1e9
    int8_ops = [node.op_type for node in onnx.load(str(int8_path)).graph.node]
    return {
        "shape": f"{m}x{k} @ {k}x{n}",
        "fp32_gflops": rates["fp32"],
        "int8_gops": rates["int8"],
        "int8_op": "+".join(sorted(set(int8_ops) - {"Mul", "Cast"})),
    }


def op_profile(onnx_path: Path, ids: np.ndarray, threads: int, workdir: Path) -> dict[str, Any]:
    """ONNX Runtime's own profiler on one padded batch: time per operator type, largest first."""
    import onnxruntime as ort

    from rerank_triton_model.reranker_engine import session_options

    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile-{onnx_path.parent.parent.parent.name}")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # the first run allocates; the second is the one read
    t0 = time.perf_counter()
    session.run(None, feeds)
    run_s = time.perf_counter() - t0
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]["ts"]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e6
    total = sum(by_op.values())
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "batch": list(ids.shape),
        "run_s": run_s,
        "by_op": [{"op": op, "seconds": s, "share": s / total} for op, s in ranked[:10]],
    }


# -------------------------------------------------------------------------------------------- main


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
    progress = Progress(_planned_pairs(args, plan, built), enabled=not args.no_progress)
    args.output.mkdir(parents=True, exist_ok=True)
    measurements: list[dict[str, Any]] = []
    agreements: dict[str, Any] = {}
    profile: dict[str, Any] = {}
    try:
        with working_directory(args.workdir) as workdir:
            models = prepare_models(args, workdir, progress)
            # Read while the working folder exists: without --workdir it is a temporary one.
            parameters = models.parameters()
            auto = _auto_choice(models)
            measurements, agreements, profile = _measure(args, plan, models, built, workdir, progress)
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


def _planned_pairs(args: argparse.Namespace, plan: Plan, built: dict[str, Workload]) -> int:
    """The pairs the plan will score, for the progress bar; systems the run turns out not to have are
    skipped from it."""
    a1, a4, a16, b, c = (built[k] for k in _roles(built))
    total = a1.pairs * plan.ort_a + b.pairs * plan.ort_b + c.pairs * plan.inprocess_c
    if not args.skip_int8:
        total += b.pairs * plan.int8_b
    if not args.skip_torch:
        total += 4 * (a1.pairs * plan.variant_a + b.pairs * plan.variant_b)
    if not args.skip_auto:
        total += a1.pairs * plan.variant_a + c.pairs * plan.inprocess_c
    if not args.skip_crossencoder:
        total += a1.pairs * plan.crossencoder_a + b.pairs * plan.crossencoder_b
    if not args.skip_served:
        total += a1.pairs * plan.served_a1 + a4.pairs * plan.served_a4 + a16.pairs * plan.served_a16
        total += b.pairs * plan.served_b + c.pairs * plan.served_c
        if not args.skip_auto:
            total += a1.pairs * plan.served_a1 + a16.pairs * plan.served_a16
            total += b.pairs * plan.served_b + c.pairs * plan.served_c
    return total


def _roles(built: dict[str, Workload]) -> tuple[str, str, str, str, str]:
    """Names of (a) at the lowest, middle and highest concurrency, then (b) and (c)."""
    fixed = sorted((w for w in built.values() if w.kind == "a"), key=lambda w: w.concurrency)
    if len(fixed) != 3:
        raise ValueError("expected (a) at three concurrencies")
    return fixed[0].name, fixed[1].name, fixed[2].name, "b", "c"


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


def _auto_choice(models: Models) -> dict[str, Any] | None:
    """What `--precision auto` chose on this machine, why, and the figures it chose on."""
    if models.auto_repository is None:
        return None
    parameters = models.parameters(auto=True)
    export = json.loads((models.model_dir(auto=True) / "1" / "export.json").read_text())
    runtime, precision = parameters.runtime, parameters.precision
    return {
        "precision": precision,
        "runtime": runtime,
        "system": SYSTEMS.get((runtime, precision), f"{runtime}-{precision}"),
        "reason": parameters.precision_reason,
        "cpu_flags": parameters.cpu_flags,
        "candidates": (export.get("precision_selection") or {}).get("candidates", []),
    }


@dataclass
class _Session:
    """What the measuring steps share: the run's inputs, and the results each step adds to."""

    args: argparse.Namespace
    plan: Plan
    models: Models
    workdir: Path
    progress: Progress
    tokenizer: Any
    warm: Workload  # run once by every system before it is timed
    measurements: list[dict[str, Any]] = field(default_factory=list)
    agreements: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    def engine(self, name: str, precision: str) -> PackedReranker:
        """The in-process engine as the served model builds it (model.py, through the runtime registry):
        same weights, token budget and threads."""
        from rerank_triton_model.runtimes import runtime

        served, chosen = self.models.parameters(), runtime(name)
        graph = self.models.model_dir(int8=precision == "int8") / "1" / chosen.weights
        return chosen.build(
            str(graph if chosen.graph else self.models.checkpoint),
            device="cpu",
            precision=precision,
            pad_token_id=served.pad_token_id,
            max_batch_tokens=served.max_batch_tokens,
            intra_op_threads=served.intra_op_threads,
        )

    def inprocess(self, system: str, engine: PackedReranker, workload: Workload, repeats: int) -> np.ndarray:
        """Measure an in-process engine on a workload; returns its last request's logits."""
        result, logits = run_inprocess(system, engine, self.tokenizer, workload, repeats, self.progress)
        self.measurements.append(result)
        return logits

    def warm_up(self, system: str, engine: PackedReranker) -> None:
        run_inprocess(system, engine, self.tokenizer, self.warm, 1, _Quiet(self.progress))

    def op_profile(self, name: str, first: Request, int8: bool = False) -> None:
        """ONNX Runtime's per-operator profile of the fp32 (or int8) graph on 4 rows of the first pair."""
        ids = np.asarray(pair_inputs(self.tokenizer, first)[0][: 4 * first.pair_lengths[0]]).reshape(4, -1)
        model = self.models.model_dir(int8=int8) / "1" / "model.onnx"
        self.profile[name] = op_profile(model, ids, self.models.parameters().intra_op_threads, self.workdir)

    def failed(self, system: str, workload: str, error: Exception) -> None:
        """One failed system or run is reported; the others still run."""
        self.progress.log(f"{system} {workload} failed: {error}")
        self.failures.append({"system": system, "workload": workload, "error": str(error)})


def _warm_up(a16: Workload) -> Workload:
    """Two (a) requests' documents under one query: a sub-batch as large as the token budget of the
    full-size model, so that every process has run one before anything is timed (ONNX Runtime's first
    run at a new size grows its memory arena and is up to twice as slow)."""
    fixed = [r for client in a16.clients[:2] for r in client]
    request = Request(
        fixed[0].query,
        tuple(d for r in fixed for d in r.documents),
        tuple(n for r in fixed for n in fixed[0].pair_lengths[: r.pairs]),
    )
    return Workload("warm", "warm", "warm-up", ((request,),))


def _measure(
    args: argparse.Namespace,
    plan: Plan,
    models: Models,
    built: dict[str, Workload],
    workdir: Path,
    progress: Progress,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Every system the arguments keep, on the workloads the plan names: measurements, agreements
    against in-process fp32, and the profile (its "failures": what failed and why)."""
    from tokenizers import Tokenizer

    a1, a4, a16, b, c = (built[k] for k in _roles(built))
    tokenizer = Tokenizer.from_file(str(models.model_dir() / "1" / "tokenizer" / "tokenizer.json"))
    run = _Session(args, plan, models, workdir, progress, tokenizer, _warm_up(a16))
    fp32_b = _measure_fp32(run, a1, b, c)
    _measure_variants(run, a1, b, c, fp32_b)
    if not args.skip_profile:
        run.profile["gemm"] = gemm_check(workdir)
    if not args.skip_crossencoder:
        _measure_crossencoder(run, a1, b, fp32_b)
    if not args.skip_served:
        # The fp32 export on every workload, then the auto export on those its targets name.
        served: list[tuple[str, Path, tuple[tuple[Workload, int], ...]]] = [
            ("served", models.fp32_repository, ((a1, plan.served_a1), (a4, plan.served_a4)))
        ]
        if models.auto_repository is not None:
            served.append(("served-auto", models.auto_repository, ((a1, plan.served_a1),)))
        for system, repository, low in served:
            runs = (*low, (a16, plan.served_a16), (b, plan.served_b), (c, plan.served_c))
            _measure_served(run, system, repository, runs, b, fp32_b)
    return run.measurements, run.agreements, {**run.profile, "failures": run.failures}


def _measure_fp32(run: _Session, a1: Workload, b: Workload, c: Workload) -> np.ndarray:
    """In-process ONNX Runtime fp32, the reference of every agreement; returns its (b) logits."""
    fp32 = run.engine(ONNXRUNTIME.name, "fp32")
    run.warm_up("onnxruntime", fp32)
    run.inprocess("onnxruntime", fp32, a1, run.plan.ort_a)
    fp32_b = run.inprocess("onnxruntime", fp32, b, run.plan.ort_b)
    run.inprocess("onnxruntime", fp32, c, run.plan.inprocess_c)
    if not run.args.skip_profile:
        run.progress.stage("profile")
        run.op_profile("fp32", a1.requests[0])
    return fp32_b


def _variants(args: argparse.Namespace, models: Models, auto: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The in-process (runtime, precision) pairs other than ONNX Runtime fp32 that this run measures."""
    variants: list[tuple[str, str]] = []
    if models.int8_repository is not None:
        variants.append((ONNXRUNTIME.name, "int8"))
    if not args.skip_torch:
        variants += [(TORCH.name, "fp32"), (TORCH.name, "bf16")]
        if _has_packed():
            variants += [(PACKED.name, "fp32"), (PACKED.name, "bf16")]
    if auto is not None and (auto["runtime"], auto["precision"]) not in [*variants, (ONNXRUNTIME.name, "fp32")]:
        variants.append((auto["runtime"], auto["precision"]))
    return variants


def _measure_variants(run: _Session, a1: Workload, b: Workload, c: Workload, fp32_b: np.ndarray) -> None:
    """The other precisions in-process: (a) and (b), and the auto export's choice on (c) too."""
    auto = _auto_choice(run.models)
    for runtime, precision in _variants(run.args, run.models, auto):
        system = SYSTEMS[(runtime, precision)]
        try:
            variant = run.engine(runtime, precision)
            run.warm_up(system, variant)
            run.inprocess(system, variant, a1, run.plan.variant_a)
            repeats_b = run.plan.int8_b if system == "onnxruntime-int8" else run.plan.variant_b
            run.agreements[f"{system}_vs_fp32"] = agreement(fp32_b, run.inprocess(system, variant, b, repeats_b))
            if auto is not None and system == auto["system"]:
                run.inprocess(system, variant, c, run.plan.inprocess_c)
            if system == "onnxruntime-int8" and not run.args.skip_profile:
                run.op_profile("int8", a1.requests[0], int8=True)
            del variant
        except Exception as error:  # noqa: BLE001 - one failed system is reported, the others still run
            run.failed(system, "a/b", error)
    if "onnxruntime-int8_vs_fp32" in run.agreements:
        run.agreements["int8_vs_fp32"] = run.agreements["onnxruntime-int8_vs_fp32"]


def _measure_crossencoder(run: _Session, a1: Workload, b: Workload, fp32_b: np.ndarray) -> None:
    """sentence-transformers' CrossEncoder on the same checkpoint, (a) and (b)."""
    import torch
    from sentence_transformers import CrossEncoder

    run.progress.stage("crossencoder load")
    model = CrossEncoder(str(run.models.checkpoint), device="cpu", activation_fn=torch.nn.Identity())
    run_crossencoder(model, run.warm, 1, _Quiet(run.progress))
    result, _ = run_crossencoder(model, a1, run.plan.crossencoder_a, run.progress)
    run.measurements.append(result)
    result, crossencoder_b = run_crossencoder(model, b, run.plan.crossencoder_b, run.progress)
    run.measurements.append(result)
    run.agreements["crossencoder_vs_onnxruntime"] = {"max_abs_diff": float(np.abs(crossencoder_b - fp32_b).max())}


def _measure_served(
    run: _Session,
    system: str,
    repository: Path,
    runs: tuple[tuple[Workload, int], ...],
    b: Workload,
    fp32_b: np.ndarray,
) -> None:
    """`rerank serve` on the repository: each run measured, and (b)'s served logits against in-process
    fp32's."""
    from bench.served import Sampler, ServedStack, served_logits

    run.progress.stage(f"starting rerank serve ({system})")
    log_path = run.args.output / f"{system}.log"
    stack = ServedStack.start(repository, log_path)
    sampler = Sampler(stack.frontend, stack.triton)
    sampler.start()
    try:
        run_served(stack, run.warm, 1, sampler, _Quiet(run.progress), system)
        for workload, repeats in runs:
            try:
                run.measurements.append(run_served(stack, workload, repeats, sampler, run.progress, system))
            except Exception as error:  # noqa: BLE001 - one failed run is reported, the others still run
                run.failed(system, workload.name, error)
        (request,) = b.requests
        logits, precision = asyncio.run(served_logits(stack.target, request))
        run.agreements[f"{system}_vs_fp32"] = {**agreement(fp32_b, logits), "precision": precision}
    finally:
        sampler.stop()
        code = stack.stop()
        if code != 0:
            run.progress.log(f"rerank serve exited with {code}; see {log_path}")


def _has_packed() -> bool:
    import importlib.util

    return importlib.util.find_spec("rerank_triton_model.modernbert_packed") is not None


class _Quiet(Progress):
    """A warm-up's progress: counted nowhere."""

    def __init__(self, parent: Progress) -> None:
        self.parent = parent

    def log(self, line: str) -> None:
        self.parent.log(line)

    def stage(self, title: str) -> None:
        self.parent.stage(f"{title} (warm-up)")

    def advance(self, pairs: int) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
