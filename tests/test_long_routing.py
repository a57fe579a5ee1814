"""Long pairs on the packed engine inside an ONNX Runtime model (reranker_engine.RoutedReranker).

In process: which engine computes which pair, order, cancellation and the token budget (with runners that
record what they were given), and the routed scores against each engine alone and transformers eager on a
real checkpoint. Served: a model exported with --long-pair-tokens, one Rerank call mixing pairs below and
above the threshold, against eager, with the model's long-pairs counter as evidence of the route.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rerank_client import RerankClient
from rerank_server.testing import exported_parameters, free_port, save_random_checkpoint
from rerank_triton_model.reranker_engine import PackedReranker, RoutedReranker
from rerank_triton_model.runtimes import LONG_PAIR_TOKENS
from tests.conftest import TOKENIZER_DIR, Stack, e2e_fixture, run_rerank, start_serve, stop_serve_later
from tests.reference import eager
from tests.texts import QUERY, text

FP32_TOLERANCE = 1e-4  # the export check's
THRESHOLD = 40
BUDGET = 160


def row_sums(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (ids * mask).sum(axis=1).astype(np.float32)


class PaddedRecorder:
    """A Runner whose logit is the sum of a row's real ids; it records the real lengths it computed."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.padded: list[int] = []

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.lengths += attention_mask.sum(axis=1).tolist()
        self.padded.append(int(input_ids.size))
        return row_sums(input_ids, attention_mask)


class PackedRecorder:
    """A PackedRunner with the same logits as PaddedRecorder; it records the lengths and tokens of each run."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.tokens: list[int] = []

    def run_packed(self, input_ids: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
        self.lengths += np.diff(cu_seqlens).tolist()
        self.tokens.append(int(input_ids.size))
        return np.add.reduceat(input_ids, cu_seqlens[:-1].astype(np.int64)).astype(np.float32)


def recorded_engine(threshold: int = THRESHOLD) -> tuple[RoutedReranker, PaddedRecorder, PackedRecorder]:
    short, long = PaddedRecorder(), PackedRecorder()
    routed = RoutedReranker(
        PackedReranker(short, pad_token_id=0, max_batch_tokens=BUDGET),
        PackedReranker(long, pad_token_id=0, max_batch_tokens=BUDGET),
        threshold,
    )
    return routed, short, long


def ragged(lengths: list[int], seed: int = 0, vocab: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, size=sum(lengths)).astype(np.int64), np.array(lengths, dtype=np.int64)


def expected_sums(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.add.reduceat(ids, np.concatenate(([0], np.cumsum(lengths)[:-1]))).astype(np.float32)


# Long and short pairs interleaved, the threshold itself (short) and one past it (long), pairs over the budget.
MIXED = [7, 300, 40, 41, 3, 120, 39, 200, 12, 41, 90, 1, 170]


def test_each_pair_runs_on_its_engine_and_comes_back_in_place() -> None:
    routed, short, long = recorded_engine()
    ids, lengths = ragged(MIXED)
    logits = routed.score(ids, lengths)
    np.testing.assert_array_equal(logits, expected_sums(ids, lengths))
    assert sorted(short.lengths) == sorted(n for n in MIXED if n <= THRESHOLD)
    assert sorted(long.lengths) == sorted(n for n in MIXED if n > THRESHOLD)


def test_sub_batches_name_pairs_of_the_whole_batch_within_each_budget() -> None:
    routed, short, _ = recorded_engine()
    ids, lengths = ragged(MIXED)
    seen: list[int] = []
    for batch, logits in routed.iter_sub_batches(ids, lengths):
        seen += batch.pairs.tolist()
        np.testing.assert_array_equal(logits, expected_sums(ids, lengths)[batch.pairs])
        kinds = set((lengths[batch.pairs] > THRESHOLD).tolist())
        assert len(kinds) == 1, "a sub-batch mixes the engines"
        if kinds == {True}:  # the packed engine's runs count real tokens
            assert batch.padded_tokens == int(lengths[batch.pairs].sum())
        assert batch.padded_tokens <= BUDGET or batch.pairs.size == 1
    assert sorted(seen) == list(range(len(MIXED)))
    assert max(short.padded) <= BUDGET


def test_cancelled_pairs_of_both_kinds_are_dropped_uncomputed() -> None:
    routed, short, long = recorded_engine()
    ids, lengths = ragged(MIXED)
    # The callers of these pairs cancelled: two short (3, 39) and two long (300, 120), by whole-batch index.
    cancelled = {1, 4, 5, 6}
    asked: list[int] = []

    def active(pairs: np.ndarray) -> np.ndarray:
        asked.extend(pairs.tolist())
        return np.array([p not in cancelled for p in pairs.tolist()])

    logits = routed.score(ids, lengths, active)
    assert set(asked) == set(range(len(MIXED)))
    dropped = np.isnan(logits)
    assert set(np.flatnonzero(dropped).tolist()) == cancelled
    np.testing.assert_array_equal(logits[~dropped], expected_sums(ids, lengths)[~dropped])
    computed = [n for i, n in enumerate(MIXED) if i not in cancelled]
    assert sorted(short.lengths + long.lengths) == sorted(computed)


def test_a_batch_of_one_kind_runs_on_one_engine_and_long_runs_are_counted() -> None:
    routed, short, long = recorded_engine()
    counted: list[int] = []
    routed.on_long = counted.append
    ids, lengths = ragged([5, 9, 40])
    np.testing.assert_array_equal(routed.score(ids, lengths), expected_sums(ids, lengths))
    assert long.lengths == [] and counted == []
    ids, lengths = ragged([41, 300, 41, 60])
    np.testing.assert_array_equal(routed.score(ids, lengths), expected_sums(ids, lengths))
    assert short.lengths == [5, 9, 40] and sorted(long.lengths) == [41, 41, 60, 300]
    assert sum(counted) == 4 and len(counted) == len(long.tokens)


def test_a_threshold_below_one_is_refused() -> None:
    engine = PackedReranker(PaddedRecorder(), pad_token_id=0, max_batch_tokens=BUDGET)
    with pytest.raises(ValueError, match="long_pair_tokens"):
        RoutedReranker(engine, engine, 0)


# -- real engines on a real checkpoint -------------------------------------------------------

# Another shape than the tests' others: 6 layers, every second global, a window of 20 (10 each way), mean pooling.
ROUTED_CONFIG: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "local_attention": 20,
    "global_attn_every_n_layers": 2,
    "classifier_pooling": "mean",
    "max_position_embeddings": 1024,
}


@pytest.fixture(scope="module")
def routed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("routed") / "checkpoint", TOKENIZER_DIR, 5, **ROUTED_CONFIG)


def test_routed_scores_equal_each_engine_alone_and_eager(routed_checkpoint: Path) -> None:
    # The padded PyTorch runner stands in for ONNX Runtime here (the served test below has the real graph).
    short = PackedReranker.from_pretrained(str(routed_checkpoint), pad_token_id=50283, max_batch_tokens=600)
    long = PackedReranker.from_pretrained(str(routed_checkpoint), pad_token_id=50283, max_batch_tokens=600, packed=True)
    routed = RoutedReranker(short, long, 64)
    lengths = [12, 700, 64, 65, 30, 1000, 5, 200, 64, 130]
    ids, lengths_array = ragged(lengths, seed=3, vocab=50_000)
    logits = routed.score(ids, lengths_array)
    is_long = lengths_array > 64
    offsets = np.concatenate(([0], np.cumsum(lengths_array)[:-1]))

    def subset(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = np.flatnonzero(mask)
        return np.concatenate([ids[offsets[p] : offsets[p] + lengths_array[p]] for p in pairs]), lengths_array[pairs]

    np.testing.assert_array_equal(logits[~is_long], short.score(*subset(~is_long)))
    np.testing.assert_array_equal(logits[is_long], long.score(*subset(is_long)))
    reference = eager(routed_checkpoint)
    expected = [reference.logits_of_ids(ids[o : o + n].tolist()) for o, n in zip(offsets, lengths_array, strict=True)]
    np.testing.assert_allclose(logits, expected, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.e2e
def test_an_exported_model_routes_its_graph_and_checkpoint(model_repository: Path, checkpoints) -> None:
    """reranker_long as `rerank export` wrote it by default (ONNX graph, fp32 checkpoint, long_pair_tokens):
    ONNX Runtime and the packed engine behind one RoutedReranker, against each alone and eager (sdpa: 8192
    tokens), with pairs of both kinds cancelled."""
    folder = model_repository / "reranker_long"
    parameters = exported_parameters(folder)
    assert parameters.long_pair_tokens == LONG_PAIR_TOKENS and parameters.long_weights
    pad, budget = parameters.pad_token_id, parameters.max_batch_tokens
    short = PackedReranker.from_file(str(folder / "1" / parameters.weights), pad_token_id=pad, max_batch_tokens=budget)
    long = PackedReranker.from_pretrained(
        str(folder / "1" / parameters.long_weights), pad_token_id=pad, max_batch_tokens=budget, packed=True
    )
    routed = RoutedReranker(short, long, parameters.long_pair_tokens)
    edge = parameters.long_pair_tokens
    lengths = np.array([30, 8192, edge, 500, edge + 1, 3000, 8], dtype=np.int64)
    ids, _ = ragged(lengths.tolist(), seed=9, vocab=50_000)
    logits = routed.score(ids, lengths)
    is_long = lengths > edge
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    reference = eager(checkpoints["reranker_long"], "sdpa")
    expected = [reference.logits_of_ids(ids[o : o + n].tolist()) for o, n in zip(offsets, lengths, strict=True)]
    np.testing.assert_allclose(logits, expected, atol=FP32_TOLERANCE, rtol=0)
    for engine, chosen in ((short, ~is_long), (long, is_long)):
        pairs = np.flatnonzero(chosen)
        alone = engine.score(np.concatenate([ids[offsets[p] : offsets[p] + lengths[p]] for p in pairs]), lengths[pairs])
        np.testing.assert_array_equal(logits[pairs], alone)
    dropped = np.isin(np.arange(lengths.size), [1, 3])  # one long pair, one short
    cancelled = routed.score(ids, lengths, active=lambda pairs: ~dropped[pairs])
    assert np.isnan(cancelled[dropped]).all()
    np.testing.assert_array_equal(cancelled[~dropped], logits[~dropped])


# -- served ----------------------------------------------------------------------------------


@e2e_fixture(scope="module")
def routed_stack(routed_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`rerank serve` of routed_checkpoint exported for ONNX Runtime fp32 with long pairs over ROUTED_TOKENS
    on the packed engine; its Triton log is stack.triton_log."""
    repository = tmp_path_factory.mktemp("routed-repository")
    done = run_rerank(
        "export",
        "--model",
        str(routed_checkpoint),
        "--output",
        str(repository),
        "--precision",
        "fp32",
        "--long-pair-tokens",
        str(ROUTED_TOKENS),
        "--max-batch-tokens",
        "1500",
    )
    assert done.returncode == 0, done.stderr
    triton_log = repository.parent / "routed-triton.log"
    served = start_serve(
        [
            f"--model-repository={repository}",
            f"--triton-log={triton_log}",
            f"--triton-grpc-port={free_port()}",
            f"--triton-http-port={free_port()}",
            f"--triton-metrics-port={free_port()}",
        ]
    )
    served.triton_log = triton_log
    yield served
    stop_serve_later(served)


ROUTED_TOKENS = 64


def long_pairs_counted(stack: Stack) -> float:
    assert stack.triton_metrics_url is not None
    metrics = urllib.request.urlopen(stack.triton_metrics_url, timeout=10).read().decode()
    found = re.findall(r'^rerank_model_long_pairs_total\{model="reranker",pid="\d+"\} (\S+)$', metrics, re.M)
    assert found, "the model exports no long-pairs counter"
    return sum(float(value) for value in found)


@pytest.mark.e2e
def test_served_long_pairs_run_on_the_packed_engine_and_agree_with_eager(
    routed_stack: Stack, routed_checkpoint: Path
) -> None:
    reference = eager(routed_checkpoint)
    # Below the threshold, at it, just past it, and far past it (2000 words: cut at 1024 tokens).
    documents = [text(5, seed=1), text(2000, seed=2), text(30, seed=3), text(400, seed=4), text(60, seed=5)]
    lengths = [len(reference.encode(QUERY, d)) for d in documents]
    assert min(lengths) <= ROUTED_TOKENS < max(lengths) and max(lengths) == 1024
    long = sum(n > ROUTED_TOKENS for n in lengths)
    assert 0 < long < len(documents)
    before = long_pairs_counted(routed_stack)
    with RerankClient(routed_stack.target, timeout=300) as client:
        response = client.rerank(QUERY, documents)
    results = {r.index: r for r in response.results}
    np.testing.assert_allclose(
        [results[i].logit for i in range(len(documents))],
        reference.logits(QUERY, documents),
        atol=FP32_TOLERANCE,
        rtol=0,
    )
    assert long_pairs_counted(routed_stack) - before == long
    assert routed_stack.triton_log is not None
    log = routed_stack.triton_log.read_text(errors="replace")
    assert f"pairs over {ROUTED_TOKENS} tokens run on the packed engine" in log
