"""The weights an export writes: the ONNX graph (fp32; its dynamic int8 quantization; fp16 for ONNX Runtime
on GPUs) and the fp32 checkpoint the PyTorch runtimes cast at load."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rerank_server.export.options import ExportError

if TYPE_CHECKING:
    import numpy as np

# The ONNX graph of transformers' model, as torch.onnx names its nodes: the encoder under MODEL_NODES
# (its final norm under FINAL_NORM_NODES); pooling, the head and the classifier outside it.
MODEL_NODES = "/inner/model/"
FINAL_NORM_NODES = "/inner/model/final_norm/"


def random_batch(config: Any, lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), config.pad_token_id or 0, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, config.vocab_size, n)
        mask[row, :n] = 1
    return ids, mask


def export_onnx(model: Any, config: Any, path: Path, opset: int, max_length: int) -> None:
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
    ids, mask = random_batch(config, [width, max(2, width // 2)], seed=0)
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

    Weights are quantized once, per tensor; activations are quantized per tensor at run time to uint8
    (DynamicQuantizeLinear + MatMulInteger). The weights are signed (int8: ONNX Runtime's U8S8 kernels) where
    the exporting CPU has VNNI dot products, the only CPUs that serve an int8 export natively (elsewhere it
    loads its fp32 graph, cpu_features.py): there U8S8 runs on VNNI (and AMX) instructions, 1.84x fp32 on 16
    pairs of 256 tokens where U8U8 ran 1.00x (`python -m bench.run`, docs/performance.md's Decisions). On a CPU
    without VNNI the weights are unsigned (U8U8): its AVX2 U8S8 kernels saturate int16 sums and rank
    documents measurably worse, so the export's check there is of the kernels that do not. The scoring head
    (dense layer and classifier) stays fp32: it runs once per pair, so quantizing it saves nothing.
    Attention's activation-by-activation MatMuls stay fp32 (MatMulConstBOnly).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from rerank_triton_model.cpu_features import cpu_flags, native_precisions

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    weight_matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
    # The encoder layers' weight MatMuls, named: quantize_dynamic would also turn the classifier's
    # Gemm into an int8 MatMul, under a new name that nodes_to_exclude cannot catch.
    quantized = [name for name in weight_matmuls if "/layers." in name]
    if not quantized:
        raise ExportError("the graph has no encoder-layer MatMuls to quantize")
    weight_type = QuantType.QInt8 if "int8" in native_precisions(cpu_flags()) else QuantType.QUInt8
    settings: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "op_types": ["MatMul"],
        "weight_type": weight_type.name,
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
            weight_type=weight_type,
            per_channel=False,
            reduce_range=False,
            nodes_to_quantize=quantized,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.disable(logging.NOTSET)
    return settings


def convert_fp16(path: Path) -> list[str]:
    """The graph in fp16 with fp32 inputs and outputs, and the final norm, pooling and the scoring head kept
    in fp32 (their names returned): a negligible share of the work, and the logit keeps fp32's resolution
    instead of fp16's (steps of 0.004 between 4 and 8)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    kept = [
        node.name
        for node in model.graph.node
        if not node.name.startswith(MODEL_NODES) or node.name.startswith(FINAL_NORM_NODES)
    ]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=kept)
    onnx.save(model, str(path))
    return kept


def save_checkpoint(model: Any, folder: Path) -> None:
    """The fp32 checkpoint (safetensors) the PyTorch runtimes load and cast to the served precision."""
    model.save_pretrained(folder)
