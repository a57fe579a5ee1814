"""The score cache on its own (fast tier): keys, isolation between models, LRU order, the byte bound held
while storing (not only after) and in real Python memory (tracemalloc) by a cache filled ten times over, and
the smallest size it accepts."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

from rerank_server.observability import Metrics
from rerank_server.score_cache import ENTRY_BYTES, ModelKey, ScoreCache
from rerank_server.settings import Settings
from rerank_server.tokenization import TokenizedPairs

MODEL = ModelKey("alpha", "1", "fp32", "export-a")


def inputs(*rows: list[int]) -> TokenizedPairs:
    """A ragged batch of model inputs with these ids, each its own pair."""
    count = len(rows)
    return TokenizedPairs(
        input_ids=np.array([i for row in rows for i in row], dtype=np.int32),
        lengths=np.array([len(row) for row in rows], dtype=np.int32),
        owners=np.arange(count, dtype=np.int32),
        windows=np.ones(count, dtype=np.int32),
        truncated=np.zeros(count, dtype=bool),
    )


def counter(metrics: Metrics, name: str, model: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": model})
    return value or 0.0


def fill(cache: ScoreCache, model: ModelKey, batch: TokenizedPairs, logits: np.ndarray) -> np.ndarray:
    """Look the batch up, 'compute' what is missing from `logits`, store it; the answer in input order."""
    lookup = cache.lookup(model, batch)
    computed = logits[lookup.missing]
    cache.store(lookup, computed)
    answer = lookup.logits.copy()
    answer[lookup.missing] = computed
    return answer


def test_a_stored_logit_is_answered_bit_for_bit_and_counted_as_a_hit() -> None:
    metrics = Metrics()
    cache = ScoreCache(1 << 20, metrics)
    batch = inputs([1, 5, 9, 2], [1, 5, 2], [1, 5, 9, 2, 2])
    logits = np.array([0.1234567, -3.75, 1e-7], dtype=np.float32)
    first = cache.lookup(MODEL, batch)
    assert first.missing.tolist() == [0, 1, 2]
    cache.store(first, logits)
    again = cache.lookup(MODEL, batch)
    assert again.missing.size == 0
    assert again.logits.tobytes() == logits.tobytes()
    assert counter(metrics, "rerank_score_cache_hits_total", "alpha") == 3
    assert counter(metrics, "rerank_score_cache_misses_total", "alpha") == 3
    assert metrics.registry.get_sample_value("rerank_score_cache_entries") == 3
    assert metrics.registry.get_sample_value("rerank_score_cache_bytes") == 3 * ENTRY_BYTES


def test_inputs_are_keyed_by_all_their_ids_in_order() -> None:
    cache = ScoreCache(1 << 20, Metrics())
    cache.store(cache.lookup(MODEL, inputs([1, 2, 3])), np.array([1.0], dtype=np.float32))
    # A prefix, a longer input, the same ids in another order, another dtype's bytes: all misses.
    lookup = cache.lookup(MODEL, inputs([1, 2], [1, 2, 3, 0], [3, 2, 1], [1, 2, 3]))
    assert lookup.missing.tolist() == [0, 1, 2]
    assert lookup.logits[3] == 1.0


@pytest.mark.parametrize(
    "other",
    [
        ModelKey("beta", "1", "fp32", "export-a"),
        ModelKey("alpha", "2", "fp32", "export-a"),
        ModelKey("alpha", "1", "int8", "export-a"),
        ModelKey("alpha", "1", "fp32", "export-b"),
    ],
    ids=["name", "version", "precision", "export"],
)
def test_no_logit_of_another_model_precision_version_or_export_is_answered(other: ModelKey) -> None:
    cache = ScoreCache(1 << 20, Metrics())
    batch = inputs([1, 2, 3], [4, 5])
    fill(cache, MODEL, batch, np.array([1.0, 2.0], dtype=np.float32))
    assert cache.lookup(other, batch).missing.tolist() == [0, 1]
    fill(cache, other, batch, np.array([-1.0, -2.0], dtype=np.float32))
    assert cache.lookup(MODEL, batch).logits.tolist() == [1.0, 2.0]
    assert cache.lookup(other, batch).logits.tolist() == [-1.0, -2.0]


def test_the_least_recently_used_inputs_are_forgotten_first() -> None:
    metrics = Metrics()
    cache = ScoreCache(3 * ENTRY_BYTES, metrics)
    for i in range(3):
        fill(cache, MODEL, inputs([i]), np.array([float(i)], dtype=np.float32))
    cache.lookup(MODEL, inputs([0]))  # 0 is now the most recently used; 1 the least
    fill(cache, MODEL, inputs([3]), np.array([3.0], dtype=np.float32))
    assert cache.lookup(MODEL, inputs([0], [1], [2], [3])).missing.tolist() == [1]
    assert cache.entries == 3
    assert counter(metrics, "rerank_score_cache_evictions_total", "alpha") == 1


def test_zero_bytes_turns_it_off() -> None:
    metrics = Metrics()
    cache = ScoreCache(0, metrics)
    batch = inputs([1, 2])
    fill(cache, MODEL, batch, np.array([1.0], dtype=np.float32))
    assert cache.lookup(MODEL, batch).missing.tolist() == [0]
    assert cache.entries == 0
    assert counter(metrics, "rerank_score_cache_misses_total", "alpha") == 0


def test_forgetting_a_model_frees_its_entries_and_keeps_the_others() -> None:
    cache = ScoreCache(1 << 20, Metrics())
    other = ModelKey("beta", "1", "fp32", "export-b")
    batch = inputs([1, 2], [3])
    fill(cache, MODEL, batch, np.array([1.0, 2.0], dtype=np.float32))
    fill(cache, other, batch, np.array([5.0, 6.0], dtype=np.float32))
    cache.forget(MODEL)
    assert cache.entries == 2
    assert cache.lookup(MODEL, batch).missing.tolist() == [0, 1]
    assert cache.lookup(other, batch).logits.tolist() == [5.0, 6.0]


def test_a_cache_filled_ten_times_over_holds_at_most_its_bound_in_real_memory() -> None:
    bound = 1 << 20
    rng = np.random.default_rng(0)
    metrics = Metrics()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = ScoreCache(bound, metrics)
        capacity = bound // ENTRY_BYTES
        held = 0
        for step in range(10 * capacity // 500 + 1):
            lengths = rng.integers(5, 25, size=500).astype(np.int32)
            batch = TokenizedPairs(
                input_ids=rng.integers(0, 50_000, size=int(lengths.sum()), dtype=np.int32),
                lengths=lengths,
                owners=np.arange(500, dtype=np.int32),
                windows=np.ones(500, dtype=np.int32),
                truncated=np.zeros(500, dtype=bool),
            )
            fill(cache, MODEL, batch, rng.normal(size=500).astype(np.float32))
            cache.lookup(MODEL, batch)  # hits reorder the LRU list, as repeated requests do
            del batch
            if step % 4 == 0:
                gc.collect()
                held = max(held, tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()
    assert cache.entries == capacity
    assert cache.held_bytes <= bound
    assert held <= bound, f"{held} bytes held for a bound of {bound}"
    evicted = counter(metrics, "rerank_score_cache_evictions_total", "alpha")
    assert evicted == counter(metrics, "rerank_score_cache_misses_total", "alpha") - capacity > 0


class _Watched(OrderedDict[bytes, float]):
    """The cache's entries, recording the most they ever held at once."""

    most = 0

    def __setitem__(self, key: bytes, value: float) -> None:
        super().__setitem__(key, value)
        self.most = max(self.most, len(self))

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


@pytest.mark.parametrize("new", [2, 3, 5], ids=["some", "all", "more-than-all"])
def test_the_bound_holds_while_storing_not_only_after(new: int) -> None:
    metrics = Metrics()
    cache = ScoreCache(3 * ENTRY_BYTES, metrics)
    watched = _Watched()
    cache._entries = watched
    for i in range(3):
        fill(cache, MODEL, inputs([100 + i]), np.array([float(i)], dtype=np.float32))
    batch = inputs(*([i] for i in range(new)))
    answer = fill(cache, MODEL, batch, np.arange(new, dtype=np.float32))
    assert answer.tolist() == list(range(new))  # the caller gets every logit, whatever the cache keeps
    assert watched.most <= 3, f"{watched.most} entries held at once for a bound of 3"
    assert cache.entries == 3
    # What stays is what storing then forgetting the least recently used would have left: the newest ones.
    kept = cache.lookup(MODEL, inputs(*([100 + i] for i in range(3)), *([i] for i in range(new))))
    assert kept.missing.tolist() == list(range(3 + new - 3))
    assert counter(metrics, "rerank_score_cache_evictions_total", "alpha") == new


def test_a_call_storing_after_its_model_was_forgotten_stores_nothing() -> None:
    cache = ScoreCache(1 << 20, Metrics())
    lookup = cache.lookup(MODEL, inputs([1, 2], [3]))
    cache.forget(MODEL)  # the model was reloaded while the call computed
    cache.store(lookup, np.array([1.0, 2.0], dtype=np.float32))
    assert cache.entries == 0


def test_a_call_looking_up_a_forgotten_model_finds_and_stores_nothing_while_its_next_serving_caches() -> None:
    cache = ScoreCache(1 << 20, Metrics())
    batch = inputs([1, 2], [3])
    fill(cache, MODEL, batch, np.array([1.0, 2.0], dtype=np.float32))
    cache.forget(MODEL)
    # A call still holding the forgotten model, looking up only now.
    late = cache.lookup(MODEL, batch)
    assert late.missing.tolist() == [0, 1]
    cache.store(late, np.array([1.0, 2.0], dtype=np.float32))
    assert cache.entries == 0
    # The same export served again (unloaded and loaded): a new serving, cached as any model.
    again = dataclasses.replace(MODEL, serving=MODEL.serving + 1)
    fill(cache, again, batch, np.array([3.0, 4.0], dtype=np.float32))
    assert cache.lookup(again, batch).logits.tolist() == [3.0, 4.0]
    assert cache.lookup(MODEL, batch).missing.tolist() == [0, 1]


@pytest.mark.parametrize("size", [1, ENTRY_BYTES - 1])
def test_a_cache_too_small_for_one_input_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match=f"at least {ENTRY_BYTES}.*got {size}: it would hold none"):
        Settings(triton_url="fake:0", score_cache_bytes=size).validated()
    for allowed in (0, ENTRY_BYTES):
        assert Settings(triton_url="fake:0", score_cache_bytes=allowed).validated().score_cache_bytes == allowed
