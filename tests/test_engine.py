"""reranker_engine (the model side of Triton), in process: length-sorted sub-batches under a token budget."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rerank_triton_model.reranker_engine import (
    PackedReranker,
    available_cores,
    check_ragged_batch,
    create_session,
    gather_pairs,
    pair_offsets,
    plan_packed_sub_batches,
    plan_sub_batches,
    session_options,
)
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


@pytest.mark.parametrize("slack", [0.0, 0.1, 0.25])
def test_padding_stays_within_the_slack(slack: float) -> None:
    # 64 log-normal lengths, like one request's rerank candidates: under the token budget alone, runs
    # of short pairs would be padded to the longest that fits (about 50% padding on these lengths).
    lengths = np.clip(np.random.default_rng(1).lognormal(np.log(200), 0.8, 64).astype(int), 16, 1024)
    batches = plan_sub_batches(lengths, 8192, padding_slack=slack, padding_allowance=32)
    assert sorted(np.concatenate([b.pairs for b in batches]).tolist()) == list(range(lengths.size))
    for batch in batches:
        real = int(lengths[batch.pairs].sum())
        assert batch.padded_tokens - real <= max(slack * real, 32) or batch.pairs.size == 1
        assert batch.padded_tokens <= 8192 or batch.pairs.size == 1
    waste = sum(b.padded_tokens for b in batches) / lengths.sum()
    assert waste <= 1 + max(slack, 0.05)
    unbounded = plan_sub_batches(lengths, 8192, padding_slack=float("inf"))
    assert sum(b.padded_tokens for b in unbounded) / lengths.sum() > 1.3
    assert len(unbounded) < len(batches)


def test_sessions_use_the_available_cores_without_spinning() -> None:
    options = session_options()
    assert options.intra_op_num_threads == available_cores() >= 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(3, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options(3).intra_op_num_threads == 3


@pytest.mark.e2e
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


@pytest.mark.parametrize("package", ["rerank_triton_model", "rerank_server", "bench"])
def test_the_packages_make_openmp_threads_wait_passively_unless_told_otherwise(package: str) -> None:
    """Importing the model package (or what imports it first: the service, the benchmarks) sets the policy
    before torch loads libgomp, which reads it once; an operator's own value stays."""
    probe = f"import os, {package}, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def policy(environment: dict[str, str]) -> str:
        done = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert policy(env) == "PASSIVE False"
    assert policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE False"


ARENA_PROBE = """
import json, resource, sys, numpy as np, psutil
from rerank_triton_model.reranker_engine import RELEASE_AFTER_TOKENS, PackedReranker
engine = PackedReranker.from_file(sys.argv[1], pad_token_id=50283, max_batch_tokens=16384)
ids = np.random.default_rng(0).integers(5, 50000, RELEASE_AFTER_TOKENS).astype(np.int32)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
batch = lambda: engine.score(ids[:3000], np.array([1000, 1000, 1000]))
batch()
batch()  # ONNX Runtime's arena settles over its first two runs of a shape
idle, before = psutil.Process().memory_info().rss, faults()
batch()  # pairs under the bound: the run reuses what the last one left in the arena
again = faults() - before
# The shortest pair after which memory is handed back: dense attention's T x T scores per head and layer.
engine.score(ids, np.array([RELEASE_AFTER_TOKENS]))
print(json.dumps({"long": psutil.Process().memory_info().rss - idle, "short_run_faults": again}))
"""


@pytest.mark.e2e
def test_onnx_runtime_hands_back_what_a_long_pair_allocated(model_repository: Path) -> None:
    """The dense graph's attention over one 4096-token pair takes GiBs in ONNX Runtime's arena (the tiny
    model: about 1.5); after the run the process holds no more than before it (own process, RSS), while
    runs of shorter pairs keep reusing the arena."""
    onnx_path = model_repository / "reranker_long" / "1" / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-c", ARENA_PROBE, str(onnx_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    grown = json.loads(done.stdout.strip().splitlines()[-1])
    assert grown["long"] < 256 * 2**20, grown
    # 3,000 tokens take about 60,000 pages; handed back after each run, every run would fault them in again.
    assert grown["short_run_faults"] < 2000, grown


@pytest.mark.e2e
def test_a_gpu_session_never_falls_back_to_the_cpu_silently(model_repository: Path) -> None:
    onnx_path = str(model_repository / "reranker" / "1" / "model.onnx")
    assert create_session(onnx_path).get_providers()[0] == "CPUExecutionProvider"
    # This machine has no CUDA provider: ONNX Runtime would run the CPU instead; the engine refuses.
    with pytest.raises(RuntimeError, match="could not start CUDAExecutionProvider"):
        create_session(onnx_path, providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])


@pytest.mark.parametrize("budget", [1, 64, 300, 1000, 100_000])
def test_packed_sub_batches_cover_every_pair_once_within_the_token_budget(budget: int) -> None:
    lengths = np.random.default_rng(2).integers(1, 512, 200)
    batches = plan_packed_sub_batches(lengths, budget)
    assert sorted(np.concatenate([b.pairs for b in batches]).tolist()) == list(range(lengths.size))
    for batch in batches:
        real = int(lengths[batch.pairs].sum())
        # No padding: the tokens run are the real ones, within the budget unless one pair exceeds it.
        assert batch.padded_tokens == real
        assert real <= budget or batch.pairs.size == 1
    # Greedy: a run ends only where the next pair would not fit.
    for first, second in itertools.pairwise(batches):
        assert first.padded_tokens + int(lengths[second.pairs[0]]) > budget


def test_gather_pairs_lays_the_chosen_pairs_ids_end_to_end_in_their_order() -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 40, 300).astype(np.int32)
    input_ids = rng.integers(0, 50_000, int(lengths.sum())).astype(np.int32)
    offsets = pair_offsets(lengths)
    for pairs in (rng.permutation(300), rng.permutation(300)[:17], np.array([5]), np.array([], dtype=np.int64)):
        expected = [input_ids[offsets[p] : offsets[p] + lengths[p]] for p in pairs]
        gathered = gather_pairs(input_ids, offsets, lengths, pairs)
        assert gathered.dtype == np.int32
        assert np.array_equal(gathered, np.concatenate([np.empty(0, np.int32), *expected]))


@pytest.mark.e2e
@pytest.mark.parametrize("budget", [40, 300, 8192])
def test_packed_engine_matches_eager_whatever_the_budget(model_repository: Path, checkpoints, budget: int) -> None:
    reference = eager(checkpoints["reranker_packed"])
    documents = mixed_documents()
    encoded = [reference.encode(QUERY, d) for d in documents]
    engine = PackedReranker.from_pretrained(
        str(model_repository / "reranker_packed" / "1" / "model"),
        pad_token_id=50283,
        max_batch_tokens=budget,
        packed=True,
    )
    assert engine.packed
    input_ids = np.concatenate([np.array(e, dtype=np.int32) for e in encoded])
    lengths = np.array([len(e) for e in encoded])
    assert sum(b.padded_tokens for b in engine.plan(lengths)) == lengths.sum()
    np.testing.assert_allclose(engine.score(input_ids, lengths), reference.logits(QUERY, documents), atol=1e-4)
    # Cancellation: pairs no longer wanted are dropped uncomputed (NaN), the others still scored.
    dropped = lengths > 20
    logits = engine.score(input_ids, lengths, active=lambda pairs: ~dropped[pairs])
    assert np.isnan(logits[dropped]).all() and not np.isnan(logits[~dropped]).any()


@pytest.mark.e2e
def test_torch_runtime_agrees_with_onnx_runtime(model_repository: Path) -> None:
    # The same weights (reranker_torch is the mean-pooling checkpoint), two runtimes, one ragged batch.
    version = model_repository / "reranker_torch" / "1"
    rng = np.random.default_rng(7)
    lengths = rng.integers(2, 384, 24)
    ids = rng.integers(0, 50000, int(lengths.sum()))
    torch_engine = PackedReranker.from_pretrained(str(version / "model"), pad_token_id=50283, max_batch_tokens=2048)
    logits = torch_engine.score(ids, lengths)
    onnx_engine = PackedReranker.from_file(
        str(model_repository / "reranker_mean" / "1" / "model.onnx"), pad_token_id=50283, max_batch_tokens=2048
    )
    assert len(torch_engine.plan(lengths)) > 1
    np.testing.assert_allclose(logits, onnx_engine.score(ids, lengths), atol=1e-4)


@pytest.mark.parametrize(
    ("ids", "lengths", "problem"),
    [
        ([1, 2, 3], [], "at least one pair"),
        ([1, 2, 3], [3, 0], "at least 1"),
        ([1, 2, 3], [2], "(1 pairs) sum to 2 but input_ids holds 3"),
        ([1, 2, 99], [3], "token ids must lie in [0, 50)"),
        ([1, -2, 9], [3], "token ids must lie in [0, 50)"),
    ],
)
def test_malformed_ragged_batches_are_named(ids: list[int], lengths: list[int], problem: str) -> None:
    message = check_ragged_batch(np.array(ids), np.array(lengths, dtype=np.int64), vocab_size=50)
    assert message is not None and problem in message
    assert check_ragged_batch(np.array([1, 2, 3]), np.array([1, 2]), vocab_size=50) is None
