"""The CPU's numeric features and the precision a model runs in on it.

Stdlib only: `rerank export` copies it with the model package, and Triton's Python-backend stub
imports it when the model loads, as does the frontend (the same function, the same inputs) to
report the precision in use.

A repository exported on one machine may be served on another (an image built on a workstation,
nodes of mixed CPU generations). bf16 is worth running only where the CPU computes it (AVX512_BF16
or AMX-BF16): elsewhere it is emulated, slower than fp32. int8 is worth it only with VNNI dot
products (AVX512_VNNI, AVX-VNNI or AMX-INT8): without them the u8 kernels saturate int16 sums and gain
nothing. So a model loads in the precision it was exported in where the CPU runs it natively, and
otherwise in the best native precision whose weights the repository holds (fp32 at least).

Two environment variables, for tests and for operators who know better:
    RERANK_CPU_FLAGS        comma-separated flags that replace /proc/cpuinfo's (pretend to be another CPU)
    RERANK_FORCE_PRECISION  run this precision even where it is emulated (slow but correct)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .contract import ModelParameters
from .runtimes import CPU, FP32, default_runtime, long_pairs, runtime

# The flags that decide which precisions are native, as /proc/cpuinfo names them.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
FLAGS_ENV = "RERANK_CPU_FLAGS"
FORCE_ENV = "RERANK_FORCE_PRECISION"
CPU_PRECISIONS = ("bf16", "int8", "fp32")  # fastest first, where native


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The FLAGS this CPU has ($RERANK_CPU_FLAGS instead, when set; none where /proc/cpuinfo is unreadable)."""
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        return frozenset(f.strip() for f in override.split(",") if f.strip())
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split()) & frozenset(FLAGS)
    return frozenset()


def native_precisions(flags: frozenset[str] | set[str]) -> list[str]:
    """The precisions this CPU computes natively, fastest first; fp32 always."""
    out = []
    if set(flags) & set(BF16_FLAGS):
        out.append("bf16")
    if set(flags) & set(INT8_FLAGS):
        out.append("int8")
    return [*out, "fp32"]


def _lacks(precision: str) -> str:
    needs = BF16_FLAGS if precision == "bf16" else INT8_FLAGS
    return f"the CPU has none of {', '.join(needs)}"


def resolve_precision(
    requested: str, flags: frozenset[str] | set[str], available: tuple[str, ...] | list[str] | None = None
) -> tuple[str, str]:
    """(precision to run, why) for a model exported in `requested` whose repository holds weights for
    `available` (default: `requested` and fp32). Raises ValueError when nothing it holds can run."""
    held = list(available) if available is not None else list(dict.fromkeys([requested, "fp32"]))
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced:
        if forced not in held:
            raise ValueError(f"{FORCE_ENV}={forced}, but the repository holds weights for {held} only")
        emulated = forced in CPU_PRECISIONS and forced not in native_precisions(flags)
        return forced, f"forced by {FORCE_ENV}" + (f" ({_lacks(forced)}: emulated, slow)" if emulated else "")
    if requested not in CPU_PRECISIONS:
        return requested, f"{requested} is not a CPU precision: run as exported"
    native = native_precisions(flags)
    if requested in native:
        if requested == "fp32":
            return requested, "as exported"
        have = sorted(set(flags) & set(BF16_FLAGS if requested == "bf16" else INT8_FLAGS))
        return requested, f"as exported: the CPU runs {requested} natively ({', '.join(have)})"
    for precision in native:
        if precision in held:
            return precision, f"exported as {requested}, but {_lacks(requested)}: {precision} instead"
    # No fp32 weights (a repository from before fp32 fallbacks): keep what it holds.
    return requested, f"{_lacks(requested)}, and the repository holds no fp32 weights: {requested} kept"


@dataclass(frozen=True)
class Choice:
    """What a model instance runs: the precision, the runtime and weights file computing it, and why; and
    the precision of the packed engine that computes its pairs over long_pair_tokens (None: no routing)."""

    precision: str
    runtime: str
    weights: str
    requested: str
    reason: str
    long_precision: str | None = None


def served_choice(parameters: ModelParameters, flags: frozenset[str] | set[str], on_gpu: bool = False) -> Choice:
    """The choice for a model's config.pbtxt parameters (precision, runtime, weights, the fp32 fallback's
    fp32_runtime and fp32_weights, the long-pair routing) on a CPU with these flags. GPUs run as exported.
    Raises ValueError for a runtime the registry does not know."""
    requested, served, weights = parameters.precision, parameters.runtime, parameters.weights
    runtime(served)
    if on_gpu:
        return Choice(requested, served, weights, requested, "GPU instance: as exported")
    held = {requested: (served, weights)}
    if parameters.fp32_weights:
        held.setdefault(FP32, (parameters.fp32_runtime or default_runtime(CPU, FP32).name, parameters.fp32_weights))
    precision, reason = resolve_precision(requested, flags, list(held))
    served, weights = held[precision]
    routed = parameters.long_pair_tokens > 0 and bool(parameters.long_weights)
    long_precision = long_pairs(runtime(served), precision, CPU) if routed else None
    return Choice(precision, served, weights, requested, reason, long_precision)
