"""`--precision auto`'s measuring and choosing (export/auto.py), driven by engines of known cost on a clock
they advance: rounds until the candidates separate beyond their spread, ties to the engine that serves long
pairs itself, the ranking bound, and the long-pair threshold. The exports that run it on real engines are in
test_precision.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from rerank_server.export import auto
from rerank_server.export.agreement import SPEARMAN_BOUND, TOP10_OVERLAP_BOUND, agreement
from rerank_triton_model.runtimes import ONNXRUNTIME, PACKED, TORCH


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Engine:
    """Scores in `seconds(lengths)` of the clock, times a seeded jitter of ±`noise`; logits: the pairs' lengths."""

    def __init__(self, clock: Clock, seconds: Callable[[np.ndarray], float], noise: float = 0.0, seed: int = 0) -> None:
        self.clock, self.seconds, self.noise = clock, seconds, noise
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.clock.now += self.seconds(lengths) * (1 + self.noise * self.rng.uniform(-1, 1))
        return lengths.astype(np.float32)


def per_token(rate: float) -> Callable[[np.ndarray], float]:
    return lambda lengths: float(lengths.sum()) / rate


SHAPES = [
    auto.Shape("short", np.zeros(8 * 256, dtype=np.int64), np.full(8, 256)),
    auto.Shape("mixed", np.zeros(3000, dtype=np.int64), np.array([100, 400, 2500])),
    auto.Shape("long", np.zeros(2048, dtype=np.int64), np.array([2048])),
]
AGREES = {"agrees": True}


def rows(*kinds: tuple[object, str]) -> list[auto.Row]:
    return [auto.Row(runtime, precision, dict(AGREES)) for runtime, precision in kinds]  # type: ignore[arg-type]


def test_a_clear_leader_is_chosen_after_the_least_rounds() -> None:
    clock = Clock()
    engines = [Engine(clock, per_token(r), noise=0.02, seed=i) for i, r in enumerate((1000, 1300, 2000))]
    candidates = rows((ONNXRUNTIME, "fp32"), (ONNXRUNTIME, "int8"), (PACKED, "bf16"))
    decision = auto.measure(candidates, engines, SHAPES, budget_s=1e9, clock=clock)
    assert decision.separated and decision.chosen is candidates[2]
    assert [len(row.rounds) for row in candidates] == [auto.MIN_ROUNDS] * 3
    assert candidates[2].speedup == pytest.approx(2.0, rel=0.05) and 0 < candidates[2].spread < 0.1
    assert candidates[0].speedup == 1.0 and candidates[0].spread == 0.0
    assert set(candidates[1].per_shape) == {"short", "mixed", "long"}
    # One untimed pass of every shape first, then a pass of every shape per round.
    assert all(engine.calls == len(SHAPES) * (1 + auto.MIN_ROUNDS) for engine in engines)


def test_candidates_within_the_spread_go_to_the_packed_engine_after_the_budget() -> None:
    clock = Clock()
    engines = [
        Engine(clock, per_token(1000), noise=0.15, seed=1),
        Engine(clock, per_token(1500), noise=0.15, seed=2),  # int8, a hair faster than ...
        Engine(clock, per_token(1450), noise=0.15, seed=3),  # ... bf16 on the packed engine
    ]
    candidates = rows((ONNXRUNTIME, "fp32"), (ONNXRUNTIME, "int8"), (PACKED, "bf16"))
    budget = 60.0
    decision = auto.measure(candidates, engines, SHAPES, budget_s=budget, clock=clock)
    assert not decision.separated and decision.chosen is candidates[2]
    assert {id(row) for row in decision.tied} >= {id(candidates[1]), id(candidates[2])}
    rounds = len(candidates[0].rounds)
    assert auto.MIN_ROUNDS < rounds <= auto.MAX_ROUNDS  # kept measuring, within the budget (or the cap)
    text = auto.reason(decision, SHAPES, candidates)
    assert text.startswith("auto: bf16 (packed)") and "tied within the spread" in text and "long pairs" in text


def test_a_tie_between_dense_engines_keeps_the_exact_reference() -> None:
    clock = Clock()
    engines = [Engine(clock, per_token(1000), noise=0.2, seed=4), Engine(clock, per_token(1020), noise=0.2, seed=5)]
    candidates = rows((ONNXRUNTIME, "fp32"), (ONNXRUNTIME, "int8"))
    decision = auto.measure(candidates, engines, SHAPES, budget_s=30.0, clock=clock)
    assert decision.chosen is candidates[0] and not decision.separated


def test_a_candidate_that_ranks_unlike_fp32_is_never_chosen() -> None:
    clock = Clock()
    engines = [Engine(clock, per_token(1000)), Engine(clock, per_token(3000)), Engine(clock, per_token(1500))]
    candidates = rows((ONNXRUNTIME, "fp32"), (TORCH, "bf16"), (ONNXRUNTIME, "int8"))
    candidates[1].agreement = {"agrees": False}
    decision = auto.measure(candidates, engines, SHAPES, budget_s=1e9, clock=clock)
    assert decision.chosen is candidates[2]
    assert "bf16 (torch) 3.00x ± 0.00, ranks unlike fp32" in auto.reason(decision, SHAPES, candidates)


def test_rank_check_uses_the_agreement_bounds() -> None:
    reference = np.linspace(0, 1, 32)
    swapped = reference.copy()
    swapped[[-1, 0]] = swapped[[0, -1]]  # the best document ranked last
    clock = Clock()

    class Fixed(Engine):
        def __init__(self, logits: np.ndarray) -> None:
            super().__init__(clock, per_token(1000))
            self.logits = logits

        def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            return self.logits

    candidates = rows((ONNXRUNTIME, "fp32"), (ONNXRUNTIME, "int8"), (PACKED, "bf16"))
    auto.rank_check(candidates, [Fixed(reference), Fixed(reference + 1e-3), Fixed(swapped)], SHAPES[0])
    assert [row.agrees for row in candidates] == [True, True, False]
    found = agreement(reference, swapped)
    assert found.top10_overlap == 0.9 and found.top10_overlap < TOP10_OVERLAP_BOUND
    assert candidates[2].agreement["spearman"] < SPEARMAN_BOUND


def test_top10_overlap_divides_by_the_documents_when_fewer_than_10() -> None:
    found = agreement([3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 0.0, 1.0])
    assert found.top10_overlap == 1.0 and found.documents == 4
    assert agreement([1.0, 2.0], [2.0, 1.0]).spearman == pytest.approx(-1.0)


def test_the_threshold_is_the_longest_length_the_dense_engine_wins() -> None:
    clock = Clock()
    # Dense attention: cost grows with the square of the length; the packed engine's linearly, slower per token.
    dense = Engine(clock, lambda lengths: float((lengths**2).sum()) / 1e6 + float(lengths.sum()) / 5000, 0.01, 1)
    packed = Engine(clock, lambda lengths: float(lengths.sum()) / 1500, 0.01, 2)

    def pair(n: int) -> auto.Shape:
        return auto.Shape("pair", np.zeros(n, dtype=np.int64), np.array([n]))

    found = auto.threshold(dense, packed, pair, 8192, clock=clock)
    # 256: 0.117 vs 0.171 s; 512: 0.365 vs 0.341; 1024: 1.25 vs 0.68 -> the dense engine wins at 256 only.
    assert found["tokens"] == 256
    assert [step["faster"] for step in found["ladder"]] == ["short", "packed", "packed"]  # stopped: 2 behind
    found = auto.threshold(dense, packed, pair, 400, clock=clock)
    assert found["tokens"] == 256 and [step["tokens"] for step in found["ladder"]] == [256]
