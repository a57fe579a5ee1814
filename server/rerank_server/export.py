"""`rerank export`: a ModernBertForSequenceClassification checkpoint (one logit) to a Triton model repository.

    <output>/<name>/config.pbtxt          rendered from rerank_triton_model/config.pbtxt.template
    <output>/<name>/1/model.onnx         the graph (dynamic batch and sequence axes), verified against eager;
                                     with --precision int8, its dynamically quantized version (the fp32
                                     graph then stays as model.fp32.onnx: CPUs without VNNI load it)
    <output>/<name>/1/model/             instead, with --runtime torch: the checkpoint in the served
                                     precision, for transformers' PyTorch model
    <output>/<name>/1/model.py           one import: the Python-backend model is the package beside it,
    <output>/<name>/1/rerank_triton_model/   copied from server/rerank_triton_model
    <output>/<name>/1/tokenizer/         the fast tokenizer the frontend loads
    <output>/<name>/1/export.json        provenance: source, versions, verification result

torch, transformers, onnx and numpy are imported when an export runs: they are needed to export,
never to serve, and `rerank query` loads this module's options without them.
The model folder is assembled next to its destination and renamed into place, so a failed export
never leaves a half-written model for Triton to load.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import string
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

import rerank_triton_model
from rerank_server import flags
from rerank_server.flags import option
from rerank_triton_model.contract import INPUT_IDS, LOGITS, SEQUENCE_LENGTHS, ModelParameters
from rerank_triton_model.cpu_features import (
    BF16_FLAGS,
    INT8_FLAGS,
    cpu_flags,
    native_precisions,
    resolve_precision,
)
from rerank_triton_model.reranker_engine import LONG_PAIR_TOKENS

DEFAULT_MODEL = "Alibaba-NLP/gte-reranker-modernbert-base"
ARCHITECTURE = "ModernBertForSequenceClassification"
# The first is the default. auto (CPU): measure the precisions this CPU runs natively and keep the
# fastest whose ranking agrees with fp32 (`choose_precision`).
PRECISIONS = {"cpu": ("auto", "fp32", "bf16", "int8"), "gpu": ("fp16", "bf16", "fp32")}
# What computes the model inside Triton: ONNX Runtime on the exported graph, PyTorch on the checkpoint
# through transformers on padded rows (torch), or the packed engine (modernbert_packed: no padding,
# varlen flash attention with the local window on GPUs; the GPU default).
RUNTIMES = ("onnxruntime", "torch", "packed")
# Eager vs ONNX Runtime on the verification pairs; fp32 agrees to ~1e-6 in practice.
VERIFY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
# bf16 vs eager fp32: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation);
# over a few layers the logit error stays within a few % of the logits' scale (0.023 on a random
# ModernBERT-base whose logits reach ~3), so the bound is relative like int8's. 5% fails wrong weights
# or a wrong mask, which move logits by their whole scale.
BF16_RELATIVE_TOLERANCE = 0.05
# auto: a candidate must rank like fp32 on the built-in pairs (the bounds) ...
AGREEMENT_TOP10 = 0.95
AGREEMENT_SPEARMAN = 0.99
# ... and beat ONNX Runtime fp32 by more than the timing noise of a short measurement on a shared
# machine; fp32 is exact, so a tie keeps fp32.
MIN_SPEEDUP = 1.05
# Time each candidate scores the built-in pairs for (after one untimed pass), at least one pass.
MEASURE_SECONDS = 1.0
QUANTIZATIONS = ("int8",)
# int8 vs eager: quantization error grows with the activations, so its bound is relative to the
# largest |logit| of the verification pairs (at least 1). 5% passes the rounding error of a sound
# quantization (about 1% on ModernBERT-base) and fails a broken graph or the int16 saturation of
# u8s8 kernels on CPUs without VNNI (about 10%).
INT8_RELATIVE_TOLERANCE = 0.05


class ExportError(Exception):
    """The checkpoint cannot be exported; the message says why."""


@dataclass(frozen=True)
class ExportOptions:
    model: str = option(DEFAULT_MODEL, "hub id or local checkpoint folder")
    output: Path = option(Path("model_repository_build"), "model repository folder to write into", required=True)
    name: str = option("reranker", "model name in the repository")
    model_id: str | None = option(None, "model name reported to callers (default: the hub id or folder name)")
    tokenizer: str | None = option(None, "hub id or folder of the tokenizer (default: --model)")
    device: str = option("cpu", "instance kind", choices=("cpu", "gpu"))
    runtime: str | None = option(
        None,
        "what runs the model in Triton: onnxruntime (the ONNX graph), torch (transformers' model on padded rows) "
        "or packed (the unpadded ModernBERT engine) (default: onnxruntime on cpu, packed on gpu; torch for bf16; "
        "--precision auto picks it)",
        choices=RUNTIMES,
    )
    precision: str | None = option(
        None,
        "cpu: auto (the default: measure the precisions this CPU runs natively and keep the fastest that ranks "
        "like fp32), fp32, bf16 (PyTorch) or int8 (ONNX Runtime dynamic quantization); gpu: fp16 (the default), "
        "bf16 or fp32. A CPU model keeps fp32 weights: a CPU without bf16 or VNNI serves those instead",
        choices=("auto", "fp32", "bf16", "int8", "fp16"),
    )
    quantize: str | None = option(None, "same as --precision int8 (kept for older scripts)", choices=QUANTIZATIONS)
    max_length: int | None = option(None, "tokens per pair (default: the model's limit)")
    max_batch_size: int = option(32, "requests merged per execution")
    max_batch_tokens: int | None = option(None, "tokens per model run (default: max(8192, max length))")
    max_queue_delay_us: int = option(2000, "dynamic batcher delay")
    instance_count: int = option(1, "model instances")
    intra_op_threads: int = option(0, "threads per model instance (0: all cores)")
    long_pair_tokens: int = option(
        LONG_PAIR_TOKENS,
        "cpu, ONNX Runtime: pairs longer than this run on the packed engine over the fp32 checkpoint (saved "
        "beside the graph), whose attention is linear in the local layers and never holds a T x T buffer; "
        "0: every pair on ONNX Runtime",
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
        if self.device == "cpu" and self.runtime is not None:
            return "fp32"  # a runtime named without a precision: its fp32, as before auto existed
        return PRECISIONS.get(self.device, ("fp32",))[0]

    @property
    def resolved_runtime(self) -> str:
        """The runtime of a fixed precision (auto chooses its own)."""
        if self.runtime:
            return self.runtime
        if self.device == "gpu":
            return "packed"
        return "torch" if self.resolved_precision == "bf16" else "onnxruntime"

    @property
    def resolved_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        local = Path(self.model)
        return local.resolve().name if local.is_dir() else self.model


Progress = Callable[[str], None]


class _Steps:
    """Numbered progress lines with timings: `[2/6] Loading the model ... done in 1.2s`."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total, self.done, self.progress = total, 0, progress

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        self.progress(f"[{self.done}/{self.total}] {title} ...")
        start = time.perf_counter()
        yield
        self.progress(f"[{self.done}/{self.total}] {title}: done in {time.perf_counter() - start:.1f}s")


def check_config(config: Any) -> None:
    """Refuse anything that is not a single-logit ModernBERT sequence classifier."""
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type != "modernbert":
        raise ExportError(f"expected a ModernBERT checkpoint (model_type 'modernbert'), got model_type {model_type!r}")
    if ARCHITECTURE not in architectures:
        raise ExportError(
            f"expected a {ARCHITECTURE} checkpoint, got architectures {architectures or 'none'}: "
            "a base or masked-LM ModernBERT has no trained scoring head"
        )
    if config.num_labels != 1:
        raise ExportError(f"expected a cross-encoder with one output logit, got num_labels={config.num_labels}")


def export(options: ExportOptions, progress: Progress = print) -> Path:
    """Export the checkpoint into options.output/options.name; returns that folder."""
    precision = _checked_precision(options)
    destination = options.output / options.name
    if destination.exists() and not options.overwrite:
        raise ExportError(f"{destination} exists; pass --overwrite to replace it")

    import transformers

    runtime = "onnxruntime" if precision == "auto" else options.resolved_runtime
    cpu_variants = options.device == "cpu" and precision in ("auto", "bf16", "int8")
    flags = cpu_flags()
    candidates = cpu_candidates(precision, runtime, flags) if cpu_variants else []
    config = _load(transformers.AutoConfig.from_pretrained, options.model, "configuration")
    # Long-pair routing: where ONNX Runtime may serve (auto's choice is known later) and a pair can be that long.
    longest = min(int(getattr(config, "max_position_embeddings", 0)), options.max_length or sys.maxsize)
    routing = (
        options.device == "cpu"
        and 0 < options.long_pair_tokens < longest
        and "onnxruntime" in {runtime, *dict(candidates)}
    )
    extra = (
        _variant_steps(precision, candidates) if cpu_variants else (runtime == "onnxruntime" and precision == "fp16")
    )
    steps = _Steps(5 + extra + routing, progress)
    source = _load_source(options, config, steps)
    staging = options.output / f".{options.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / "1"
    version_dir.mkdir(parents=True)
    try:
        if cpu_variants:
            variant = _export_cpu_variants(source, options, precision, candidates, flags, version_dir, steps)
        else:
            variant = _export_weights(source, options, precision, runtime, version_dir, steps)
        long_pairs = _export_long_pairs(source, options, variant, version_dir, steps) if routing else None
        with steps.step("Writing the Triton model"):
            parameters = _write_model(source, options, variant, long_pairs, flags, staging)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(
        f"Exported {options.model} to {destination} ({parameters.runtime}, {parameters.precision}, "
        f"max_length {parameters.max_length})"
    )
    progress(f"Precision {parameters.precision}: {parameters.precision_reason}")
    return destination


def _checked_precision(options: ExportOptions) -> str:
    """The precision to export (auto, or a fixed one), once the options agree with each other."""
    if options.device not in PRECISIONS:
        raise ExportError(f"device must be one of {sorted(PRECISIONS)}, got {options.device!r}")
    precision = options.resolved_precision
    if options.quantize is not None:
        # --quantize int8 is an alias of --precision int8.
        if options.quantize not in QUANTIZATIONS:
            raise ExportError(f"quantize must be one of {list(QUANTIZATIONS)}, got {options.quantize!r}")
        if options.device != "cpu":
            raise ExportError(
                f"--quantize {options.quantize} makes a CPU model (ONNX Runtime's dynamic int8 CPU kernels); "
                f"it cannot be combined with --device {options.device}"
            )
        if precision not in (options.quantize, "fp32"):
            raise ExportError(f"--quantize {options.quantize} quantizes the fp32 graph; drop --precision {precision}")
        precision = options.quantize
    if precision not in PRECISIONS[options.device]:
        raise ExportError(f"precision {precision!r} is not offered on {options.device}: {PRECISIONS[options.device]}")
    if options.runtime is not None and options.runtime not in RUNTIMES:
        raise ExportError(f"runtime must be one of {list(RUNTIMES)}, got {options.runtime!r}")
    if precision == "auto" and options.runtime is not None:
        raise ExportError("--precision auto chooses the runtime itself; drop --runtime or name a precision")
    if precision == "int8" and options.resolved_runtime != "onnxruntime":
        raise ExportError("int8 quantizes the ONNX graph; use --runtime onnxruntime")
    if precision == "bf16" and options.resolved_runtime == "onnxruntime":
        raise ExportError("bf16 runs in PyTorch on CPUs; use --runtime torch (or leave --runtime out)")
    if options.long_pair_tokens < 0:
        raise ExportError(f"--long-pair-tokens must be 0 (off) or positive, got {options.long_pair_tokens}")
    return precision


@dataclass(frozen=True)
class _Source:
    """The checkpoint being exported: its configuration, the eager fp32 model and the tokenizer."""

    config: Any
    model: Any
    tokenizer: Any
    max_length: int


def _load_source(options: ExportOptions, config: Any, steps: _Steps) -> _Source:
    import torch
    import transformers

    with steps.step(f"Checking {options.model}"):
        check_config(config)
    with steps.step("Loading the model and tokenizer"):
        model, loading_info = _load(
            transformers.ModernBertForSequenceClassification.from_pretrained,
            options.model,
            "weights",
            attn_implementation="sdpa",
            dtype=torch.float32,
            output_loading_info=True,
        )
        if loading_info.get("missing_keys"):
            raise ExportError(f"the checkpoint lacks weights: {sorted(loading_info['missing_keys'])[:5]}")
        model.eval()
        tokenizer = _load(transformers.AutoTokenizer.from_pretrained, options.tokenizer or options.model, "tokenizer")
        if not tokenizer.is_fast:
            raise ExportError("the tokenizer has no fast (tokenizer.json) version, which the frontend needs")
        if len(tokenizer) > config.vocab_size:
            raise ExportError(f"the tokenizer has {len(tokenizer)} ids but the model embeds only {config.vocab_size}")
    return _Source(config, model, tokenizer, _max_length(config, tokenizer, options.max_length))


@dataclass(frozen=True)
class _Variant:
    """What the version folder serves: the precision, its runtime and weights, the fp32 fallback, and why."""

    precision: str
    runtime: str
    weights: str
    fp32_runtime: str
    fp32_weights: str
    reason: str
    verification: dict[str, Any]
    quantization: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None


def _export_weights(
    source: _Source, options: ExportOptions, precision: str, runtime: str, version_dir: Path, steps: _Steps
) -> _Variant:
    """A fixed precision that has no CPU variants (fp32, or any GPU precision) in `runtime`, verified."""
    import torch

    model, config, max_length = source.model, source.config, source.max_length
    if runtime == "onnxruntime":
        weights = "model.onnx"
        with steps.step(f"Exporting to ONNX (opset {options.opset})"):
            _export_onnx(model, config, version_dir / weights, options.opset, max_length)
        if precision == "fp16":
            with steps.step("Converting the graph to fp16"):
                _convert_fp16(version_dir / weights)
        with steps.step("Verifying ONNX Runtime against transformers eager"):
            verification = _verify(model, config, version_dir / weights, precision, max_length)
    elif runtime == "packed":
        weights = "model"
        with steps.step("Saving the fp32 checkpoint for the packed engine (cast to the served precision at load)"):
            model.save_pretrained(version_dir / weights)
        with steps.step("Verifying the packed engine against transformers eager"):
            verification = _verify_packed(model, config, version_dir / weights, precision, options.device, max_length)
    else:
        weights = "model"
        with steps.step(f"Saving the checkpoint in {precision} for PyTorch"):
            dtype = torch.float16 if precision == "fp16" else torch.float32
            state = {key: value.to(dtype) for key, value in model.state_dict().items()}
            model.save_pretrained(version_dir / weights, state_dict=state)
        with steps.step("Verifying the PyTorch runtime against transformers eager"):
            verification = _verify_torch(model, config, version_dir / weights, precision, options.device, max_length)
    # fp32 is its own fallback; a GPU model runs as exported.
    fp32_runtime, fp32_weights = (runtime, weights) if precision == "fp32" else ("", "")
    reason = f"--precision {precision}" if options.precision else f"the default on {options.device}"
    return _Variant(precision, runtime, weights, fp32_runtime, fp32_weights, reason, verification)


LONG_WEIGHTS = "model"  # the fp32 checkpoint folder, shared with the torch and packed runtimes


def _export_long_pairs(
    source: _Source, options: ExportOptions, variant: _Variant, version_dir: Path, steps: _Steps
) -> dict[str, Any] | None:
    """For a model ONNX Runtime may serve on CPUs (as exported, or as the fp32 fallback): the fp32
    checkpoint that the packed engine computes pairs longer than --long-pair-tokens on. ONNX Runtime's
    graph computes dense T x T attention in every layer: an 8,192-token pair there takes about a minute
    and holds ~16 GiB. Verified like a packed export."""
    with steps.step(f"Saving the fp32 checkpoint for pairs over {options.long_pair_tokens} tokens (packed engine)"):
        checkpoint = version_dir / LONG_WEIGHTS
        if (
            "onnxruntime" not in (variant.runtime, variant.fp32_runtime)
            or options.long_pair_tokens >= source.max_length
        ):
            # Nothing to route: ONNX Runtime never serves it, or no pair can be that long.
            if variant.weights != LONG_WEIGHTS:
                shutil.rmtree(checkpoint, ignore_errors=True)
            return None
        if not checkpoint.exists():
            source.model.save_pretrained(checkpoint)
        verification = _verify_packed(source.model, source.config, checkpoint, "fp32", "cpu", source.max_length)
    return {"long_pair_tokens": options.long_pair_tokens, "weights": LONG_WEIGHTS, "verification": verification}


def _write_model(
    source: _Source,
    options: ExportOptions,
    variant: _Variant,
    long_pairs: dict[str, Any] | None,
    flags: frozenset[str],
    staging: Path,
) -> ModelParameters:
    """The tokenizer, the model package, config.pbtxt and export.json; returns the parameters written."""
    import torch
    import transformers

    tokenizer, config, version_dir = source.tokenizer, source.config, staging / "1"
    tokenizer.save_pretrained(version_dir / "tokenizer")
    copy_model_package(version_dir)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)
    parameters = ModelParameters(
        source_model=options.resolved_model_id,
        precision=variant.precision,
        max_length=source.max_length,
        vocab_size=config.vocab_size,
        pad_token_id=pad_token_id,
        max_batch_tokens=options.max_batch_tokens or max(8192, source.max_length),
        intra_op_threads=options.intra_op_threads,
        runtime=variant.runtime,
        weights=variant.weights,
        precision_reason=variant.reason,
        cpu_flags=",".join(sorted(flags)),
        fp32_runtime=variant.fp32_runtime,
        fp32_weights=variant.fp32_weights,
        long_pair_tokens=long_pairs["long_pair_tokens"] if long_pairs else 0,
        long_weights=long_pairs["weights"] if long_pairs else "",
        export_id=uuid.uuid4().hex,
    )
    (staging / "config.pbtxt").write_text(render_config(options, parameters))
    provenance = {
        "options": {k: str(v) for k, v in asdict(options).items()},
        "precision": variant.precision,
        "runtime": variant.runtime,
        "weights": variant.weights,
        "fp32_fallback": {"runtime": variant.fp32_runtime, "weights": variant.fp32_weights}
        if variant.fp32_weights
        else None,
        "long_pairs": long_pairs,
        "precision_reason": variant.reason,
        "cpu_flags": sorted(flags),
        "precision_selection": variant.selection,
        "quantization": variant.quantization,
        "max_length": source.max_length,
        "config": config.to_dict(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "verification": variant.verification,
    }
    (version_dir / "export.json").write_text(json.dumps(provenance, indent=2, default=str))
    return parameters


def cpu_candidates(precision: str, runtime: str, flags: frozenset[str]) -> list[tuple[str, str]]:
    """(runtime, precision) pairs to export: the named one, or for auto ONNX Runtime fp32 (the
    reference, always) and the precisions this CPU computes natively."""
    if precision != "auto":
        return [(runtime, precision)]
    native = native_precisions(flags)
    candidates = [("onnxruntime", "fp32")]
    if "int8" in native:
        candidates.append(("onnxruntime", "int8"))
    if "bf16" in native:
        # transformers' model on padded sub-batches, and the packed engine (no padding) where present.
        candidates += [(runtime, "bf16") for runtime in ("torch", "packed") if runtime in RUNTIMES]
    return candidates


def _variant_steps(precision: str, candidates: list[tuple[str, str]]) -> int:
    """Steps beyond check, load, export, verify and write."""
    int8 = any(p == "int8" for _, p in candidates)
    checkpoint = any(r != "onnxruntime" for r, _ in candidates)
    return int8 + 2 * checkpoint + (precision == "auto" and len(candidates) > 1)


def _export_cpu_variants(
    source: _Source,
    options: ExportOptions,
    precision: str,
    candidates: list[tuple[str, str]],
    flags: frozenset[str],
    version_dir: Path,
    steps: _Steps,
) -> _Variant:
    """The fp32 graph (always: the reference and every CPU's fallback), then what the candidates
    need (the int8 graph, the fp32 checkpoint that PyTorch casts to bf16 at load), each verified
    against eager; with auto, the measured choice. Leaves the chosen weights and the fp32 fallback."""
    model, config, max_length = source.model, source.config, source.max_length
    onnx_path = version_dir / "model.onnx"
    int8_path = version_dir / "model.int8.onnx"
    checkpoint = version_dir / "model"
    with steps.step(f"Exporting to ONNX (opset {options.opset})"):
        _export_onnx(model, config, onnx_path, options.opset, max_length)
    with steps.step("Verifying ONNX Runtime against transformers eager"):
        verification = {"fp32": _verify(model, config, onnx_path, "fp32", max_length)}
    quantization = None
    if any(p == "int8" for _, p in candidates):
        with steps.step("Quantizing to int8 (dynamic) and verifying it against eager"):
            quantization = quantize_int8(onnx_path, int8_path)
            verification["int8"] = _verify(model, config, int8_path, "int8", max_length)
    if any(r != "onnxruntime" for r, _ in candidates):
        with steps.step("Saving the fp32 checkpoint for PyTorch (cast to the served precision at load)"):
            model.save_pretrained(checkpoint)
        with steps.step("Verifying the PyTorch runtimes (fp32 and bf16) against transformers eager"):
            verification["torch-fp32"] = _verify_torch(model, config, checkpoint, "fp32", "cpu", max_length)
            for runtime, candidate in candidates:
                if runtime == "torch":
                    verification[f"torch-{candidate}"] = _verify_torch(
                        model, config, checkpoint, candidate, "cpu", max_length
                    )
                elif runtime == "packed":
                    verification[f"packed-{candidate}"] = _verify_packed(
                        model, config, checkpoint, candidate, "cpu", max_length
                    )
    selection = None
    if precision == "auto" and len(candidates) > 1:
        with steps.step(f"Measuring {len(candidates)} candidates on this CPU"):
            selection = choose_precision(candidates, version_dir, config, source.tokenizer, options, max_length)
        runtime, chosen, reason = selection["runtime"], selection["precision"], selection["reason"]
    elif precision == "auto":
        runtime, chosen = candidates[0]
        lacking = ", ".join((*BF16_FLAGS, *INT8_FLAGS))
        reason = f"auto: fp32, the only native precision here (the CPU has none of {lacking})"
    else:
        runtime, chosen = candidates[0]
        reason = f"--precision {chosen}"
        served, why = resolve_precision(chosen, flags)
        if served != chosen:
            reason += f" (on this CPU it would load as {served}: {why})"
    if chosen == "int8":
        onnx_path.rename(version_dir / "model.fp32.onnx")
        int8_path.rename(onnx_path)
        weights, fp32_weights = onnx_path.name, "model.fp32.onnx"
    else:
        weights = checkpoint.name if chosen == "bf16" else onnx_path.name
        fp32_weights = onnx_path.name
    int8_path.unlink(missing_ok=True)
    if chosen != "bf16" and not options.long_pair_tokens:
        shutil.rmtree(checkpoint, ignore_errors=True)  # else kept for long pairs (_export_long_pairs)
    key = {"int8": "int8", "bf16": f"{runtime}-bf16"}.get(chosen, "fp32")
    return _Variant(
        precision=chosen,
        runtime=runtime,
        weights=weights,
        fp32_runtime="onnxruntime",
        fp32_weights=fp32_weights,
        reason=reason,
        verification={**verification[key], "fp32": verification["fp32"], "variants": verification},
        quantization=quantization if chosen == "int8" else None,
        selection=selection,
    )


def precision_pairs(config: Any, tokenizer: Any, max_length: int, count: int = 32, seed: int = 0) -> tuple[Any, Any]:
    """The built-in mixed-length set: one query against `count` documents of log-normal lengths
    (median 96 tokens, up to 512), as ragged ids ([CLS] query [SEP] document [SEP]) and lengths.
    Random ordinary token ids: the tokenizer's vocabulary, not a language, is all an export has."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = min(len(tokenizer), int(config.vocab_size))
    pool = np.setdiff1d(np.arange(vocab), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else int(pool[0])
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else cls
    limit = min(max_length, 512)
    query = rng.choice(pool, max(1, min(16, (limit - 3) // 4)))
    longest = max(1, limit - query.size - 3)
    documents = np.clip(np.round(rng.lognormal(np.log(96), 0.8, count)), min(4, longest), longest).astype(int)
    rows = [np.concatenate(([cls], query, [sep], rng.choice(pool, n), [sep])) for n in documents]
    return np.concatenate(rows).astype(np.int32), np.array([r.size for r in rows], dtype=np.int64)


def ranking_agreement(reference: Any, other: Any, top: int = 10) -> dict[str, float]:
    """How far `other` ranks like `reference`: top-k overlap, Spearman (ranks' Pearson), max |Δ|."""
    import numpy as np

    reference, other = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    k = min(top, reference.size)
    overlap = len(set(np.argsort(-reference, kind="stable")[:k]) & set(np.argsort(-other, kind="stable")[:k])) / k
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64) for x in (reference, other)]
    spearman = float(np.corrcoef(ranks[0], ranks[1])[0, 1]) if reference.size > 1 else 1.0
    return {"top10_overlap": overlap, "spearman": spearman, "max_abs_diff": float(np.abs(other - reference).max())}


def _candidate_engine(
    runtime: str, precision: str, version_dir: Path, pad_token_id: int, budget: int, threads: int
) -> Any:
    from rerank_triton_model.reranker_engine import PackedReranker

    if runtime == "onnxruntime":
        path = version_dir / ("model.int8.onnx" if precision == "int8" else "model.onnx")
        return PackedReranker.from_file(
            str(path), pad_token_id=pad_token_id, max_batch_tokens=budget, intra_op_threads=threads
        )
    return PackedReranker.from_pretrained(
        str(version_dir / "model"),
        pad_token_id=pad_token_id,
        max_batch_tokens=budget,
        precision=precision,
        intra_op_threads=threads,
        packed=runtime == "packed",
    )


def _time_scoring(engines: list[Any], ids: Any, lengths: Any) -> list[tuple[float, Any]]:
    """Each engine's pairs per second over whole passes (at least MEASURE_SECONDS each, one pass at
    least) after an untimed pass (first runs allocate and compile kernels), and that pass's logits.
    The engines take turns, a pass each, so that a change in the machine's load (other processes on a
    shared host) falls on all of them alike rather than on whichever was being timed."""
    logits = [engine.score(ids, lengths) for engine in engines]
    elapsed = [0.0] * len(engines)
    passes = [0] * len(engines)
    while min(elapsed) < MEASURE_SECONDS:
        for index, engine in enumerate(engines):
            if elapsed[index] < MEASURE_SECONDS:
                start = time.perf_counter()
                engine.score(ids, lengths)
                elapsed[index] += time.perf_counter() - start
                passes[index] += 1
    return [(n * lengths.size / t, out) for n, t, out in zip(passes, elapsed, logits, strict=True)]


def choose_precision(
    candidates: list[tuple[str, str]],
    version_dir: Path,
    config: Any,
    tokenizer: Any,
    options: ExportOptions,
    max_length: int,
) -> dict[str, Any]:
    """Measure each candidate on the built-in pairs, as served (the token budget, the threads), and
    pick the fastest whose ranking agrees with ONNX Runtime fp32 (the first candidate)."""
    ids, lengths = precision_pairs(config, tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)
    budget = options.max_batch_tokens or max(8192, max_length)
    rows: list[dict[str, Any]] = []
    engines = [_candidate_engine(r, p, version_dir, pad, budget, options.intra_op_threads) for r, p in candidates]
    timed = _time_scoring(engines, ids, lengths)
    del engines
    reference = timed[0][1]
    for (runtime, precision), (rate, logits) in zip(candidates, timed, strict=True):
        rows.append({"runtime": runtime, "precision": precision, "pairs_per_s": rate})
        rows[-1].update(ranking_agreement(reference, logits))
    for row in rows:
        row["speedup"] = row["pairs_per_s"] / rows[0]["pairs_per_s"]
        row["agrees"] = row["top10_overlap"] >= AGREEMENT_TOP10 and row["spearman"] >= AGREEMENT_SPEARMAN
    eligible = [rows[0], *(r for r in rows[1:] if r["agrees"] and r["speedup"] >= MIN_SPEEDUP)]
    best = max(eligible, key=lambda r: r["pairs_per_s"])

    def describe(r: dict[str, Any]) -> str:
        fails = "" if r["agrees"] else ", ranks unlike fp32"
        return f"{r['precision']} ({r['runtime']}) {r['speedup']:.2f}x{fails}"

    others = "; ".join(describe(r) for r in rows[1:] if r is not best)
    reason = (
        f"auto: {describe(best)} ONNX Runtime fp32 on this CPU, top-10 overlap {best['top10_overlap']:.2f}, "
        f"Spearman {best['spearman']:.3f} on {lengths.size} built-in pairs" + (f"; {others}" if others else "")
    )
    return {
        "runtime": best["runtime"],
        "precision": best["precision"],
        "reason": reason,
        "candidates": rows,
        "pairs": int(lengths.size),
        "tokens": int(lengths.sum()),
        "thresholds": {"top10_overlap": AGREEMENT_TOP10, "spearman": AGREEMENT_SPEARMAN, "speedup": MIN_SPEEDUP},
    }


def render_config(options: ExportOptions, parameters: ModelParameters) -> str:
    """config.pbtxt from the template; string values are escaped for protobuf text format."""

    def quoted(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid protobuf text-format string

    lines = [
        f"  {{ key: {quoted(key)} value: {{ string_value: {quoted(value)} }} }}"
        for key, value in parameters.as_strings().items()
    ]
    return string.Template(rerank_triton_model.CONFIG_TEMPLATE.read_text()).substitute(
        name=quoted(options.name)[1:-1],
        input_ids=INPUT_IDS,
        sequence_lengths=SEQUENCE_LENGTHS,
        logits=LOGITS,
        max_batch_size=options.max_batch_size,
        max_queue_delay_us=options.max_queue_delay_us,
        instance_kind="KIND_GPU" if options.device == "gpu" else "KIND_CPU",
        instance_count=options.instance_count,
        parameters=",\n".join(lines),
    )


def copy_model_package(version_dir: Path) -> None:
    """The model package into the version folder, and the model.py Triton's stub loads (one import)."""
    shutil.copytree(
        rerank_triton_model.PACKAGE_DIR,
        version_dir / rerank_triton_model.PACKAGE_DIR.name,
        ignore=shutil.ignore_patterns("__pycache__", "*.py[co]", rerank_triton_model.CONFIG_TEMPLATE.name),
    )
    (version_dir / "model.py").write_text(rerank_triton_model.ENTRY_POINT)


def _load(loader: Callable[..., Any], source: str, what: str, **kwargs: Any) -> Any:
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"cannot load the {what} of {source!r}: {error}") from None


def _max_length(config: Any, tokenizer: Any, requested: int | None) -> int:
    limit = int(config.max_position_embeddings)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        limit = tokenizer_limit
    if requested is not None:
        if not 4 <= requested <= limit:
            raise ExportError(f"--max-length must lie in [4, {limit}], got {requested}")
        return requested
    return limit


def _sample_lengths(config: Any, max_length: int) -> list[int]:
    """Pair lengths around the local attention window, so both attention paths are exercised."""
    window = int(getattr(config, "local_attention", 128))
    candidates = [3, window // 2, window - 1, window + 1, 2 * window + 7, min(4 * window, 600)]
    return sorted({min(max(2, n), max_length) for n in candidates})


def _random_batch(config: Any, lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), config.pad_token_id or 0, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, config.vocab_size, n)
        mask[row, :n] = 1
    return ids, mask


def _export_onnx(model: Any, config: Any, path: Path, opset: int, max_length: int) -> None:
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    # Trace with a padded row longer than the local window so no shortcut for short or unpadded
    # inputs is baked into the graph.
    window = int(getattr(config, "local_attention", 128))
    width = min(max_length, 2 * window + 16)
    ids, mask = _random_batch(config, [width, max(2, width // 2)], seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on shapes; the verification step checks the result.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            LogitsOnly(model),
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
        )


def quantize_int8(source: Path, target: Path) -> dict[str, Any]:
    """Dynamic int8 quantization of the graph's weight MatMuls (ONNX Runtime's quantize_dynamic).

    Weights are quantized once, per tensor, to uint8 with a zero point; activations are quantized
    per tensor at run time (DynamicQuantizeLinear + MatMulInteger). uint8 weights (U8U8 kernels) are
    used rather than int8 (U8S8), whose AVX2 kernels saturate int16 sums on CPUs without VNNI and
    rank documents measurably worse; the two run at the same speed on such CPUs. The scoring head
    (dense layer and classifier) stays fp32: it runs once per pair, so quantizing it saves nothing.
    Attention's activation-by-activation MatMuls stay fp32 (MatMulConstBOnly).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    weight_matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
    # The encoder layers' weight MatMuls, named: quantize_dynamic would also turn the classifier's
    # Gemm into an int8 MatMul, under a new name that nodes_to_exclude cannot catch.
    quantized = [name for name in weight_matmuls if "/layers." in name]
    if not quantized:
        raise ExportError("the graph has no encoder-layer MatMuls to quantize")
    settings: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "op_types": ["MatMul"],
        "weight_type": "QUInt8",
        "per_channel": False,
        "reduce_range": False,
        "quantized_matmuls": len(quantized),
        "kept_fp32": [name for name in weight_matmuls if name not in quantized],
    }
    # quantize_dynamic logs a suggestion to pre-process the model through the root logger.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QUInt8,
            per_channel=False,
            reduce_range=False,
            nodes_to_quantize=quantized,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.disable(logging.NOTSET)
    return settings


def _convert_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(path))


def _eager_reference(model: Any, config: Any, max_length: int) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """A padded batch of sample pairs (lengths, ids, mask) and eager's logits for each pair run alone."""
    import numpy as np
    import torch

    lengths = _sample_lengths(config, max_length)
    ids, mask = _random_batch(config, lengths, seed=1)
    with torch.no_grad():
        expected = np.array(
            [model(input_ids=torch.from_numpy(ids[i : i + 1, :n])).logits[0, 0].item() for i, n in enumerate(lengths)]
        )
    return lengths, ids, mask, expected


def _agreement(got: np.ndarray, expected: np.ndarray, precision: str, lengths: list[int], what: str) -> dict[str, Any]:
    import numpy as np

    max_diff = float(np.max(np.abs(got - expected)))
    if precision in VERIFY_TOLERANCE:
        tolerance = VERIFY_TOLERANCE[precision]
    elif precision == "bf16":
        tolerance = BF16_RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    else:
        tolerance = INT8_RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    if max_diff > tolerance:
        raise ExportError(
            f"{what} ({precision}) differs from eager by {max_diff:.2e} (> {tolerance:.2e}) on lengths {lengths}"
        )
    return {"verified": True, "lengths": lengths, "max_abs_diff": max_diff, "tolerance": tolerance}


def _verify(model: Any, config: Any, onnx_path: Path, precision: str, max_length: int) -> dict[str, Any]:
    """Run padded sample batches through ONNX Runtime and compare with eager, pair by pair, unpadded."""
    import numpy as np
    import onnxruntime as ort

    lengths, ids, mask, expected = _eager_reference(model, config, max_length)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0][:, 0].astype(np.float64)
    except Exception as error:  # noqa: BLE001 - fp16 kernels may be missing on the CPU provider
        if precision != "fp16":
            raise ExportError(f"ONNX Runtime cannot run the exported graph: {error}") from None
        return {"verified": False, "reason": f"not runnable on the CPU provider: {str(error)[:200]}"}
    return _agreement(got, expected, precision, lengths, "ONNX Runtime")


def _verify_torch(
    model: Any, config: Any, weights: Path, precision: str, device: str, max_length: int
) -> dict[str, Any]:
    """Load the saved checkpoint the way Triton will (torch_runner.TorchRunner) and compare a padded
    batch with eager, pair by pair. On a GPU export made where no GPU is, fp16 weights are checked
    in fp32 on the CPU: the saved weights and the padding, not fp16 arithmetic."""
    import torch

    from rerank_triton_model.torch_runner import TorchRunner

    on_gpu = device == "gpu" and torch.cuda.is_available()
    # bf16 runs on any CPU (emulated where it lacks AVX512_BF16): checked as it will run.
    run_precision = precision if on_gpu or precision == "bf16" else "fp32"
    runner = TorchRunner(str(weights), device="cuda" if on_gpu else "cpu", precision=run_precision)
    lengths, ids, mask, expected = _eager_reference(model, config, max_length)
    got = runner(ids, mask).astype("float64")
    result = _agreement(got, expected, precision, lengths, "PyTorch")
    return {**result, "device": str(runner.device), "checked_in": run_precision}


def _verify_packed(
    model: Any, config: Any, weights: Path, precision: str, device: str, max_length: int
) -> dict[str, Any]:
    """Load the saved checkpoint the way Triton will (the packed engine, in sub-batches under a small
    token budget so several runs are checked) and compare with eager, pair by pair. On a GPU export
    made where no GPU is, the weights are checked in fp32 on the CPU (not the flash kernels)."""
    import numpy as np
    import torch

    from rerank_triton_model.reranker_engine import PackedReranker

    on_gpu = device == "gpu" and torch.cuda.is_available()
    run_precision = precision if on_gpu or device == "cpu" else "fp32"
    lengths, ids, _, expected = _eager_reference(model, config, max_length)
    engine = PackedReranker.from_pretrained(
        str(weights),
        pad_token_id=int(config.pad_token_id or 0),
        max_batch_tokens=max(lengths) + 1,
        device="cuda" if on_gpu else "cpu",
        precision=run_precision,
        packed=True,
    )
    ragged = np.concatenate([ids[row, :n] for row, n in enumerate(lengths)])
    got = engine.score(ragged, np.array(lengths)).astype(np.float64)
    result = _agreement(got, expected, precision, lengths, "the packed engine")
    return {**result, "device": "cuda" if on_gpu else "cpu", "checked_in": run_precision}
