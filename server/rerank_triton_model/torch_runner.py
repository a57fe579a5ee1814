"""The PyTorch runtimes: padded sub-batches through transformers' sequence classifier (TorchRunner),
or packed ones through modernbert_packed.PackedModernBert (PackedTorchRunner).

`rerank export --runtime torch` saves the checkpoint (in the served precision) next to this file,
`--runtime packed` saves it in fp32 and the runner casts it to the served precision at load;
reranker_engine.PackedReranker.from_pretrained builds a runner over it. On GPUs these run fp16/bf16
where the ONNX graph would need onnxruntime-gpu; the packed engine (varlen flash attention with the
local window, no padding) is the GPU default; on CPUs it serves long documents without a T x T buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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
    if resolved.type == "cpu" and cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    return resolved


class TorchRunner:
    """A reranker_engine.Runner over a transformers checkpoint folder, on one device ("cpu" or "cuda:N")."""

    def __init__(self, model_dir: str, *, device: str = "cpu", precision: str = "fp32", cpu_threads: int = 0) -> None:
        self.device = _device(device, precision, cpu_threads)
        transformers.utils.logging.disable_progress_bar()  # no bars in Triton's log
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=DTYPES[precision], attn_implementation="sdpa"
        )
        self.model = model.to(self.device).eval()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
            mask = torch.from_numpy(attention_mask).to(self.device, non_blocking=True)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            return logits[:, 0].float().cpu().numpy()


# On CPUs, after a run of at least this many tokens, glibc's freed heap goes back to the system
# (malloc_trim, a few ms), so one long document does not leave the process holding its peak. GPUs keep
# CUDA's caching allocator: a card serves one model, and re-allocating each run would cost more.
RELEASE_AFTER_TOKENS = 4096


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
        if self.device.type == "cpu" and input_ids.size >= RELEASE_AFTER_TOKENS and _LIBC is not None:
            _LIBC.malloc_trim(0)
        return logits


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _libc()
