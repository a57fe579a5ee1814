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
# fp32's summation-order error is relative to the activations: 2e-6 to 7e-6 of the largest |logit - bias| on
# random checkpoints of 2 to 5 layers, so logits in the hundreds take it past 1e-3 (ONNX Runtime, 2 layers,
# logits up to 768: 1.7e-3). Past a scale of 10 the bound is this share of the scale, with room for deeper
# models; a wrong weight or mask moves logits by a good part of their scale.
FP32_RELATIVE_TOLERANCE = 1e-4
# fp16 likewise past a scale of 2.5: its 11 significant bits round relative to the activations (transformers' own
# fp16 model lay 0.09-0.70 from its fp32 on random checkpoints whose logits reach 22-42, 0.4-1.7% of the scale).
FP16_RELATIVE_TOLERANCE = 0.02
# Relative to the largest |logit - the head's bias| of the sample pairs (at least 1), since the error grows
# with the activations; a bias only shifts every logit alike. bf16 keeps 8 significant bits (relative
# rounding 2^-9 per operation): over a few layers the logit error stays within a few % of the logits' scale
# (0.023 on a random ModernBERT-base whose logits reach ~3). int8: about 1% on ModernBERT-base for a sound
# quantization, about 10% for a broken graph or the int16 saturation of u8s8 kernels on CPUs without VNNI.
# 5% fails wrong weights or a wrong mask, which move logits by their whole scale; ranking() judges whether
# the precision is fine enough for this checkpoint's spread of scores.
RELATIVE_TOLERANCE = {"bf16": 0.05, "int8": 0.05}


def tolerance(precision: str, expected: np.ndarray, bias: float = 0.0) -> float:
    """How far a logit in `precision` may lie from eager fp32's, given eager's logits of the same pairs and
    the scoring head's bias."""
    import numpy as np

    scale = max(1.0, float(np.max(np.abs(expected - bias))))
    if precision == "fp32":
        return max(ABSOLUTE_TOLERANCE[precision], FP32_RELATIVE_TOLERANCE * scale)
    if precision == "fp16":
        return max(ABSOLUTE_TOLERANCE[precision], FP16_RELATIVE_TOLERANCE * scale)
    return RELATIVE_TOLERANCE[precision] * scale


def head_bias(model: Any) -> float:
    """The bias of a single-logit linear scoring head (transformers' `classifier`), else 0."""
    bias = getattr(getattr(model, "classifier", None), "bias", None)
    return float(bias.detach().reshape(-1)[0]) if bias is not None and bias.numel() == 1 else 0.0


@dataclass(frozen=True)
class Reference:
    """Sample pairs (random ids, lengths around the local window) and eager's logit of each, run alone."""

    lengths: list[int]
    ids: np.ndarray  # the pairs end to end
    expected: np.ndarray
    bias: float  # the scoring head's


def sample_lengths(config: Any, max_length: int) -> list[int]:
    """Pair lengths around the local attention window, so both attention paths are exercised."""
    window = int(getattr(config, "local_attention", 128))
    candidates = [3, window // 2, window - 1, window + 1, 2 * window + 7, min(4 * window, 600)]
    return sorted({min(max(2, n), max_length) for n in candidates})


def eager(source: Source, ids: np.ndarray, lengths: Any) -> np.ndarray:
    """transformers eager fp32's logit of each pair (ids end to end), one pair at a time, unpadded."""
    import numpy as np
    import torch

    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    with torch.no_grad():
        return np.array(
            [
                source.model(input_ids=torch.from_numpy(ids[s : s + n])[None]).logits[0, 0].item()
                for s, n in zip(starts, lengths, strict=True)
            ]
        )


def eager_reference(source: Source) -> Reference:
    import numpy as np

    lengths = sample_lengths(source.config, source.max_length)
    rng = np.random.default_rng(1)
    ids = np.concatenate([rng.integers(0, source.config.vocab_size, n) for n in lengths]).astype(np.int64)
    return Reference(lengths, ids, eager(source, ids, lengths), head_bias(source.model))


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
    bound = tolerance(precision, reference.expected, reference.bias)
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


def ranking(runtime: Runtime, weights: Path, precision: str, source: Source, budget: int) -> dict[str, Any]:
    """How `runtime` in `precision` on the CPU, under the served token budget, ranks one query's documents
    (auto's agreement sample: mixed lengths) against eager fp32 (agreement.py): the per-logit bound above
    catches wrong weights, not a precision too coarse for this checkpoint's spread of scores."""
    from rerank_server.export import auto
    from rerank_server.export.agreement import agreement

    ranked = auto.caller_shapes(source.config, source.tokenizer, source.max_length)[1]
    engine = runtime.build(
        str(weights),
        device="cpu",
        precision=precision,
        pad_token_id=source.pad_token_id,
        max_batch_tokens=budget,
    )
    got = engine.score(ranked.ids, ranked.lengths)
    return agreement(eager(source, ranked.ids, ranked.lengths), got).as_dict()
