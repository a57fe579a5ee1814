"""Logits to the ranked results of a RerankResponse."""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Scores in [0, 1], computed in float64 so that large |logit| neither overflows nor loses sign."""
    x = np.asarray(logits, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def rank(scores: np.ndarray, top_n: int = 0) -> np.ndarray:
    """Indices ordered by score descending, equal scores by index ascending; the first top_n (0: all)."""
    order = np.lexsort((np.arange(scores.size), -scores.astype(np.float64)))
    return order[:top_n] if 0 < top_n < order.size else order
