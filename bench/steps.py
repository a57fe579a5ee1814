"""The steps of `python -m bench.run`: which systems run on which workloads how many times, each
measured after a warm-up, with every precision's ranking agreement against in-process ONNX Runtime fp32."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common import Progress, Quiet
from bench.measure import pair_inputs, run_crossencoder, run_inprocess, run_served
from bench.models import SYSTEMS, Models, auto_choice
from bench.profiles import gemm_check, op_profile
from bench.workloads import Request, Workload
from rerank_server.export.agreement import agreement
from rerank_triton_model.runtimes import ONNXRUNTIME, PACKED, TORCH

if TYPE_CHECKING:
    from bench.served import ServedStack
    from rerank_triton_model.reranker_engine import PackedReranker


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
# The shortest py-spy recording of a served run: at 100 samples/s, enough for its shares to mean something.
MIN_SAMPLED_S = 1.0


def planned_pairs(args: argparse.Namespace, plan: Plan, built: dict[str, Workload]) -> int:
    """The pairs the plan will score, for the progress bar; systems the run turns out not to have are
    skipped from it."""
    a1, a4, a16, b, c = (built[k] for k in roles(built))
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


def roles(built: dict[str, Workload]) -> tuple[str, str, str, str, str]:
    """Names of (a) at the lowest, middle and highest concurrency, then (b) and (c)."""
    fixed = sorted((w for w in built.values() if w.kind == "a"), key=lambda w: w.concurrency)
    if len(fixed) != 3:
        raise ValueError("expected (a) at three concurrencies")
    return fixed[0].name, fixed[1].name, fixed[2].name, "b", "c"


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
        run_inprocess(system, engine, self.tokenizer, self.warm, 1, Quiet(self.progress))

    def op_profile(self, name: str, first: Request, int8: bool = False) -> None:
        """ONNX Runtime's per-operator profile of the fp32 (or int8) graph on 4 rows of the first pair."""
        ids = np.asarray(pair_inputs(self.tokenizer, first)[0][: 4 * first.pair_lengths[0]]).reshape(4, -1)
        model = self.models.model_dir(int8=int8) / "1" / "model.onnx"
        self.profile[name] = op_profile(model, ids, self.models.parameters().intra_op_threads, self.workdir)

    @contextlib.contextmanager
    def sampled(self, stack: ServedStack, system: str, workload: Workload) -> Iterator[None]:
        """py-spy samples of the Python-backend stub and the frontend while the block runs, summarized into
        profile["served"][system][workload] (bench.stub_profile); a failure to sample is reported and the
        block still runs."""
        from bench.stub_profile import sampled

        stubs = stack.stubs()
        if not stubs:
            self.failed(system, f"{workload.name} py-spy", RuntimeError("no triton_python_backend_stub process"))
            yield
            return
        stem = self.args.output / "py-spy" / f"{system}-{workload.name}"
        with sampled(stubs[0].pid, stack.frontend.pid, stem) as sampling:
            yield
        if sampling.summary is None:
            self.failed(system, f"{workload.name} py-spy", RuntimeError(sampling.error))
        else:
            self.profile.setdefault("served", {}).setdefault(system, {})[workload.name] = sampling.summary

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


def measure(
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

    a1, a4, a16, b, c = (built[k] for k in roles(built))
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
    auto = auto_choice(run.models)
    for runtime, precision in _variants(run.args, run.models, auto):
        system = SYSTEMS[(runtime, precision)]
        try:
            variant = run.engine(runtime, precision)
            run.warm_up(system, variant)
            run.inprocess(system, variant, a1, run.plan.variant_a)
            repeats_b = run.plan.int8_b if system == "onnxruntime-int8" else run.plan.variant_b
            run.agreements[f"{system}_vs_fp32"] = agreement(
                fp32_b, run.inprocess(system, variant, b, repeats_b)
            ).as_dict()
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
    run_crossencoder(model, run.warm, 1, Quiet(run.progress))
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
    fp32's. Unless --skip-profile, py-spy then samples more untimed passes of (a) at the lowest and the
    highest concurrency, for at least MIN_SAMPLED_S each (the sampler's own CPU never counts in a measured run)."""
    from bench.served import Sampler, ServedStack, drive, served_logits

    fixed = sorted((w for w, _ in runs if w.kind == "a"), key=lambda w: w.concurrency)
    profiled = [] if run.args.skip_profile or not fixed else [fixed[0], fixed[-1]]

    run.progress.stage(f"starting rerank serve ({system})")
    log_path = run.args.output / f"{system}.log"
    stack = ServedStack.start(repository, log_path)
    sampler = Sampler(stack.frontend, stack.triton)
    sampler.start()
    try:
        run_served(stack, run.warm, 1, sampler, Quiet(run.progress), system)
        for workload, repeats in runs:
            try:
                run.measurements.append(run_served(stack, workload, repeats, sampler, run.progress, system))
            except Exception as error:  # noqa: BLE001 - one failed run is reported, the others still run
                run.failed(system, workload.name, error)
        for workload in profiled:
            try:
                with run.sampled(stack, system, workload):
                    # At least MIN_SAMPLED_S of samples: a quick run is over in a few of py-spy's intervals.
                    # The calls alone: run_served's reads of Triton's statistics would be idle time in the samples.
                    started = time.monotonic()
                    while True:
                        asyncio.run(drive(stack.target, workload, 1, lambda _: None))
                        if time.monotonic() - started >= MIN_SAMPLED_S:
                            break
            except Exception as error:  # noqa: BLE001 - a failed profile is reported, the run goes on
                run.failed(system, f"{workload.name} py-spy", error)
        (request,) = b.requests
        logits, precision = asyncio.run(served_logits(stack.target, request))
        run.agreements[f"{system}_vs_fp32"] = {**agreement(fp32_b, logits).as_dict(), "precision": precision}
    finally:
        sampler.stop()
        code = stack.stop()
        if code != 0:
            run.progress.log(f"rerank serve exited with {code}; see {log_path}")


def _has_packed() -> bool:
    import importlib.util

    return importlib.util.find_spec("rerank_triton_model.modernbert_packed") is not None
