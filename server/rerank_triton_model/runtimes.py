"""The runtimes that compute the model inside Triton, in one registry: what each is built from, what weights
it needs, where and in which precisions it runs, whether it serves long pairs itself, and how the export
checks it against eager.

Every other module asks this one (`runtime(name)`, a Runtime's fields, `default_runtime`, `long_pairs`)
instead of comparing runtime names: model.py builds the served engine here, `rerank export` writes and
verifies the weights a Runtime names, the benchmarks build their in-process engines here, and the tests
name runtimes through it.

Standard library only at import (the frontend reads the registry to report what is served); `build`
imports the engine, and torch or ONNX Runtime, when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .reranker_engine import PackedReranker

CPU, GPU = "cpu", "gpu"
FP32 = "fp32"
# CPU models whose runtime is not the packed engine: pairs longer than this run on the packed engine
# (RoutedReranker) unless the export measured or was given another threshold. A conservative default: single
# pairs put the crossover between 256 and 512 tokens (docs/performance.md, Engine and precision).
LONG_PAIR_TOKENS = 1024


@dataclass(frozen=True)
class Runtime:
    """One way to compute the model inside the Python-backend model."""

    name: str  # the `runtime` config parameter and `rerank export --runtime`
    weights: str  # what it loads in the version folder: an ONNX graph file or a checkpoint folder
    # Weights are an ONNX graph in the served precision; else the fp32 transformers checkpoint, cast to the
    # served precision when the model loads (one folder serves a reduced precision, its fp32 fallback and
    # the long-pair engine).
    graph: bool
    precisions: Mapping[str, tuple[str, ...]]  # by device kind (CPU, GPU), the export's default first
    # No padding and no T x T attention buffer: it serves pairs of any length itself. The others hand pairs
    # over a model's long_pair_tokens to the packed engine on CPUs (dense attention costs O(length²)).
    packed: bool
    summary: str

    def offers(self, device: str, precision: str) -> bool:
        return precision in self.precisions.get(device, ())

    def checked_as(self, device: str, precision: str, cuda: bool) -> tuple[str, str]:
        """(torch device, precision) in which the export checks it against eager: as served where the
        device is here; a GPU export made without a GPU checks a checkpoint's weights in fp32 on the CPU
        and a graph as it is (ONNX Runtime's CPU provider, where it has the kernels)."""
        if device == GPU and cuda:
            return "cuda", precision
        if device == GPU:
            return "cpu", precision if self.graph else FP32
        return "cpu", precision

    def build(
        self,
        weights: str,
        *,
        device: str,
        precision: str,
        pad_token_id: int,
        max_batch_tokens: int,
        intra_op_threads: int = 0,
    ) -> PackedReranker:
        """The engine over `weights` (a path) on `device` ("cpu" or "cuda:N") in `precision`."""
        from .reranker_engine import PackedReranker

        common = {"pad_token_id": pad_token_id, "max_batch_tokens": max_batch_tokens}
        if self.graph:
            on_gpu = device.startswith("cuda")
            providers: list[str | tuple[str, dict[str, object]]] = ["CPUExecutionProvider"]
            if on_gpu:
                index = int(device.partition(":")[2] or 0)
                providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            # Refuses to load when the CUDA provider cannot start (no silent fall-back to the CPU).
            return PackedReranker.from_file(weights, providers=providers, intra_op_threads=intra_op_threads, **common)
        return PackedReranker.from_pretrained(
            weights, device=device, precision=precision, packed=self.packed, intra_op_threads=intra_op_threads, **common
        )


ONNXRUNTIME = Runtime(
    name="onnxruntime",
    weights="model.onnx",
    graph=True,
    precisions={CPU: (FP32, "int8"), GPU: ("fp16", FP32)},
    packed=False,
    summary="ONNX Runtime on the exported graph, padded sub-batches",
)
TORCH = Runtime(
    name="torch",
    weights="model",
    graph=False,
    precisions={CPU: (FP32, "bf16"), GPU: ("fp16", "bf16", FP32)},
    packed=False,
    summary="transformers' PyTorch model (sdpa) on padded sub-batches",
)
# The same checkpoint and precisions as TORCH, computed without padding.
PACKED = replace(
    TORCH,
    name="packed",
    packed=True,
    summary="the packed ModernBERT engine: no padding, windowed local attention, no T x T buffer",
)
RUNTIMES: dict[str, Runtime] = {r.name: r for r in (ONNXRUNTIME, TORCH, PACKED)}
# What serves a precision when the export is not told which runtime: the fastest measured for it.
_DEFAULTS = {(CPU, FP32): ONNXRUNTIME, (CPU, "int8"): ONNXRUNTIME, (CPU, "bf16"): PACKED}


def runtime(name: str) -> Runtime:
    """The runtime of that name; ValueError names the known ones."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}: expected one of {', '.join(RUNTIMES)}") from None


def default_runtime(device: str, precision: str) -> Runtime:
    """The runtime a precision gets on a device when none is named: the packed engine on GPUs."""
    return _DEFAULTS.get((device, precision), PACKED)


def long_pairs(served: Runtime, precision: str, device: str) -> str | None:
    """The precision in which the packed engine computes a model's long pairs, or None where `served`
    computes them itself (the packed engine, or any GPU runtime). The served precision where the packed
    engine has it (a bf16 model's long pairs in bf16), else fp32 (int8's)."""
    if served.packed or device != CPU:
        return None
    return precision if PACKED.offers(device, precision) else FP32
