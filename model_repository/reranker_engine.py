"""Length-sorted, token-budgeted execution of an ONNX cross-encoder over ragged (query, document) pairs.

This file runs inside Triton's Python backend (`rerank export` copies it next to model.py) and in
the benchmarks in-process, so it depends on numpy and onnxruntime only.

A ragged batch is every pair's token ids laid end to end (`input_ids`) plus each pair's length
(`lengths`). Pairs are ordered by length and cut into sub-batches whose padded size
(pairs x longest pair) stays within `max_batch_tokens`: short pairs are never padded to long ones,
and a batch full of 8192-token documents cannot exhaust memory. A pair longer than the budget
runs alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class SubBatch:
    """Positions (into the ragged batch) of pairs that run together, and their padded width."""

    pairs: np.ndarray  # int64 indices into `lengths`, ascending by length
    width: int  # length of the longest pair: every row is padded to it

    @property
    def padded_tokens(self) -> int:
        return int(self.pairs.size) * self.width


def plan_sub_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[SubBatch]:
    """Cut length-sorted pairs into groups whose padded size stays within max_batch_tokens."""
    order = np.argsort(lengths, kind="stable")
    batches: list[SubBatch] = []
    start = 0
    for end in range(1, order.size + 1):
        # Ascending order: the pair just added is the group's longest.
        width = int(lengths[order[end - 1]])
        if end - start > 1 and (end - start) * width > max_batch_tokens:
            batches.append(SubBatch(order[start : end - 1], int(lengths[order[end - 2]])))
            start = end - 1
    if order.size:
        batches.append(SubBatch(order[start:], int(lengths[order[-1]])))
    return batches


def pad_sub_batch(
    input_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, batch: SubBatch, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 (input_ids, attention_mask) of shape [pairs, width] for one sub-batch."""
    rows = batch.pairs.size
    row_lengths = lengths[batch.pairs]
    mask = np.arange(batch.width)[None, :] < row_lengths[:, None]
    ids = np.full((rows, batch.width), pad_token_id, dtype=np.int64)
    # Boolean assignment fills row by row, so the pairs' tokens laid end to end land in place.
    ids[mask] = np.concatenate([input_ids[offsets[p] : offsets[p] + lengths[p]] for p in batch.pairs])
    return ids, mask.astype(np.int64)


class PackedReranker:
    """Scores a ragged batch of token sequences with an ONNX sequence classifier (one logit per pair)."""

    def __init__(self, session: ort.InferenceSession, *, pad_token_id: int, max_batch_tokens: int) -> None:
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.session = session
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_name = session.get_outputs()[0].name

    @classmethod
    def from_file(
        cls,
        onnx_path: str,
        *,
        pad_token_id: int,
        max_batch_tokens: int,
        intra_op_threads: int = 0,
        providers: Sequence[str | tuple[str, dict[str, object]]] = ("CPUExecutionProvider",),
    ) -> PackedReranker:
        return cls(
            create_session(onnx_path, intra_op_threads=intra_op_threads, providers=providers),
            pad_token_id=pad_token_id,
            max_batch_tokens=max_batch_tokens,
        )

    def iter_sub_batches(
        self, input_ids: np.ndarray, lengths: np.ndarray, active: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> Iterator[tuple[SubBatch, np.ndarray]]:
        """Run each sub-batch and yield it with its logits (float32, one per pair in batch.pairs).

        `active`, asked before each sub-batch with its pairs, returns which are still wanted; the
        others are dropped uncomputed (their caller cancelled or its deadline passed).
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        for batch in plan_sub_batches(lengths, self.max_batch_tokens):
            if active is not None:
                wanted = batch.pairs[active(batch.pairs)]
                if wanted.size == 0:
                    continue
                batch = SubBatch(wanted, int(lengths[wanted].max()))
            ids, mask = pad_sub_batch(input_ids, offsets, lengths, batch, self.pad_token_id)
            feeds = dict(zip(self._input_names, (ids, mask), strict=True))
            logits = self.session.run([self._output_name], feeds)[0]
            yield batch, np.asarray(logits, dtype=np.float32).reshape(batch.pairs.size, -1)[:, 0]

    def score(
        self, input_ids: np.ndarray, lengths: np.ndarray, active: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> np.ndarray:
        """Logits (float32) of every pair of a ragged batch, in the order of `lengths` (NaN: dropped)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        logits = np.full(lengths.size, np.nan, dtype=np.float32)
        for batch, batch_logits in self.iter_sub_batches(input_ids, lengths, active):
            logits[batch.pairs] = batch_logits
        return logits


def check_ragged_batch(input_ids: np.ndarray, lengths: np.ndarray, vocab_size: int) -> str | None:
    """Why this ragged batch cannot be scored, or None when it can."""
    if input_ids.ndim != 1 or lengths.ndim != 1:
        return "input_ids and sequence_lengths must each be one row"
    if lengths.size == 0:
        return "a request must hold at least one pair"
    if int(lengths.min()) < 1:
        return "every sequence length must be at least 1"
    if int(lengths.sum()) != input_ids.size:
        return f"sequence_lengths sum to {int(lengths.sum())} but input_ids holds {input_ids.size} tokens"
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        return f"token ids must lie in [0, {vocab_size})"
    return None


def create_session(
    onnx_path: str,
    *,
    intra_op_threads: int = 0,
    providers: Sequence[str | tuple[str, dict[str, object]]] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An InferenceSession with full graph optimisation; intra_op_threads=0 lets ORT use every core."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(onnx_path, sess_options=options, providers=list(providers))
