"""Length-sorted, token-budgeted execution of a cross-encoder over ragged (query, document) pairs.

This file runs inside Triton's Python backend (`rerank export` copies it with the model package) and in
the benchmarks in-process, so it depends on numpy alone; the runtime that computes a sub-batch is
behind one of two interfaces, imported only by the model that uses it:
- `Runner`, padded rows: ONNX Runtime (`OnnxRunner`, here) or transformers (`torch_runner.TorchRunner`);
- `PackedRunner`, pairs end to end with their offsets, no padding at all: `torch_runner.PackedTorchRunner`
  over modernbert_packed.PackedModernBert. Its sub-batches are cut by real tokens under the same
  budget, so their padded tokens (in the metrics) are their real tokens.

A ragged batch is every pair's token ids laid end to end (`input_ids`) plus each pair's length
(`lengths`). Pairs are ordered by length and cut into sub-batches whose padded size
(pairs x longest pair) stays within `max_batch_tokens`: short pairs are never padded to long ones,
and a batch full of 8192-token documents cannot exhaust memory. A pair longer than the budget
runs alone. On CPUs a sub-batch also ends where padding the next pair's length onto it would waste
more than `padding_slack` of its real tokens: there a padding token costs as much as a real one,
while another model run costs nothing measurable (GPUs keep the token budget alone).

`RoutedReranker` puts two engines behind the same interface: on CPU models served by an engine with dense
attention, pairs longer than `long_pair_tokens` run on the packed engine (no T x T attention).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

Providers = Sequence[str | tuple[str, dict[str, object]]]


@dataclass(frozen=True)
class SubBatch:
    """Positions (into the ragged batch) of pairs that run together, and their padded width."""

    pairs: np.ndarray  # int64 indices into `lengths`, ascending by length
    width: int  # length of the longest pair: every row is padded to it
    packed_tokens: int | None = None  # packed runs: the real tokens laid end to end (no padding)

    @property
    def padded_tokens(self) -> int:
        """Tokens as computed: rows x width, or the real tokens of a packed run."""
        return self.packed_tokens if self.packed_tokens is not None else int(self.pairs.size) * self.width


# On CPUs, padding a sub-batch may add this share of its real tokens (or PADDING_ALLOWANCE tokens if
# more). ModernBERT-base on 2 CPU cores: 8 pairs of 200 tokens take 6.7 s as one run and 5.9-6.3 s as
# eight, so smaller runs cost nothing, while padding costs its tokens: on 64 rerank candidates of
# log-normal lengths, the token budget alone pads 38%, this bound 3%.
PADDING_SLACK = 0.05
PADDING_ALLOWANCE = 64
# GPUs: per-run launch costs favour large batches; the token budget alone bounds them.
GPU_PADDING_SLACK = float("inf")
# The packed engine on CPUs runs at most this many tokens at once, whatever the token budget. From
# `python -m bench.run_size` (ModernBERT-base, bf16, 2 AMD EPYC Zen 5 class cores, two rounds; the figures in
# docs/performance.md): runs of 8,192 were the slowest on the mixed-length rerank (6.06-7.07 pairs/s, 2,048:
# 7.35-7.60) and on 16 clients' merged pairs (5.95-6.80, 2,048: 7.27-7.75); 1,024 and 4,096 fell within
# 2,048's spread, and 16 x 256-token pairs showed no order.
PACKED_CPU_RUN_TOKENS = 2048


def plan_sub_batches(
    lengths: np.ndarray,
    max_batch_tokens: int,
    padding_slack: float = PADDING_SLACK,
    padding_allowance: int = PADDING_ALLOWANCE,
) -> list[SubBatch]:
    """Cut length-sorted pairs into groups within max_batch_tokens (padded) and the padding bound."""
    order = np.argsort(lengths, kind="stable")
    ordered = np.asarray(lengths)[order]
    batches: list[SubBatch] = []
    start, real = 0, 0
    for end in range(order.size):
        # Ascending order: the pair considered is the longest of the group it would join.
        width = int(ordered[end])
        joined = end - start + 1
        if joined > 1:
            padded, joined_real = joined * width, real + width
            if padded > max_batch_tokens or padded - joined_real > max(padding_slack * joined_real, padding_allowance):
                batches.append(SubBatch(order[start:end], int(ordered[end - 1])))
                start, real = end, 0
        real += width
    if order.size:
        batches.append(SubBatch(order[start:], int(ordered[-1])))
    return batches


def plan_packed_sub_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[SubBatch]:
    """Cut length-sorted pairs into runs of at most max_batch_tokens real tokens (a longer pair runs alone).

    Length order: equal lengths land in one run, where a packed engine can batch their attention. One
    binary search per run, not a step per pair: the frontend plans a call of 90,000 pairs on its event loop."""
    order = np.argsort(lengths, kind="stable")
    ordered = np.asarray(lengths, dtype=np.int64)[order]
    before = np.concatenate(([0], np.cumsum(ordered)))  # tokens of the pairs before each
    batches: list[SubBatch] = []
    start = 0
    while start < order.size:
        # The most pairs from `start` within the budget, and at least one.
        end = max(start + 1, int(np.searchsorted(before, before[start] + max_batch_tokens, side="right")) - 1)
        batches.append(SubBatch(order[start:end], int(ordered[end - 1]), int(before[end] - before[start])))
        start = end
    return batches


def pair_offsets(lengths: np.ndarray) -> np.ndarray:
    """Where each pair of a ragged batch starts in its ids laid end to end (int64)."""
    return np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)[:-1])).astype(np.int64)


def gather_pairs(input_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The ids of `pairs` (indices into lengths), laid end to end in that order, in input_ids' dtype."""
    counts = np.asarray(lengths, dtype=np.int64)[pairs]
    # Each output position's index in input_ids: its pair's start, plus how far into the pair it is.
    shift = np.asarray(offsets, dtype=np.int64)[pairs] - np.concatenate(([0], np.cumsum(counts)[:-1]))
    return input_ids[np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(shift, counts)]


def pack_sub_batch(
    input_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, batch: SubBatch
) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids of the batch's pairs end to end [tokens], and int32 cumulative offsets [pairs + 1]."""
    ids = gather_pairs(input_ids, offsets, lengths, batch.pairs).astype(np.int64)
    cu_seqlens = np.concatenate(([0], np.cumsum(lengths[batch.pairs]))).astype(np.int32)
    return ids, cu_seqlens


def pad_sub_batch(
    input_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, batch: SubBatch, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 (input_ids, attention_mask) of shape [pairs, width] for one sub-batch."""
    rows = batch.pairs.size
    row_lengths = lengths[batch.pairs]
    mask = np.arange(batch.width)[None, :] < row_lengths[:, None]
    ids = np.full((rows, batch.width), pad_token_id, dtype=np.int64)
    # Boolean assignment fills row by row, so the pairs' tokens laid end to end land in place.
    ids[mask] = gather_pairs(input_ids, offsets, lengths, batch.pairs)
    return ids, mask.astype(np.int64)


class Runner(Protocol):
    """Computes one padded sub-batch: int64 [rows, width] input_ids and attention_mask in, float32
    [rows] logits out (the first output column: the single-logit head)."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class PackedRunner(Protocol):
    """Computes one packed sub-batch: int64 [tokens] input_ids (pairs end to end) and int32 [pairs + 1]
    cu_seqlens (each pair's start, then the total) in, float32 [pairs] logits out."""

    def run_packed(self, input_ids: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray: ...


# After a model run with a pair at least this long, a CPU engine hands the memory the run freed back to the
# system: such a run's activations (and a dense graph's T x T attention scores) are far above what the
# batches under the token budget reuse. The packed engine's release_memory applies it to a run's tokens.
RELEASE_AFTER_TOKENS = 4096


class OnnxRunner:
    """A Runner over an ONNX Runtime session of the exported graph.

    ONNX Runtime keeps what a run allocated in its CPU arena for the next run. After a pair of at least
    RELEASE_AFTER_TOKENS, the run shrinks the arena back (the run option
    memory.enable_memory_arena_shrinkage): one 8,192-token pair through the dense graph of ModernBERT-base
    otherwise leaves the Triton side holding about 16 GiB until it restarts. Shorter runs keep the arena,
    whose reuse saves re-faulting their memory on every run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        import onnxruntime as ort  # the ONNX runtime only: a torch model needs no onnxruntime

        self.session = session
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_name = session.get_outputs()[0].name
        self._release: ort.RunOptions | None = None
        if session.get_providers()[0] == "CPUExecutionProvider":
            self._release = ort.RunOptions()
            self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self._input_names, (input_ids, attention_mask), strict=True))
        release = self._release if input_ids.shape[1] >= RELEASE_AFTER_TOKENS else None
        logits = self.session.run([self._output_name], feeds, release)[0]
        return np.asarray(logits, dtype=np.float32).reshape(input_ids.shape[0], -1)[:, 0]


class PackedReranker:
    """Scores a ragged batch of token sequences with a sequence classifier (one logit per pair)."""

    def __init__(
        self,
        runner: Runner | PackedRunner,
        *,
        pad_token_id: int,
        max_batch_tokens: int,
        padding_slack: float = PADDING_SLACK,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.runner = runner
        self.packed_runner = runner if isinstance(runner, PackedRunner) else None
        self.packed = self.packed_runner is not None
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens
        self.padding_slack = padding_slack

    @classmethod
    def from_file(
        cls,
        onnx_path: str,
        *,
        pad_token_id: int,
        max_batch_tokens: int,
        intra_op_threads: int = 0,
        providers: Providers = ("CPUExecutionProvider",),
        padding_slack: float | None = None,
    ) -> PackedReranker:
        """The ONNX Runtime engine. padding_slack=None: PADDING_SLACK on CPUs, GPU_PADDING_SLACK when
        CUDA comes first."""
        if padding_slack is None:
            on_gpu = _provider_name(providers[0]) == "CUDAExecutionProvider"
            padding_slack = GPU_PADDING_SLACK if on_gpu else PADDING_SLACK
        return cls(
            OnnxRunner(create_session(onnx_path, intra_op_threads=intra_op_threads, providers=providers)),
            pad_token_id=pad_token_id,
            max_batch_tokens=max_batch_tokens,
            padding_slack=padding_slack,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        *,
        pad_token_id: int,
        max_batch_tokens: int,
        device: str = "cpu",
        precision: str = "fp32",
        intra_op_threads: int = 0,
        padding_slack: float | None = None,
        packed: bool = False,
    ) -> PackedReranker:
        """The PyTorch engine over a saved transformers checkpoint (torch_runner.py, imported here
        so that the ONNX engine never needs torch). device: "cpu" or "cuda:N". packed: the unpadded
        engine (PackedTorchRunner) instead of transformers' model on padded rows, in runs of at most
        PACKED_CPU_RUN_TOKENS on CPUs. padding_slack=None: as from_file, by device (unused when packed)."""
        from . import torch_runner

        threads = intra_op_threads if intra_op_threads > 0 else available_cores()
        runner_class = torch_runner.PackedTorchRunner if packed else torch_runner.TorchRunner
        runner = runner_class(model_dir, device=device, precision=precision, cpu_threads=threads)
        on_cpu = runner.device.type == "cpu"
        if padding_slack is None:
            padding_slack = PADDING_SLACK if on_cpu else GPU_PADDING_SLACK
        if packed and on_cpu:
            max_batch_tokens = min(max_batch_tokens, PACKED_CPU_RUN_TOKENS)
        return cls(
            runner,
            pad_token_id=pad_token_id,
            max_batch_tokens=max_batch_tokens,
            padding_slack=padding_slack,
        )

    def plan(self, lengths: np.ndarray) -> list[SubBatch]:
        """The sub-batches a ragged batch of these pair lengths runs as."""
        if self.packed:
            return plan_packed_sub_batches(np.asarray(lengths, dtype=np.int64), self.max_batch_tokens)
        return plan_sub_batches(np.asarray(lengths, dtype=np.int64), self.max_batch_tokens, self.padding_slack)

    def iter_sub_batches(
        self, input_ids: np.ndarray, lengths: np.ndarray, active: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> Iterator[tuple[SubBatch, np.ndarray]]:
        """Run each sub-batch and yield it with its logits (float32, one per pair in batch.pairs).

        `active`, asked before each sub-batch with its pairs, returns which are still wanted; the
        others are dropped uncomputed (their caller cancelled or its deadline passed).
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = pair_offsets(lengths)
        for batch in self.plan(lengths):
            if active is not None:
                wanted = batch.pairs[active(batch.pairs)]
                if wanted.size == 0:
                    continue
                real = int(lengths[wanted].sum()) if self.packed else None
                batch = SubBatch(wanted, int(lengths[wanted].max()), real)
            if self.packed_runner is not None:
                ids, cu_seqlens = pack_sub_batch(input_ids, offsets, lengths, batch)
                yield batch, self.packed_runner.run_packed(ids, cu_seqlens)
            else:
                ids, mask = pad_sub_batch(input_ids, offsets, lengths, batch, self.pad_token_id)
                yield batch, cast(Runner, self.runner)(ids, mask)

    def score(
        self, input_ids: np.ndarray, lengths: np.ndarray, active: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> np.ndarray:
        """Logits (float32) of every pair of a ragged batch, in the order of `lengths` (NaN: dropped)."""
        return _collect(self.iter_sub_batches(input_ids, lengths, active), len(lengths))


def _collect(sub_batches: Iterator[tuple[SubBatch, np.ndarray]], pairs: int) -> np.ndarray:
    logits = np.full(pairs, np.nan, dtype=np.float32)
    for batch, batch_logits in sub_batches:
        logits[batch.pairs] = batch_logits
    return logits


class RoutedReranker:
    """Pairs longer than `long_pair_tokens` on `long` (the packed engine), the others on `short`.

    For CPU models served by a dense runtime (ONNX Runtime, transformers' padded model): they compute dense
    T x T attention in every layer (an 8,192-token pair on ModernBERT-base, ONNX Runtime fp32: 52 s and
    17 GiB held), the packed engine O(T * window) in local
    layers and no T x T buffer anywhere. Each engine plans its own sub-batches under its token budget;
    `active` is asked before each of them, and sub-batches come back with indices into the whole batch.
    `on_long(pairs)`, when set, is called after each long sub-batch has run (a model metric).
    """

    def __init__(self, short: PackedReranker, long: PackedReranker, long_pair_tokens: int) -> None:
        if long_pair_tokens < 1:
            raise ValueError("long_pair_tokens must be positive")
        self.short = short
        self.long = long
        self.long_pair_tokens = long_pair_tokens
        self.on_long: Callable[[int], None] | None = None

    def iter_sub_batches(
        self, input_ids: np.ndarray, lengths: np.ndarray, active: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> Iterator[tuple[SubBatch, np.ndarray]]:
        """As PackedReranker.iter_sub_batches: the short pairs' sub-batches first, then the long ones'."""
        lengths = np.asarray(lengths, dtype=np.int64)
        is_long = lengths > self.long_pair_tokens
        offsets = pair_offsets(lengths)
        for engine, chosen in ((self.short, ~is_long), (self.long, is_long)):
            pairs = np.flatnonzero(chosen)
            if pairs.size == 0:
                continue
            ids = input_ids if pairs.size == lengths.size else gather_pairs(input_ids, offsets, lengths, pairs)
            local_active = None if active is None else _through(active, pairs)
            for batch, logits in engine.iter_sub_batches(ids, lengths[pairs], local_active):
                whole = SubBatch(pairs[batch.pairs], batch.width, batch.packed_tokens)
                if engine is self.long and self.on_long is not None:
                    self.on_long(int(whole.pairs.size))
                yield whole, logits

    def score(
        self, input_ids: np.ndarray, lengths: np.ndarray, active: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> np.ndarray:
        """Logits (float32) of every pair of a ragged batch, in the order of `lengths` (NaN: dropped)."""
        return _collect(self.iter_sub_batches(input_ids, lengths, active), len(lengths))


def _through(active: Callable[[np.ndarray], np.ndarray], pairs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """`active` for an engine that sees only `pairs` of the batch (its indices are positions in `pairs`)."""
    return lambda local: active(pairs[local])


def check_ragged_batch(input_ids: np.ndarray, lengths: np.ndarray, vocab_size: int) -> str | None:
    """Why this ragged batch cannot be scored, or None when it can."""
    if input_ids.ndim != 1 or lengths.ndim != 1:
        return "input_ids and sequence_lengths must each be one row"
    if lengths.size == 0:
        return "a request must hold at least one pair"
    if int(lengths.min()) < 1:
        return "every sequence length must be at least 1"
    if int(lengths.sum()) != input_ids.size:
        return (
            f"sequence_lengths ({lengths.size} pairs) sum to {int(lengths.sum())} "
            f"but input_ids holds {input_ids.size} tokens"
        )
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        return f"token ids must lie in [0, {vocab_size})"
    return None


def available_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def session_options(intra_op_threads: int = 0, *, spinning: bool = False) -> ort.SessionOptions:
    """ONNX Runtime settings for the reranker on a CPU it shares with the tokenizing frontend.

    - intra_op_threads=0: one thread per available core (affinity and cgroup quota, not the host's
      core count, which over-subscribes a container); the thread calling run() is one of them.
    - no spinning: idle pool threads sleep instead of busy-waiting, so the frontend's tokenizer and
      gRPC threads get the cores between and after runs. Spinning made no measurable difference to
      this model (80% of its time is in MatMuls; docs/performance.md), so the cores go to the frontend.
    - ORT_ENABLE_ALL: constant folding, Gelu and MatMul-scale fusions. The transformers optimizer
      (onnxruntime.transformers.optimizer, model_type bert) adds only SkipLayerNormalization fusions
      on ModernBERT (its rotary attention is not recognised), agrees within 1e-5 but was not
      measurably faster, so it is not used.
    """
    import onnxruntime as ort  # the ONNX runtime only: a torch model needs no onnxruntime

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads if intra_op_threads > 0 else available_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def create_session(
    onnx_path: str,
    *,
    intra_op_threads: int = 0,
    providers: Providers = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An InferenceSession with session_options(); intra_op_threads=0: one thread per available core.

    Raises RuntimeError when the first provider asked for is not the one running: ONNX Runtime falls
    back to the next (the CPU) silently, and a GPU model running on the CPU is a fault, not a mode.
    """
    import onnxruntime as ort  # the ONNX runtime only: a torch model needs no onnxruntime

    options = session_options(intra_op_threads)
    session = ort.InferenceSession(onnx_path, sess_options=options, providers=list(providers))
    wanted, active = _provider_name(providers[0]), session.get_providers()
    if active[0] != wanted:
        raise RuntimeError(f"ONNX Runtime could not start {wanted} (CUDA needs onnxruntime-gpu); it runs {active}")
    return session


def _provider_name(provider: str | tuple[str, dict[str, object]]) -> str:
    return provider if isinstance(provider, str) else provider[0]
