"""`rerank export`'s options, and the checks that they combine into something a runtime computes.

Standard library only (with the registry): `rerank query` and `rerank serve --help` load these options
without torch or onnx.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from rerank_server import flags
from rerank_server.flags import option
from rerank_triton_model.runtimes import CPU, FP32, GPU, RUNTIMES, Runtime, default_runtime, runtime

DEFAULT_MODEL = "Alibaba-NLP/gte-reranker-modernbert-base"
AUTO = "auto"
# By device; the first is the default. auto (CPU): measure the precisions this CPU runs natively and keep the
# fastest that ranks like fp32 (auto.py).
PRECISIONS = {CPU: (AUTO, FP32, "bf16", "int8"), GPU: ("fp16", "bf16", FP32)}
INT8 = "int8"
QUANTIZATIONS = (INT8,)


class ExportError(Exception):
    """The checkpoint cannot be exported; the message says why."""


@dataclass(frozen=True)
class ExportOptions:
    model: str = option(DEFAULT_MODEL, "hub id or local checkpoint folder")
    output: Path = option(None, "model repository folder to write into", required=True)
    name: str = option("reranker", "model name in the repository")
    model_id: str | None = option(None, "model name reported to callers (default: the hub id or folder name)")
    tokenizer: str | None = option(None, "hub id or folder of the tokenizer (default: --model)")
    device: str = option(CPU, "instance kind", choices=(CPU, GPU))
    runtime: str | None = option(
        None,
        "what runs the model in Triton: onnxruntime (the ONNX graph), torch (transformers' model on padded rows) "
        "or packed (the unpadded ModernBERT engine) (default: onnxruntime for fp32 and int8 on cpu, packed for "
        "bf16 and on gpu; --precision auto picks it)",
        choices=tuple(RUNTIMES),
    )
    precision: str | None = option(
        None,
        "cpu: auto (the default: measure the precisions this CPU runs natively on short, mixed and long pairs "
        "and keep the fastest that ranks like fp32), fp32, bf16 or int8 (ONNX Runtime dynamic quantization); "
        "gpu: fp16 (the default), bf16 or fp32. A CPU model keeps fp32 weights: a CPU without bf16 or VNNI "
        "serves those instead",
        choices=(AUTO, FP32, "bf16", INT8, "fp16"),
    )
    quantize: str | None = option(None, "an alias of --precision int8", choices=QUANTIZATIONS)
    max_length: int | None = option(None, "tokens per pair (default: the model's limit)")
    max_batch_size: int = option(32, "requests merged per execution")
    max_batch_tokens: int | None = option(
        None, "tokens per model run (default: max(8192, max length)); the packed engine on CPUs runs at most 2,048"
    )
    max_queue_delay_us: int = option(2000, "dynamic batcher delay")
    triton_priority: bool = option(
        False,
        "give Triton's dynamic batcher two priority levels, so that queued calls at priority 0 run before queued "
        "background calls. Off by default: levels turn off the batcher's prefetching, and Triton's path without it "
        "can hold queued requests for up to 500 ms (docs/performance.md). The frontend's admission and tokenizer "
        "queue honour priority either way",
    )
    instance_count: int = option(1, "model instances")
    intra_op_threads: int = option(0, "threads per model instance (0: all cores)")
    long_pair_tokens: int | None = option(
        None,
        "cpu, runtimes with dense attention (onnxruntime, torch): pairs longer than this run on the packed "
        "engine over the fp32 checkpoint (saved beside), whose attention is linear in the local layers and never "
        "holds a T x T buffer; 0: off (default: measured by --precision auto, else 1024)",
    )
    auto_seconds: float = option(
        90.0,
        "cpu, --precision auto: measure candidates for at most about this long once 3 rounds are done, unless one "
        "leads beyond the run-to-run spread sooner",
    )
    warmup: bool = option(
        True,
        "run requests of the shapes the engine plans through each model instance before Triton reports the model "
        "ready (config.pbtxt model_warmup), so that the first calls after ready are as fast as the later ones",
    )
    opset: int = option(18, "ONNX opset")
    overwrite: bool = option(False, "replace an existing model of that name")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One --flag per option, with its default shown."""
        flags.add_arguments(cls, parser)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> ExportOptions:
        """The options given as flags, converted to their types; the rest keep their defaults."""
        return cls(**flags.values(cls, args))

    @property
    def resolved_precision(self) -> str:
        if self.precision:
            return self.precision
        if self.quantize:
            return self.quantize
        if self.device == CPU and self.runtime is not None:
            return FP32  # auto chooses runtimes itself: a runtime named alone runs its fp32
        return PRECISIONS.get(self.device, (FP32,))[0]

    @property
    def resolved_runtime(self) -> Runtime:
        """The runtime of a fixed precision (auto chooses its own)."""
        if self.runtime:
            return runtime(self.runtime)
        return default_runtime(self.device, self.resolved_precision)

    def batch_tokens(self, max_length: int) -> int:
        """Tokens per model run, as the served model gets them (max_batch_tokens, else max(8192, max_length))."""
        return self.max_batch_tokens or max(8192, max_length)

    @property
    def resolved_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        local = Path(self.model)
        return local.resolve().name if local.is_dir() else self.model


def checked_precision(options: ExportOptions) -> str:
    """The precision to export (auto, or a fixed one), once the options agree with each other."""
    if options.device not in PRECISIONS:
        raise ExportError(f"device must be one of {sorted(PRECISIONS)}, got {options.device!r}")
    precision = options.resolved_precision
    if options.quantize is not None:
        if options.quantize not in QUANTIZATIONS:
            raise ExportError(f"quantize must be one of {list(QUANTIZATIONS)}, got {options.quantize!r}")
        if options.device != CPU:
            raise ExportError(
                f"--quantize {options.quantize} makes a CPU model (ONNX Runtime's dynamic int8 CPU kernels); "
                f"it cannot be combined with --device {options.device}"
            )
        if precision not in (options.quantize, FP32):
            raise ExportError(f"--quantize {options.quantize} quantizes the fp32 graph; drop --precision {precision}")
        precision = options.quantize
    if precision not in PRECISIONS[options.device]:
        raise ExportError(f"precision {precision!r} is not offered on {options.device}: {PRECISIONS[options.device]}")
    try:
        named = options.resolved_runtime
    except ValueError as error:
        raise ExportError(str(error)) from None
    if precision == AUTO:
        if options.runtime is not None:
            raise ExportError("--precision auto chooses the runtime itself; drop --runtime or name a precision")
    elif not named.offers(options.device, precision):
        able = [r.name for r in RUNTIMES.values() if r.offers(options.device, precision)]
        raise ExportError(
            f"the {named.name} runtime does not compute {precision} on {options.device}; "
            f"--runtime {' or '.join(able)} does"
        )
    if options.auto_seconds < 0:
        raise ExportError(f"--auto-seconds must not be negative, got {options.auto_seconds}")
    if options.long_pair_tokens is not None and options.long_pair_tokens < 0:
        raise ExportError(f"--long-pair-tokens must be 0 (off) or positive, got {options.long_pair_tokens}")
    # Values config.pbtxt would carry to Triton, which refuses to load the model with a message about
    # the config, not the flag.
    for flag, value, least in (
        ("--max-batch-size", options.max_batch_size, 1),
        ("--max-batch-tokens", options.max_batch_tokens, 1),
        ("--max-queue-delay-us", options.max_queue_delay_us, 0),
        ("--instance-count", options.instance_count, 1),
        ("--intra-op-threads", options.intra_op_threads, 0),
    ):
        if value is not None and value < least:
            raise ExportError(f"{flag} must be at least {least}, got {value}")
    return precision
