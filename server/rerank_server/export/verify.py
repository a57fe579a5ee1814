"""Every runtime an export writes, checked against transformers eager before the model is written: the
engine is built from the written weights exactly as the served model builds it (runtimes.Runtime.build),
scores sample pairs around the local attention window, and each logit is held to eager's (fp32, one pair
at a time, unpadded) within its precision's tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rerank_server.export.options import ExportError
from rerank_server.export.source import Source
from rerank_triton_model.runtimes import Runtime

if TYPE_CHECKING:
    import numpy as np

# Absolute bounds: fp32 agrees to ~1e-6 in practice (summation order); fp16 keeps 11 significant bits.
ABSOLUTE_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
# Relative to the largest |logit| of the sample pairs (at least 1), since the error grows with the
# activations. bf16 keeps 8 significant bits (relative rounding 2^-9 per operation): over a few layers the
# logit error stays within a few % of the logits' scale (0.023 on a random ModernBERT-base whose logits
# reach ~3). int8: about 1% on ModernBERT-base for a sound quantization, about 10% for a broken graph or the
# int16 saturation of u8s8 kernels on CPUs without VNNI. 5% fails wrong weights or a wrong mask, which move
# logits by their whole scale.
RELATIVE_TOLERANCE = {"bf16": 0.05, "int8": 0.05}


def tolerance(precision: str, expected: np.ndarray) -> float:
    """How far a logit in `precision` may lie from eager fp32's, given eager's logits of the same pairs."""
    import numpy as np

    if precision in ABSOLUTE_TOLERANCE:
        return ABSOLUTE_TOLERANCE[precision]
    return RELATIVE_TOLERANCE[precision] * max(1.0, float(np.max(np.abs(expected))))


@dataclass(frozen=True)
class Reference:
    """Sample pairs (random ids, lengths around the local window) and eager's logit of each, run alone."""

    lengths: list[int]
    ids: np.ndarray  # the pairs end to end
    expected: np.ndarray


def sample_lengths(config: Any, max_length: int) -> list[int]:
    """Pair lengths around the local attention window, so both attention paths are exercised."""
    window = int(getattr(config, "local_attention", 128))
    candidates = [3, window // 2, window - 1, window + 1, 2 * window + 7, min(4 * window, 600)]
    return sorted({min(max(2, n), max_length) for n in candidates})


def eager_reference(source: Source) -> Reference:
    import numpy as np
    import torch

    lengths = sample_lengths(source.config, source.max_length)
    rng = np.random.default_rng(1)
    pairs = [rng.integers(0, source.config.vocab_size, n) for n in lengths]
    with torch.no_grad():
        expected = np.array([source.model(input_ids=torch.from_numpy(p)[None]).logits[0, 0].item() for p in pairs])
    return Reference(lengths, np.concatenate(pairs).astype(np.int64), expected)


def verify(
    runtime: Runtime, weights: Path, precision: str, device: str, source: Source, reference: Reference
) -> dict[str, Any]:
    """`runtime` over `weights` in `precision` on `device` (cpu, gpu) against eager: where it is checked
    (runtimes.Runtime.checked_as), the largest difference and the bound. Padded runtimes get the pairs as one
    padded batch (the padding is checked); the packed engine under a budget that makes several runs."""
    import numpy as np
    import torch

    where, checked = runtime.checked_as(device, precision, torch.cuda.is_available())
    lengths = np.array(reference.lengths, dtype=np.int64)
    budget = int(lengths.max()) + 1 if runtime.packed else int(lengths.sum())
    try:
        engine = runtime.build(
            str(weights), device=where, precision=checked, pad_token_id=source.pad_token_id, max_batch_tokens=budget
        )
        engine.padding_slack = float("inf")
        got = engine.score(reference.ids, lengths).astype(np.float64)
    except Exception as error:  # noqa: BLE001 - a runtime that cannot run what was written is reported
        if runtime.graph and checked == "fp16" and where == "cpu":
            # ONNX Runtime's CPU provider lacks some fp16 kernels; the GPU runs it.
            return {"verified": False, "reason": f"not runnable on the CPU provider: {str(error)[:200]}"}
        raise ExportError(f"the {runtime.name} runtime cannot run the exported weights ({checked}): {error}") from None
    bound = tolerance(precision, reference.expected)
    difference = float(np.max(np.abs(got - reference.expected)))
    if difference > bound:
        raise ExportError(
            f"the {runtime.name} runtime ({precision}) differs from eager by {difference:.2e} (> {bound:.2e}) "
            f"on lengths {reference.lengths}"
        )
    return {
        "verified": True,
        "runtime": runtime.name,
        "lengths": reference.lengths,
        "max_abs_diff": difference,
        "tolerance": bound,
        "device": where,
        "checked_in": checked,
    }
