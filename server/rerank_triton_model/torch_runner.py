"""The PyTorch runtimes: padded sub-batches through transformers' sequence classifier (TorchRunner),
or packed ones through modernbert_packed.PackedModernBert (PackedTorchRunner).

`rerank export` saves the fp32 checkpoint (`model/` in the version folder) for either runtime; the runner
casts it to the served precision at load (the final norm, pooling and head stay fp32: full_resolution_head);
reranker_engine.PackedReranker.from_pretrained builds a runner over it. On GPUs these run fp16/bf16
where the ONNX graph would need onnxruntime-gpu; the packed engine (varlen flash attention with the
local window, no padding) is the GPU default; on CPUs it serves long documents without a T x T buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _device(device: str, precision: str, cpu_threads: int) -> torch.device:
    """The torch device a runner computes on, after checking the precision and that the device exists."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but PyTorch sees no CUDA device")
    if resolved.type == "cpu":
        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        from .modernbert_packed import hold_freed_memory  # beside release_memory, glibc's other setting

        hold_freed_memory()
    return resolved


class _InFloat32(torch.nn.Module):
    """A module run in fp32 on its input cast to fp32."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x.float())
        return out


def full_resolution_head(model: Any) -> Any:
    """transformers' sequence classifier with its final norm, pooling and scoring head in fp32 whatever
    the encoder's precision (modernbert_packed does the same): a negligible share of the work, and the
    logit keeps fp32's resolution instead of the encoder's (bf16 rounds logits between 4 and 8 to steps
    of 0.03, fp16 to 0.004, so close candidates would tie)."""
    if next(model.parameters()).dtype != torch.float32:
        model.model.final_norm = _InFloat32(model.model.final_norm)
        model.head.float()
        model.classifier.float()
    return model


class TorchRunner:
    """A reranker_engine.Runner over a transformers checkpoint folder, on one device ("cpu" or "cuda:N")."""

    def __init__(self, model_dir: str, *, device: str = "cpu", precision: str = "fp32", cpu_threads: int = 0) -> None:
        self.device = _device(device, precision, cpu_threads)
        transformers.utils.logging.disable_progress_bar()  # no bars in Triton's log
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=DTYPES[precision], attn_implementation="sdpa"
        )
        self.model = full_resolution_head(model).to(self.device).eval()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
            mask = torch.from_numpy(attention_mask).to(self.device, non_blocking=True)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            return logits[:, 0].float().cpu().numpy()


class PackedTorchRunner:
    """A reranker_engine.PackedRunner over modernbert_packed.PackedModernBert, on one device."""

    def __init__(self, model_dir: str, *, device: str = "cpu", precision: str = "fp32", cpu_threads: int = 0) -> None:
        self.device = _device(device, precision, cpu_threads)
        from .modernbert_packed import PackedModernBert  # the padded runtime never needs it

        self.model = PackedModernBert.from_pretrained(model_dir, device=str(self.device), dtype=DTYPES[precision])

    def run_packed(self, input_ids: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
            cu = torch.from_numpy(np.ascontiguousarray(cu_seqlens, dtype=np.int32)).to(self.device)
            logits = self.model.forward_packed(ids, cu).float().cpu().numpy()
        self.model.release_memory(int(input_ids.size))
        return logits
