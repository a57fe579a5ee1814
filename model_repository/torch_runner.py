"""The PyTorch runtime: padded sub-batches through transformers' sequence classifier.

`rerank export --runtime torch` saves the checkpoint (in the served precision) next to this file;
reranker_engine.PackedReranker.from_pretrained builds a TorchRunner over it. On GPUs this runs
fp16 with PyTorch's fused scaled-dot-product attention, where the ONNX graph would need
onnxruntime-gpu; on CPUs it is a fallback (ONNX Runtime is faster there: README, Performance).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRunner:
    """A reranker_engine.Runner over a transformers checkpoint folder, on one device ("cpu" or "cuda:N")."""

    def __init__(self, model_dir: str, *, device: str = "cpu", precision: str = "fp32", cpu_threads: int = 0) -> None:
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but PyTorch sees no CUDA device")
        if self.device.type == "cpu" and cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
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
