"""`rerank export`: a ModernBertForSequenceClassification checkpoint (one logit) to a Triton model repository.

    <output>/<name>/config.pbtxt          rendered from model_repository/config.pbtxt.template
    <output>/<name>/1/model.onnx         the graph (dynamic batch and sequence axes), verified against eager;
                                     with --quantize int8, its dynamically quantized version
    <output>/<name>/1/model/             instead, with --runtime torch: the checkpoint in the served
                                     precision, for transformers' PyTorch model
    <output>/<name>/1/model.py           the Python-backend model, with reranker_engine.py, torch_runner.py
    <output>/<name>/1/tokenizer/         the fast tokenizer the frontend loads
    <output>/<name>/1/export.json        provenance: source, versions, verification result

torch, transformers, onnx and numpy are imported when an export runs: they are needed to export,
never to serve, and `rerank query` loads this module's options without them.
The model folder is assembled next to its destination and renamed into place, so a failed export
never leaves a half-written model for Triton to load.
"""

from __future__ import annotations

import json
import logging
import shutil
import string
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

import rerank_model_repository

DEFAULT_MODEL = "Alibaba-NLP/gte-reranker-modernbert-base"
ARCHITECTURE = "ModernBertForSequenceClassification"
PRECISIONS = {"cpu": ("fp32",), "gpu": ("fp16", "fp32")}
# What computes the model inside Triton: ONNX Runtime on the exported graph, or PyTorch on the
# checkpoint (GPUs without onnxruntime-gpu, e.g. NVIDIA's PyTorch-enabled Triton container).
RUNTIMES = ("onnxruntime", "torch")
# Eager vs ONNX Runtime on the verification pairs; fp32 agrees to ~1e-6 in practice.
VERIFY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
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
    model: str = DEFAULT_MODEL
    output: Path = Path("model_repository_build")
    name: str = "reranker"
    model_id: str | None = None  # reported to callers; default: the hub id, or a local folder's name
    tokenizer: str | None = None
    device: str = "cpu"
    runtime: str = "onnxruntime"
    precision: str | None = None  # default: fp32 on cpu, fp16 on gpu
    quantize: str | None = None  # "int8": dynamic int8 quantization of the fp32 graph (CPU only)
    max_length: int | None = None
    max_batch_size: int = 32
    max_batch_tokens: int | None = None
    max_queue_delay_us: int = 2000
    instance_count: int = 1
    intra_op_threads: int = 0
    opset: int = 18
    overwrite: bool = False

    @property
    def resolved_precision(self) -> str:
        return self.precision or PRECISIONS[self.device][0]

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
    if options.device not in PRECISIONS:
        raise ExportError(f"device must be one of {sorted(PRECISIONS)}, got {options.device!r}")
    precision = options.resolved_precision
    if precision not in PRECISIONS[options.device]:
        raise ExportError(f"precision {precision!r} is not offered on {options.device}: {PRECISIONS[options.device]}")
    if options.runtime not in RUNTIMES:
        raise ExportError(f"runtime must be one of {list(RUNTIMES)}, got {options.runtime!r}")
    if options.quantize is not None:
        if options.runtime != "onnxruntime":
            raise ExportError(f"--quantize {options.quantize} quantizes the ONNX graph; use --runtime onnxruntime")
        if options.quantize not in QUANTIZATIONS:
            raise ExportError(f"quantize must be one of {list(QUANTIZATIONS)}, got {options.quantize!r}")
        if options.device != "cpu":
            raise ExportError(
                f"--quantize {options.quantize} makes a CPU model (ONNX Runtime's dynamic int8 CPU kernels); "
                f"it cannot be combined with --device {options.device}"
            )
        if precision != "fp32":
            raise ExportError(f"--quantize {options.quantize} quantizes the fp32 graph; drop --precision {precision}")
    destination = options.output / options.name
    if destination.exists() and not options.overwrite:
        raise ExportError(f"{destination} exists; pass --overwrite to replace it")

    import torch
    import transformers

    onnx_runtime = options.runtime == "onnxruntime"
    steps = _Steps(5 + (onnx_runtime and precision == "fp16") + (options.quantize is not None), progress)
    with steps.step(f"Checking {options.model}"):
        config = _load(transformers.AutoConfig.from_pretrained, options.model, "configuration")
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
        max_length = _max_length(config, tokenizer, options.max_length)

    staging = options.output / f".{options.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / "1"
    version_dir.mkdir(parents=True)
    try:
        onnx_path = version_dir / "model.onnx"
        weights = onnx_path.name
        if onnx_runtime:
            with steps.step(f"Exporting to ONNX (opset {options.opset})"):
                _export_onnx(model, config, onnx_path, options.opset, max_length)
            if precision == "fp16":
                with steps.step("Converting the graph to fp16"):
                    _convert_fp16(onnx_path)
            with steps.step("Verifying ONNX Runtime against transformers eager"):
                verification = _verify(model, config, onnx_path, precision, max_length)
        else:
            weights = "model"
            with steps.step(f"Saving the checkpoint in {precision} for PyTorch"):
                dtype = torch.float16 if precision == "fp16" else torch.float32
                state = {key: value.to(dtype) for key, value in model.state_dict().items()}
                model.save_pretrained(version_dir / weights, state_dict=state)
            with steps.step("Verifying the PyTorch runtime against transformers eager"):
                verification = _verify_torch(
                    model, config, version_dir / weights, precision, options.device, max_length
                )
        quantization: dict[str, Any] | None = None
        if options.quantize is not None:
            with steps.step(f"Quantizing to {options.quantize} (dynamic) and verifying it against eager"):
                fp32_path = version_dir / "model.fp32.onnx"
                onnx_path.rename(fp32_path)
                quantization = quantize_int8(fp32_path, onnx_path)
                fp32_path.unlink()
                verification = {**_verify(model, config, onnx_path, "int8", max_length), "fp32": verification}
                precision = options.quantize
        with steps.step("Writing the Triton model"):
            tokenizer.save_pretrained(version_dir / "tokenizer")
            for target, source in rerank_model_repository.MODEL_FILES.items():
                shutil.copy2(source, version_dir / target)
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)
            (staging / "config.pbtxt").write_text(
                render_config(
                    name=options.name,
                    source_model=options.resolved_model_id,
                    precision=precision,
                    runtime=options.runtime,
                    weights=weights,
                    max_length=max_length,
                    vocab_size=config.vocab_size,
                    pad_token_id=pad_token_id,
                    max_batch_size=options.max_batch_size,
                    max_batch_tokens=options.max_batch_tokens or max(8192, max_length),
                    max_queue_delay_us=options.max_queue_delay_us,
                    instance_kind="KIND_GPU" if options.device == "gpu" else "KIND_CPU",
                    instance_count=options.instance_count,
                    intra_op_threads=options.intra_op_threads,
                )
            )
            provenance = {
                "options": {k: str(v) for k, v in asdict(options).items()},
                "precision": precision,
                "quantization": quantization,
                "max_length": max_length,
                "config": config.to_dict(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "verification": verification,
            }
            (version_dir / "export.json").write_text(json.dumps(provenance, indent=2, default=str))
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"Exported {options.model} to {destination} ({options.runtime}, {precision}, max_length {max_length})")
    return destination


def render_config(**values: Any) -> str:
    """config.pbtxt from the template; string values are escaped for protobuf text format."""
    escaped = {k: json.dumps(v)[1:-1] if isinstance(v, str) else v for k, v in values.items()}
    return string.Template(rerank_model_repository.CONFIG_TEMPLATE.read_text()).substitute(escaped)


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

    from rerank_model_repository.torch_runner import TorchRunner

    on_gpu = device == "gpu" and torch.cuda.is_available()
    run_precision = precision if on_gpu else "fp32"
    runner = TorchRunner(str(weights), device="cuda" if on_gpu else "cpu", precision=run_precision)
    lengths, ids, mask, expected = _eager_reference(model, config, max_length)
    got = runner(ids, mask).astype("float64")
    result = _agreement(got, expected, precision, lengths, "PyTorch")
    return {**result, "device": str(runner.device), "checked_in": run_precision}
