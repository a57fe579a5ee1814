"""reranker_engine (the model side of Triton), in process: length-sorted sub-batches under a token budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rerank_model_repository.reranker_engine import PackedReranker, check_ragged_batch, plan_sub_batches
from tests.reference import eager
from tests.texts import QUERY, mixed_documents


@pytest.mark.parametrize("budget", [1, 64, 300, 1000, 100_000])
def test_sub_batches_cover_every_pair_once_within_the_budget(budget: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 512, 200)
    batches = plan_sub_batches(lengths, budget)
    covered = np.concatenate([b.pairs for b in batches])
    assert sorted(covered.tolist()) == list(range(lengths.size))
    for batch in batches:
        assert batch.width == lengths[batch.pairs].max()
        # Over budget only when a single pair is longer than the budget on its own.
        assert batch.padded_tokens <= budget or batch.pairs.size == 1
    widths = [b.width for b in batches]
    assert widths == sorted(widths), "sub-batches are not length-ordered"


def test_short_pairs_are_not_padded_to_long_ones() -> None:
    lengths = np.array([500, 10, 12, 11, 480, 9])
    batches = plan_sub_batches(lengths, 1024)
    assert [sorted(b.pairs.tolist()) for b in batches] == [[1, 2, 3, 5], [0, 4]]
    assert sum(b.padded_tokens for b in batches) == 4 * 12 + 2 * 500


@pytest.mark.parametrize("budget", [16, 200, 8192])
def test_scores_match_eager_whatever_the_budget(model_repository: Path, checkpoints, budget: int) -> None:
    reference = eager(checkpoints["reranker"])
    documents = mixed_documents()
    encoded = [reference.encode(QUERY, d) for d in documents]
    engine = PackedReranker.from_file(
        str(model_repository / "reranker" / "1" / "model.onnx"), pad_token_id=50283, max_batch_tokens=budget
    )
    input_ids = np.concatenate([np.array(e, dtype=np.int32) for e in encoded])
    logits = engine.score(input_ids, np.array([len(e) for e in encoded]))
    np.testing.assert_allclose(logits, reference.logits(QUERY, documents), atol=1e-4)


@pytest.mark.parametrize(
    ("ids", "lengths", "problem"),
    [
        ([1, 2, 3], [], "at least one pair"),
        ([1, 2, 3], [3, 0], "at least 1"),
        ([1, 2, 3], [2], "sum to 2 but input_ids holds 3"),
        ([1, 2, 99], [3], "token ids must lie in [0, 50)"),
        ([1, -2, 9], [3], "token ids must lie in [0, 50)"),
    ],
)
def test_malformed_ragged_batches_are_named(ids: list[int], lengths: list[int], problem: str) -> None:
    message = check_ragged_batch(np.array(ids), np.array(lengths, dtype=np.int64), vocab_size=50)
    assert message is not None and problem in message
    assert check_ragged_batch(np.array([1, 2, 3]), np.array([1, 2]), vocab_size=50) is None
