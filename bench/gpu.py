"""The GPU check: the served packed engine against the padded engine and transformers eager, in one run on one card.

    python3 -m bench.gpu_pack run artifacts/gpu-pack -- --output DIR   # a CUDA machine without this project's
                                                                       # packages (`make gpu-check`)
    python -m bench.gpu --output DIR                                   # a CUDA machine with them installed
    python -m bench.gpu --quick --device cpu                           # the same steps on a tiny model, on the CPU

The GPU variant is `rerank export --device gpu` (the packed runtime: unpadded, varlen flash attention with
the local window; fp16 by default) served by `rerank serve` (frontend + local Triton, one KIND_GPU
instance). Side by side, on the same card and the workloads of bench.run (a, b, c):

    eager          a hand-rolled loop: transformers' model (sdpa) in the served precision, the tokenizer,
                   batches of 32 pairs in request order padded to their longest
    padded-engine  the engine in-process with transformers' model on length-sorted padded sub-batches
                   (the torch runtime) under the same token budget
    packed-engine  the served engine in-process: packed sub-batches, no tokenizing, gRPC or Triton (the
                   limit for the served path); also on large batches of (a)'s shape (tokens/s, share of
                   the card's measured matmul peak)
    served         rerank serve at concurrency 1, 4 and 16 on (a), and on (b) and (c)

plus the device memory peak (in-process: PyTorch's allocator; served: the card's used memory) and the served
model against fp32 eager on one (b) request (max |logit difference|, top-10 overlap, Spearman, and its
distinct logits over fp32 eager's: the fp32 head keeps them apart). Each measurement repeats its workload
for at least --seconds (calibrated on a second pass; the first carries first-run costs); --seconds shrinks
to keep the run within --budget-s. Writes gpu-results.json, gpu-results.md and gpu-results.png under
--output, and prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import workloads
from bench.common import RERANK, TOKENIZER_DIR, Progress, machine_info
from bench.measure import run_batched, run_inprocess, run_served
from bench.models import QUICK_CONFIG
from bench.workloads import Request, Workload
from rerank_server.export.agreement import SPEARMAN_BOUND, TOP10_OVERLAP_BOUND, agreement
from rerank_triton_model.contract import ModelParameters
from rerank_triton_model.runtimes import PACKED, TORCH

EAGER_BATCH = 32  # sentence-transformers' default batch size
# In-process "large batches of (a)'s shape": this many (a) pairs per call, under this token budget.
LARGE_PAIRS = 512
LARGE_BUDGET = 65536
# The targets on an H200, each a ratio of two measurements of this run.
TARGETS = {
    "served/packed-engine (a) c16": 0.9,
    "served/packed-engine (c)": 0.9,
    "packed-engine/eager (b)": 3.0,
    "packed-engine/padded-engine (b)": 1.5,
    "packed-engine large (a), tokens/s": 750_000,
    "fp16 vs fp32 top-10 overlap": TOP10_OVERLAP_BOUND,
    "fp16 vs fp32 Spearman": SPEARMAN_BOUND,
    "fp16 distinct logits / fp32's": 0.98,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("bench/results-gpu"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the steps")
    parser.add_argument("--quick", action="store_true", help="a tiny model and the small workloads")
    parser.add_argument("--seconds", type=float, default=4.0, help="least time per measurement")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time, roughly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-args", default="", help="extra `rerank export` arguments")
    return parser.parse_args(argv)


def repeats_for(seconds: float, one_pass_s: float) -> int:
    return max(1, min(1000, math.ceil(seconds / max(one_pass_s, 1e-6))))


class HandRolledEager:
    """transformers' model and tokenizer in a plain loop: batches of 32 pairs in request order."""

    def __init__(self, checkpoint: Path, device: str, dtype: Any) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch, self.device = torch, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        model = AutoModelForSequenceClassification.from_pretrained(
            str(checkpoint), dtype=dtype, attn_implementation="sdpa"
        )
        self.model = model.to(device).eval()

    def logits(self, query: str, documents: tuple[str, ...]) -> np.ndarray:
        out = []
        with self.torch.inference_mode():
            for start in range(0, len(documents), EAGER_BATCH):
                batch = documents[start : start + EAGER_BATCH]
                inputs = self.tokenizer([query] * len(batch), list(batch), padding=True, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                out.append(self.model(**inputs).logits[:, 0].float().cpu().numpy())
        return np.concatenate(out)


def eager_predict(eager: HandRolledEager, request: Request) -> np.ndarray:
    return eager.logits(request.query, request.documents)


class DeviceMemory:
    """Peak memory used on the card (by every process: the served model's stub too), sampled."""

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu, self.peak, self._stop = on_gpu, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(total - free)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.05)

    def __enter__(self) -> DeviceMemory:
        if self.on_gpu:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.on_gpu:
            self._thread.join()


def matmul_peak_tflops(device: str, dtype: Any) -> float | None:
    """The card's dense matmul rate in this precision (8192^3 products for about a second): the peak
    that tokens/s are reported against."""
    if device != "cuda":
        return None
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        runs += 10
    return 2 * 8192**3 * runs / (time.perf_counter() - start) / 1e12


def flops_per_token(config: dict[str, Any], tokens_per_pair: int) -> float:
    """Forward FLOPs per token: 2 per weight of the layers (embeddings excluded) plus attention's two
    products over the tokens each query sees (its pair on global layers, the window on local ones)."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    weights = layers * (4 * hidden * hidden + 3 * hidden * inter)  # Wqkv + Wo, Wi (gated: 2x) + Wo
    every = config.get("global_attn_every_n_layers", 3)
    global_layers = len([i for i in range(layers) if i % every == 0])
    window = min(config.get("local_attention", 128), tokens_per_pair)
    attention = 4 * hidden * (global_layers * tokens_per_pair + (layers - global_layers) * window)
    return float(2 * weights + attention)


@dataclass
class _Session:
    """What the GPU check's steps share: its arguments, the clock, and the results each step adds to."""

    args: argparse.Namespace
    seconds: float  # least time per measurement, within --budget-s
    started: float = field(default_factory=time.perf_counter)
    progress: Progress = field(default_factory=lambda: Progress(0, enabled=False))
    measurements: list[dict[str, Any]] = field(default_factory=list)
    agreements: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return bool(self.args.device == "cuda")

    def log(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {line}", flush=True)

    def calibrated(self, run: Callable[[int], Any]) -> Any:
        """run(repeats) once for first-run costs (CUDA kernels, allocator growth), once to time a pass,
        then for at least `seconds`; returns the last run's result."""
        run(1)
        warm = run(1)
        return run(repeats_for(self.seconds, warm[0]["wall_s"] if isinstance(warm, tuple) else warm["wall_s"]))

    def release_device_memory(self) -> None:
        if self.on_gpu:
            import torch

            torch.cuda.empty_cache()


@dataclass(frozen=True)
class _Export:
    """The random checkpoint and its `rerank export` (the served variant), as the steps read them."""

    checkpoint: Path
    repository: Path
    model_config: dict[str, Any]
    exported: dict[str, Any]  # the version folder's export.json
    parameters: ModelParameters
    tokenizer: Any

    @property
    def version(self) -> Path:
        return self.repository / "reranker" / "1"

    @property
    def precision(self) -> str:
        return str(self.exported["precision"])

    @property
    def runtime(self) -> str:
        return str(self.exported.get("runtime", PACKED.name))


def _export(run: _Session, workdir: Path) -> _Export | None:
    """A random checkpoint exported as the GPU variant (--device cpu: packed fp32); None if export failed."""
    from tokenizers import Tokenizer
    from transformers import ModernBertConfig

    from rerank_server.testing import exported_parameters, save_random_checkpoint

    args = run.args
    checkpoint = workdir / "checkpoint"
    config = {**(QUICK_CONFIG if args.quick else {}), "initializer_range": 0.02}
    save_random_checkpoint(checkpoint, TOKENIZER_DIR, seed=args.seed, **config)
    run.log(f"saved a random {'tiny' if args.quick else 'ModernBERT-base size'} checkpoint")
    repository = workdir / "repository"
    export = [RERANK, "export", "--model", str(checkpoint), "--output", str(repository)]
    export += (
        ["--device", "gpu"] if run.on_gpu else ["--device", "cpu", "--runtime", PACKED.name, "--precision", "fp32"]
    )
    done = subprocess.run([*export, *args.export_args.split()], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
        return None
    version = repository / "reranker" / "1"
    result = _Export(
        checkpoint,
        repository,
        ModernBertConfig(**config).to_dict(),
        json.loads((version / "export.json").read_text()),
        exported_parameters(repository / "reranker"),
        Tokenizer.from_file(str(version / "tokenizer" / "tokenizer.json")),
    )
    run.log(f"exported ({result.runtime}, {result.precision}): {result.exported['verification']}")
    return result


def _measure_engines(run: _Session, model: _Export, a1: Workload, b: Workload, c: Workload) -> dict[str, np.ndarray]:
    """The packed and padded engines in-process, each warmed up and calibrated on its own pass, then freed
    for Triton; the packed one on large batches of (a)'s shape too. Returns each one's (b) logits."""
    import torch

    engine_logits: dict[str, np.ndarray] = {}
    for system, built in (("packed-engine", PACKED), ("padded-engine", TORCH)):
        packed = built.packed
        engine = built.build(
            str(model.version / built.weights),
            device=run.args.device,
            precision=model.precision,
            pad_token_id=model.parameters.pad_token_id,
            max_batch_tokens=model.parameters.max_batch_tokens,
        )
        if run.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        for workload in (a1, b, c):
            result, logits = run.calibrated(
                partial(run_inprocess, system, engine, model.tokenizer, workload, progress=run.progress)
            )
            run.measurements.append(result)
            if workload is b:
                engine_logits[system] = logits
            run.log(f"{system} {workload.name}: {result['pairs_per_s']:.1f} pairs/s")
        if packed:
            # Large batches of (a)'s shape: one call of LARGE_PAIRS pairs under a LARGE_BUDGET token budget.
            engine.max_batch_tokens = LARGE_BUDGET
            first = a1.requests[0]
            copies = math.ceil(LARGE_PAIRS / first.pairs)
            request = workloads.Request(first.query, first.documents * copies, first.pair_lengths * copies)
            large = Workload(a1.name + "-large", a1.kind, f"{a1.title}, {request.pairs} pairs per call", ((request,),))
            result, _ = run.calibrated(
                partial(run_inprocess, system, engine, model.tokenizer, large, progress=run.progress)
            )
            result["workload"] = "a-large"
            run.measurements.append(result)
            run.log(f"packed-engine large (a): {result['tokens_per_s']:.0f} tokens/s")
        if run.on_gpu:
            run.memory[f"{system}_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del engine
        run.release_device_memory()
    return engine_logits


def _measure_eager(
    run: _Session, model: _Export, dtype: Any, a1: Workload, b: Workload
) -> tuple[np.ndarray, np.ndarray]:
    """The hand-rolled eager loop on (a) and (b). Returns its logits on the last (b) request, and fp32
    eager's there: the reference every path is held to."""
    eager = HandRolledEager(model.checkpoint, run.args.device, dtype)
    predict = partial(eager_predict, eager)
    for workload in (a1, b):
        measure = partial(run_batched, "eager", workload, predict=predict, progress=run.progress, batch=EAGER_BATCH)
        result, eager_b = run.calibrated(measure)
        run.measurements.append(result)
        run.log(f"eager {workload.name}: {result['pairs_per_s']:.1f} pairs/s")
    eager.model.float()
    last = b.requests[-1]
    reference = eager.logits(last.query, last.documents).astype(np.float64)
    del eager, predict
    return eager_b, reference


def _measure_served(
    run: _Session,
    model: _Export,
    served_workloads: list[Workload],
    last: Request,
    reference: np.ndarray,
    others: dict[str, np.ndarray],
) -> str:
    """rerank serve on the export: its logits on `last` held to fp32 eager's (`reference`) beside the
    in-process systems' (`others`), then every workload measured. Returns the tritonserver binary."""
    from bench.served import Sampler, ServedStack
    from rerank_client import RerankClient

    stack = ServedStack.start(model.repository, run.args.output / "gpu-serve.log")
    triton_binary = next(p.exe() for p in stack.triton if p.name() == "tritonserver")
    run.log(f"serving with {'KIND_GPU' if run.on_gpu else 'KIND_CPU'} ({triton_binary})")
    sampler = Sampler(stack.frontend, stack.triton)
    sampler.start()
    try:
        with RerankClient(stack.target, timeout=120) as client:
            response = client.rerank(last.query, list(last.documents))
        served_b = np.full(last.pairs, np.nan)
        for r in response.results:
            served_b[r.index] = r.logit
        for name, got in (("served", served_b), *others.items()):
            run.agreements[name] = agreement(reference, got).as_dict()
        run.log(f"against fp32 eager on one (b) request: {run.agreements}")
        with DeviceMemory(run.on_gpu) as device_memory:
            for workload in served_workloads:
                result = run.calibrated(partial(run_served, stack, workload, sampler=sampler, progress=run.progress))
                run.measurements.append(result)
                run.log(f"served {workload.name} c{workload.concurrency}: {result['pairs_per_s']:.1f} pairs/s")
        if run.on_gpu:
            run.memory["served_device_used_peak_gib"] = device_memory.peak / 2**30
    finally:
        sampler.stop()
        code = stack.stop()
        if code != 0:
            run.log(f"rerank serve exited with {code}")
    return triton_binary


def _rate(
    measurements: list[dict[str, Any]], system: str, kind: str, concurrency: int = 1, per_token: bool = False
) -> float:
    found = [
        m for m in measurements if m["system"] == system and m["workload"] == kind and m["concurrency"] == concurrency
    ]
    return float(found[0]["tokens_per_s" if per_token else "pairs_per_s"]) if found else float("nan")


def _ratios(run: _Session, top: int, c: Workload) -> dict[str, float]:
    """The target ratios (TARGETS names most), and the fp16 served model's agreement with fp32 eager."""
    rate = partial(_rate, run.measurements)
    served = run.agreements["served"]
    return {
        f"served/packed-engine (a) c{top}": rate("served", "a", top) / rate("packed-engine", "a"),
        "served/packed-engine (c)": rate("served", "c", c.concurrency) / rate("packed-engine", "c"),
        "packed-engine/eager (b)": rate("packed-engine", "b") / rate("eager", "b"),
        "packed-engine/padded-engine (b)": rate("packed-engine", "b") / rate("padded-engine", "b"),
        "packed-engine/eager (a)": rate("packed-engine", "a") / rate("eager", "a"),
        "packed-engine large (a), tokens/s": rate("packed-engine", "a-large", per_token=True),
        "fp16 vs fp32 top-10 overlap": served["top10_overlap"],
        "fp16 vs fp32 Spearman": served["spearman"],
        "fp16 vs fp32 max |logit difference|": served["max_abs_diff"],
        # The final norm, pooling and head run in fp32: the served logits are as distinct as fp32 eager's.
        "fp16 distinct logits / fp32's": served["distinct_ratio"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    machine = machine_info()
    if args.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        machine["gpu"] = {"name": properties.name, "memory_gib": properties.total_memory / 2**30}
    built = workloads.build(TOKENIZER_DIR, seed=args.seed, shape=workloads.QUICK if args.quick else workloads.FULL)
    fixed = sorted((w for w in built.values() if w.kind == "a"), key=lambda w: w.concurrency)
    a1, b, c = fixed[0], built["b"], built["c"]
    args.output.mkdir(parents=True, exist_ok=True)
    # Measurements: 6 in-process + 3 eager + served on every (a), (b), (c); each runs about 3 passes.
    planned = 9 + len(fixed) + 2
    run = _Session(args, max(0.2, min(args.seconds, 0.5 * args.budget_s / (3 * planned))), started)

    with tempfile.TemporaryDirectory(prefix="rerank-bench-gpu-") as temporary:
        model = _export(run, Path(temporary))
        if model is None:
            return 1
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(model.precision, torch.float32)
        engine_logits = _measure_engines(run, model, a1, b, c)
        eager_b, reference = _measure_eager(run, model, dtype, a1, b)
        peak_tflops = matmul_peak_tflops(args.device, dtype)
        run.release_device_memory()
        others = {**engine_logits, "eager": eager_b}
        triton_binary = _measure_served(run, model, [*fixed, b, c], b.requests[-1], reference, others)

    ratios = _ratios(run, fixed[-1].concurrency, c)
    large_tokens = ratios["packed-engine large (a), tokens/s"]
    flops = flops_per_token(model.model_config, a1.requests[0].pair_lengths[0])
    utilisation = None
    if peak_tflops:
        utilisation = {
            "matmul_peak_tflops": peak_tflops,
            "flops_per_token": flops,
            "large_batch_tflops": large_tokens * flops / 1e12,
            "share_of_peak": large_tokens * flops / 1e12 / peak_tflops,
        }
    results = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.gpu", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "precision": model.precision,
        "runtime": model.runtime,
        "max_batch_tokens": model.parameters.max_batch_tokens,
        "instance_kind": "KIND_GPU" if run.on_gpu else "KIND_CPU",
        "triton_binary": triton_binary,
        "export_verification": model.exported["verification"],
        "agreement_with_fp32_eager": run.agreements,
        "memory": run.memory,
        "utilisation": utilisation,
        "measurements": run.measurements,
        "ratios": ratios,
        "targets": {name: {"target": target, "met": ratios[name] >= target} for name, target in TARGETS.items()}
        if run.on_gpu and not args.quick
        else {},
        "seconds_per_measurement": run.seconds,
        "elapsed_s": time.perf_counter() - run.started,
    }
    (args.output / "gpu-results.json").write_text(json.dumps(results, indent=2))
    lines = markdown(results)
    (args.output / "gpu-results.md").write_text("\n".join(lines) + "\n")
    plot(run.measurements, args.output / "gpu-results.png", lines[0])
    print("\n".join(lines))
    return 0


def markdown(results: dict[str, Any]) -> list[str]:
    """gpu-results.md's lines: a title, the measurements' table, the ratios and the memory peaks."""
    machine, utilisation = results["machine"], results["utilisation"]
    lines = [
        f"{machine.get('gpu', {}).get('name', machine['cpu'])}, {results['runtime']} {results['precision']}, "
        f"token budget {results['max_batch_tokens']}, {results['instance_kind']}, {results['elapsed_s']:.0f} s",
        "",
        "| system | workload | clients | pairs/s | tokens/s | p50 ms | p99 ms | padding waste |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results["measurements"]:
        waste = m.get("padding_waste")
        lines.append(
            f"| {m['system']} | {m['workload']} | {m['concurrency']} | {m['pairs_per_s']:.1f} | "
            f"{m['tokens_per_s']:.0f} | {m['latency_ms']['p50']:.1f} | {m['latency_ms']['p99']:.1f} | "
            f"{'' if waste is None else f'{waste:.2f}'} |"
        )
    lines += ["", *(f"- {name}: {value:.3g}" for name, value in results["ratios"].items())]
    if utilisation:
        lines.append(f"- large batches: {utilisation['share_of_peak']:.1%} of the measured matmul peak")
    lines += [f"- {name}: {value:.2f} GiB" for name, value in results["memory"].items()]
    return lines


def plot(measurements: list[dict[str, Any]], path: Path, title: str) -> None:
    """Pairs/s of every measurement, one bar each, grouped by workload."""
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: no PNG (the JSON and Markdown are written)", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{m['system']}\n{m['workload']} c{m['concurrency']}" for m in measurements]
    colours = {"served": "tab:blue", "packed-engine": "tab:green", "padded-engine": "tab:olive", "eager": "tab:red"}
    figure, axis = plt.subplots(figsize=(max(8, len(labels) * 0.7), 4.5))
    axis.bar(
        range(len(labels)),
        [m["pairs_per_s"] for m in measurements],
        color=[colours.get(m["system"], "grey") for m in measurements],
    )
    axis.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("pairs/s")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
