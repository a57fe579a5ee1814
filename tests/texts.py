"""Deterministic texts of chosen lengths for tests."""

from __future__ import annotations

import random

WORDS = (
    "the capital of china is beijing a city with a long history quick sort divides an array around a pivot "
    "weather forecast rain sunshine python implementation recursion partition museum river mountain train"
).split()


def text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


# Pair lengths from a handful of tokens to past the 512-token limit of the tiny models, crossing
# their local attention windows (16 and 32 tokens), in an order that is not sorted.
MIXED_WORD_COUNTS = (40, 1, 7, 300, 12, 0, 25, 90, 3, 700, 16)
QUERY = "how to implement quick sort in python?"


def mixed_documents() -> list[str]:
    return [text(n, seed=i) for i, n in enumerate(MIXED_WORD_COUNTS)]
