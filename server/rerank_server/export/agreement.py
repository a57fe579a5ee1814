"""How far one set of logits ranks documents like a reference set, and the bounds that count as "ranks
like fp32": the export's auto choice, `bench.run` and `bench.gpu` all measure and judge agreement here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# A candidate ranks like the reference when the top 10 share this share of their documents and the
# ranks correlate this well: a rerank call's caller reads the top of the list.
TOP10_OVERLAP_BOUND = 0.95
SPEARMAN_BOUND = 0.99
# int8, exported only when asked for (auto never picks a candidate outside the bounds above), is held to
# these: its quantization noise is larger than bf16's, and the benchmark and its tests report it against them.
INT8_TOP10_OVERLAP_BOUND = 0.9
INT8_SPEARMAN_BOUND = 0.98
TOP = 10


@dataclass(frozen=True)
class Agreement:
    documents: int
    top10_overlap: float  # shared documents in both top-10s over min(10, documents)
    spearman: float  # Pearson correlation of the ranks (ties ranked in document order)
    max_abs_diff: float
    rms_diff: float
    reference_std: float  # spread of the reference logits
    distinct: int  # distinct values among the other's logits
    reference_distinct: int

    @property
    def noise_to_spread(self) -> float:
        """RMS of the differences over the reference's spread: what rank agreement depends on."""
        return self.rms_diff / self.reference_std if self.reference_std else float("inf")

    @property
    def distinct_ratio(self) -> float:
        """Distinct logits over the reference's (ties decided by request order rather than by score)."""
        return self.distinct / self.reference_distinct if self.reference_distinct else 1.0

    @property
    def agrees(self) -> bool:
        return self.top10_overlap >= TOP10_OVERLAP_BOUND and self.spearman >= SPEARMAN_BOUND

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "noise_to_spread": self.noise_to_spread,
            "distinct_ratio": self.distinct_ratio,
            "agrees": self.agrees,
        }


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(np.float64)


def agreement(reference: Any, other: Any) -> Agreement:
    """`other`'s logits against `reference`'s, document by document (same order, same length)."""
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    other = np.asarray(other, dtype=np.float64).reshape(-1)
    if reference.shape != other.shape or reference.size == 0:
        raise ValueError(f"logits of the same documents expected, got {reference.size} and {other.size}")
    top = min(TOP, reference.size)
    best = set(np.argsort(-reference, kind="stable")[:top].tolist())
    overlap = len(best & set(np.argsort(-other, kind="stable")[:top].tolist())) / top
    spearman = float(np.corrcoef(ranks(reference), ranks(other))[0, 1]) if reference.size > 1 else 1.0
    error = other - reference
    return Agreement(
        documents=int(reference.size),
        top10_overlap=overlap,
        spearman=spearman if np.isfinite(spearman) else float(np.array_equal(ranks(reference), ranks(other))),
        max_abs_diff=float(np.abs(error).max()),
        rms_diff=float(np.sqrt(np.mean(error**2))),
        reference_std=float(reference.std()),
        distinct=len(set(other.astype(np.float32).tolist())),
        reference_distinct=len(set(reference.astype(np.float32).tolist())),
    )
