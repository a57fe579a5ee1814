"""`rerank export --precision auto` on CPUs: which runtime and precision serve this CPU best, measured on
what callers send, and above how many tokens the packed engine takes a pair over.

- **Candidates**: ONNX Runtime fp32 (the reference, always), ONNX Runtime int8 where the CPU has VNNI, the
  packed engine in bf16 where it has bf16 (cpu_features). Each is timed as it would be served: the token
  budget, the threads, and pairs over the long-pair threshold on the packed engine (in bf16 for bf16, else
  fp32).
- **Shapes**: what callers send. Short pairs (4 of 256 tokens: the benchmark's (a)), a rerank of mixed
  lengths (8 documents of (b)'s log-normal lengths), and one long pair (2,048 tokens).
- **Rounds**: every candidate scores every shape once per round, candidates taking turns so that a change
  in the machine's load falls on all alike; a candidate's figure in a round is the geometric mean over the
  shapes of its speed against the reference's in that same round. Rounds repeat (at least MIN_ROUNDS)
  until one candidate leads beyond the run-to-run spread (SEPARATION times the standard deviations of
  those figures), or until --auto-seconds of measuring have passed.
- **Choice**: the fastest candidate that ranks like fp32 (agreement.py) on 32 documents of (b)'s lengths;
  candidates tied with it within their spreads go to the packed engine (it serves long pairs itself, with
  no second engine), else to the exact reference.
- **Threshold** (where the chosen engine is not the packed one): single pairs of LADDER lengths on the
  chosen engine and on the packed engine, in turns; the threshold is the longest length at which the
  chosen engine is faster beyond the spread (a tie goes to the packed engine, which holds no T x T buffer).

The timing functions take the engines and a clock, so tests drive them with engines of known cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rerank_server.export.agreement import agreement
from rerank_triton_model.cpu_features import native_precisions
from rerank_triton_model.runtimes import FP32, ONNXRUNTIME, PACKED, Runtime

MIN_ROUNDS = 3
MAX_ROUNDS = 12
# Two candidates separate when their figures differ by more than this many times the sum of their spreads:
# over 3 to 12 rounds one standard deviation is itself an unsteady estimate, and chance must not decide.
SEPARATION = 2.0
# The timed shapes' sizes: each a fraction of a second to a few seconds on ModernBERT-base and 2 cores, large
# enough for the clock and small enough that a round of every candidate stays short on a loaded machine.
SHORT_PAIRS = 4
MIXED_DOCUMENTS = 8
LONG_SHAPE_TOKENS = 2048
# Pair lengths tried for the threshold, up to where dense attention's T x T buffers (O(length²)) make the
# packed engine the only sound choice whatever the speed.
LADDER = (256, 512, 1024, 2048)
THRESHOLD_REPEATS = 3
AGREEMENT_DOCUMENTS = 32

Clock = Callable[[], float]


class Scorer(Protocol):
    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Shape:
    name: str
    ids: np.ndarray  # the pairs' ids end to end
    lengths: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def candidates(flags: frozenset[str]) -> list[tuple[Runtime, str]]:
    """The reference first, then what this CPU computes natively."""
    native = native_precisions(flags)
    out: list[tuple[Runtime, str]] = [(ONNXRUNTIME, FP32)]
    if "int8" in native:
        out.append((ONNXRUNTIME, "int8"))
    if "bf16" in native:
        out.append((PACKED, "bf16"))
    return out


class Pairs:
    """Random ordinary token ids laid out as [CLS] query [SEP] document [SEP] (the tokenizer's vocabulary,
    not a language, is all an export has)."""

    def __init__(self, config: Any, tokenizer: Any, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        vocab = min(len(tokenizer), int(config.vocab_size))
        self.pool = np.setdiff1d(np.arange(vocab), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
        self.cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else int(self.pool[0])
        self.sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else self.cls

    def shape(self, name: str, query_tokens: int, pair_lengths: Sequence[int]) -> Shape:
        query = self.rng.choice(self.pool, query_tokens)
        rows = [
            np.concatenate(
                ([self.cls], query, [self.sep], self.rng.choice(self.pool, n - query_tokens - 3), [self.sep])
            )
            for n in pair_lengths
        ]
        return Shape(name, np.concatenate(rows).astype(np.int64), np.array([r.size for r in rows], dtype=np.int64))

    def mixed_lengths(self, count: int, query_tokens: int, max_length: int) -> list[int]:
        """(b)'s documents: log-normal lengths, median 200 tokens, within [16, 1024]; pairs within max_length."""
        out: list[int] = []
        while len(out) < count:
            n = round(float(self.rng.lognormal(np.log(200), 0.8)))
            if 16 <= n <= 1024:
                out.append(min(n + query_tokens + 3, max_length))
        return out


def query_tokens(max_length: int) -> int:
    """16 query tokens, as the benchmark's (a), where pairs are long enough."""
    return max(1, min(16, (max_length - 4) // 4))


def caller_shapes(config: Any, tokenizer: Any, max_length: int, seed: int = 0) -> tuple[list[Shape], Shape]:
    """The timed shapes (short, mixed, long), and the documents ranking agreement is judged on."""
    pairs = Pairs(config, tokenizer, seed)
    query = query_tokens(max_length)
    shapes = [
        pairs.shape("short", query, [min(256, max_length)] * SHORT_PAIRS),
        pairs.shape("mixed", query, pairs.mixed_lengths(MIXED_DOCUMENTS, query, max_length)),
        pairs.shape("long", query, [min(LONG_SHAPE_TOKENS, max_length)]),
    ]
    ranked = pairs.shape("agreement", query, pairs.mixed_lengths(AGREEMENT_DOCUMENTS, query, max_length))
    return shapes, ranked


@dataclass
class Row:
    """One candidate's figures: per round, its speed against the reference's (geometric mean over shapes)."""

    runtime: Runtime
    precision: str
    agreement: dict[str, Any]
    rounds: list[float] = field(default_factory=list)
    per_shape: dict[str, list[float]] = field(default_factory=dict)  # the reference's time over this one's

    @property
    def agrees(self) -> bool:
        return bool(self.agreement["agrees"])

    @property
    def speedup(self) -> float:
        return float(np.mean(self.rounds)) if self.rounds else 1.0

    @property
    def spread(self) -> float:
        """The rounds' standard deviation (the reference's own noise is inside every other row's ratios)."""
        return float(np.std(self.rounds, ddof=1)) if len(self.rounds) > 1 else math.inf

    def describe(self) -> str:
        fails = "" if self.agrees else ", ranks unlike fp32"
        return f"{self.precision} ({self.runtime.name}) {self.speedup:.2f}x ± {self.spread:.2f}{fails}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime.name,
            "precision": self.precision,
            "speedup": self.speedup,
            "spread": self.spread,
            "rounds": self.rounds,
            "per_shape": {name: float(np.mean(values)) for name, values in self.per_shape.items()},
            **self.agreement,
        }


@dataclass(frozen=True)
class Decision:
    chosen: Row
    tied: list[Row]  # the candidates within the spread of the fastest (the chosen among them)
    separated: bool  # one candidate leads beyond the spread


def decide(rows: list[Row]) -> Decision:
    """The fastest candidate that ranks like fp32 (rows[0], the reference, always counts), unless others tie
    with it within their spreads: then the packed engine among them, else the reference, else the fastest."""
    eligible = [rows[0], *(row for row in rows[1:] if row.agrees)]
    leader = max(eligible, key=lambda row: row.speedup)
    tied = [row for row in eligible if leader.speedup - row.speedup <= SEPARATION * (leader.spread + row.spread)]
    chosen = next((row for row in tied if row.runtime.packed), rows[0] if rows[0] in tied else leader)
    return Decision(chosen, tied, separated=len(tied) == 1)


def _timed(engine: Scorer, shape: Shape, clock: Clock) -> float:
    start = clock()
    engine.score(shape.ids, shape.lengths)
    return clock() - start


def measure(
    rows: list[Row],
    engines: Sequence[Scorer],
    shapes: list[Shape],
    *,
    budget_s: float,
    clock: Clock = time.perf_counter,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
) -> Decision:
    """Rounds of every engine on every shape (after one untimed pass: first runs allocate and compile
    kernels) until the decision separates or the budget is spent; fills each row's figures."""
    for engine in engines:
        for shape in shapes:
            engine.score(shape.ids, shape.lengths)
    started = clock()
    for index in range(max_rounds):
        order = list(range(len(engines)))
        if index % 2:
            order.reverse()
        times = [[0.0] * len(shapes) for _ in engines]
        for s, shape in enumerate(shapes):
            for e in order:
                times[e][s] = _timed(engines[e], shape, clock)
        for e, row in enumerate(rows):
            ratios = [reference / max(own, 1e-9) for reference, own in zip(times[0], times[e], strict=True)]
            row.rounds.append(float(np.exp(np.mean(np.log(ratios)))))
            for shape, ratio in zip(shapes, ratios, strict=True):
                row.per_shape.setdefault(shape.name, []).append(ratio)
        decision = decide(rows)
        if index + 1 >= min_rounds and (decision.separated or clock() - started >= budget_s):
            return decision
    return decide(rows)


def rank_check(rows: list[Row], engines: Sequence[Scorer], ranked: Shape) -> None:
    """Each row's agreement with the reference (engines[0]) on `ranked`."""
    reference = engines[0].score(ranked.ids, ranked.lengths)
    for row, engine in zip(rows, engines, strict=True):
        row.agreement = agreement(reference, engine.score(ranked.ids, ranked.lengths)).as_dict()


def reason(decision: Decision, shapes: list[Shape], rows: list[Row]) -> str:
    chosen = decision.chosen
    why = ""
    if len(decision.tied) > 1:
        others = ", ".join(f"{r.precision} ({r.runtime.name})" for r in decision.tied if r is not chosen)
        rule = "the packed engine serves long pairs itself" if chosen.runtime.packed else "fp32 is exact"
        why = f"; tied within the spread with {others}: {rule}"
    rest = "; ".join(row.describe() for row in rows[1:] if row is not chosen)
    return (
        f"auto: {chosen.describe()} ONNX Runtime fp32 on this CPU over {len(chosen.rounds)} rounds of "
        f"{', '.join(shape.name for shape in shapes)} pairs{why}" + (f"; {rest}" if rest else "")
    )


def threshold(
    short: Scorer,
    long: Scorer,
    pair: Callable[[int], Shape],
    max_length: int,
    *,
    clock: Clock = time.perf_counter,
    repeats: int = THRESHOLD_REPEATS,
) -> dict[str, Any]:
    """The longest LADDER length (under max_length) at which `short` scores one pair faster than `long`
    beyond the spread (LADDER[0] if at none); stops after two lengths in a row that `short` does not win."""
    ladder = [n for n in LADDER if n < max_length]
    measured: list[dict[str, Any]] = []
    tokens, behind = ladder[0] if ladder else 0, 0
    for n in ladder:
        shape = pair(n)
        _timed(short, shape, clock), _timed(long, shape, clock)
        runs: dict[str, list[float]] = {"short": [], "long": []}
        for index in range(repeats):
            for name, engine in (("short", short), ("long", long))[:: 1 if index % 2 == 0 else -1]:
                runs[name].append(_timed(engine, shape, clock))
        mean = {name: float(np.mean(values)) for name, values in runs.items()}
        spread = {name: float(np.std(values, ddof=1)) if repeats > 1 else 0.0 for name, values in runs.items()}
        short_wins = mean["short"] + spread["short"] < mean["long"] - spread["long"]
        long_wins = mean["long"] + spread["long"] < mean["short"] - spread["short"]
        faster = "short" if short_wins else "packed" if long_wins else "tie"
        measured.append({"tokens": n, "seconds": mean, "spread": spread, "faster": faster})
        if short_wins:
            tokens, behind = n, 0
        else:
            behind += 1
            if behind == 2:
                break
    return {"tokens": tokens, "ladder": measured}
