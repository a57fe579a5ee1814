"""The scoring core every API surface calls: validate, de-duplicate, tokenize, admit, score, rank.

It speaks plain Python types (RerankInput / ScoreInput in, RerankOutput / ScoreOutput out) and raises
errors.ServiceError; the gRPC servicer (service.py) and the HTTP routes (http_api/) only translate to
and from these types, so a limit, a truncation rule or an error exists once, here or below.

    surface ──▶ RerankCore.rerank / score ──▶ tokenization (thread pool) ──▶ admission ──▶ backend ──▶ ranking

Rerank and Score go through one path, `_score`: distinct pairs are tokenized once, scored by the
backend under the caller's deadline, and reduced to one logit per pair (the best window with CHUNK
truncation). A deadline is an absolute time.monotonic() value; cancellation is the caller's asyncio
task being cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rerank_server.admission import PrioritySlots, TokenAdmission
from rerank_server.errors import (
    DeadlineExceededError,
    EmptyInputError,
    InputLimitError,
    InvalidRequestError,
    LimitExceededError,
    OverloadedError,
    UntokenizableTextError,
    field_error,
    shown_number,
    too_many_documents,
)
from rerank_server.models import ServedModel, ServedModels
from rerank_server.observability import Metrics, chose_model
from rerank_server.ranking import rank, sigmoid
from rerank_server.score_cache import Lookup, ScoreCache, input_keys
from rerank_server.settings import Settings
from rerank_server.tokenization import (
    EncodeOptions,
    EncodingError,
    InvalidTextError,
    PairTokenizer,
    PairTooLongError,
    QueryTooLongError,
    StoppedError,
    TokenizedPairs,
    Truncation,
)
from rerank_server.tracing import tracer
from rerank_server.triton_backend import StaleModelError

__all__ = [
    "RERANK_FIELDS",
    "SCORE_FIELDS",
    "FieldNames",
    "Limits",
    "ModelDescription",
    "PairResult",
    "RerankCore",
    "RerankInput",
    "RerankOutput",
    "ScoreInput",
    "ScoreOptions",
    "ScoreOutput",
    "Truncation",
    "Usage",
]

log = logging.getLogger(__name__)

# Computed logits cached at once between two yields to the event loop (a few milliseconds of it).
CACHE_STORE_SLICE = 8192


@dataclass(frozen=True)
class FieldNames:
    """How one API names the request fields an error points at (each surface passes its own)."""

    query: Callable[[int], str]
    document: Callable[[int], str]
    collection: str


RERANK_FIELDS = FieldNames(lambda i: "query", lambda i: f"documents[{i}]", "documents")
SCORE_FIELDS = FieldNames(lambda i: f"pairs[{i}].text_a", lambda i: f"pairs[{i}].text_b", "pairs")


@dataclass(frozen=True)
class ScoreOptions:
    truncation: Truncation = Truncation.END
    max_length: int | None = None  # None: the model's limit
    chunk_overlap: int | None = None  # None: the server's default (--chunk-overlap-tokens)
    max_chunks: int | None = None  # CHUNK: windows scored per document, its first ones; None: all
    # Cohere's, vLLM's and gRPC's: lower is handled first, 0 (every call that does not say) first of all. Above 0 a
    # call is background work: its model inputs wait in Triton's queue behind every call at 0
    # (triton_backend.priority_level), and it may hold only part of the admission budget (TokenAdmission).
    priority: int = 0
    max_length_field: str = "max_length"  # the request field that set max_length, as its errors name it
    max_document_tokens: int | None = None  # document tokens per model input, query not counted; None: no cap

    @property
    def background(self) -> bool:
        return self.priority > 0


@dataclass(frozen=True)
class RerankInput:
    query: str
    documents: Sequence[str]
    top_n: int = 0  # 0: every document; never negative (uint32 on gRPC, at least 1 where HTTP has it)
    options: ScoreOptions = field(default_factory=ScoreOptions)
    fields: FieldNames = RERANK_FIELDS
    model: str = ""  # a served model's name; "": the default model


@dataclass(frozen=True)
class ScoreInput:
    pairs: Sequence[tuple[str, str]]
    options: ScoreOptions = field(default_factory=ScoreOptions)
    fields: FieldNames = SCORE_FIELDS
    model: str = ""  # a served model's name; "": the default model


@dataclass(frozen=True)
class PairResult:
    index: int  # position of the document (pair) in the request
    score: float  # sigmoid(logit), in [0, 1]
    logit: float
    windows: int  # model inputs the pair used (1 unless CHUNK)
    truncated: bool  # the document was cut (END)


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    truncated_documents: int
    model_inputs: int


@dataclass(frozen=True)
class RerankOutput:
    model: str
    results: list[PairResult]  # best first, at most top_n
    usage: Usage


@dataclass(frozen=True)
class ScoreOutput:
    model: str
    scores: list[PairResult]  # in request order
    usage: Usage


@dataclass(frozen=True)
class Limits:
    """What the core refuses past, and its chunking default (the settings of the same names)."""

    max_documents: int
    max_total_tokens: int
    max_query_tokens: int
    max_message_bytes: int
    default_chunk_overlap: int
    tokenize_queue_max: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_documents=settings.max_documents,
            max_total_tokens=settings.max_total_tokens,
            max_query_tokens=settings.max_query_tokens,
            max_message_bytes=settings.max_message_bytes,
            default_chunk_overlap=settings.chunk_overlap_tokens,
            tokenize_queue_max=settings.tokenize_queue_max,
        )


@dataclass(frozen=True)
class ModelDescription:
    model: str
    max_length: int
    precision: str
    triton_model_name: str
    triton_model_version: str
    tokenizer: str
    limits: Limits


@dataclass(frozen=True)
class _Scored:
    """Scores of a request's pairs, in request order (duplicates answered from their first copy)."""

    logits: np.ndarray
    scores: np.ndarray
    windows: np.ndarray
    truncated: np.ndarray
    usage: Usage

    def result(self, index: int) -> PairResult:
        return PairResult(
            index=index,
            score=float(self.scores[index]),
            logit=float(self.logits[index]),
            windows=int(self.windows[index]),
            truncated=bool(self.truncated[index]),
        )


def build_core(settings: Settings, models: ServedModels, metrics: Metrics) -> RerankCore:
    """The core over the served models: its limits, tokenizer threads, admission budget and score cache
    from the settings."""
    return RerankCore(
        Limits.from_settings(settings),
        models,
        ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize"),
        PrioritySlots(settings.tokenizer_threads),
        metrics,
        TokenAdmission(settings.max_inflight_tokens, metrics, settings.background_inflight_share),
        ScoreCache(settings.score_cache_bytes, metrics),
    )


class RerankCore:
    """One core over every served model: one tokenizer pool, one admission budget, one score cache."""

    def __init__(
        self,
        limits: Limits,
        models: ServedModels,
        tokenize_executor: ThreadPoolExecutor,
        tokenize_slots: PrioritySlots,
        metrics: Metrics,
        admission: TokenAdmission,
        cache: ScoreCache,
    ) -> None:
        self.limits = limits
        self.models = models
        self.tokenize_executor = tokenize_executor
        # One slot per tokenizer thread: calls wait here, in priority order, rather than in the pool's FIFO.
        self.tokenize_slots = tokenize_slots
        self.metrics = metrics
        self.admission = admission
        self.cache = cache
        self._tokenizing = 0  # calls tokenizing or queued for a tokenizer thread (tokenize_queue_max)
        # Makes the served models follow Triton now (app.py: the model watcher's look), when Triton refused a call
        # as made for an export it no longer serves (StaleModelError); None: such a call fails (UNAVAILABLE).
        self.on_stale_model: Callable[[ServedModel], Awaitable[None]] | None = None
        self._readiness: asyncio.Future[bool] | None = None  # the readiness look under way (is_ready)

    def describe(self, model: str = "") -> ModelDescription:
        """The served model `model` names ("": the default one) and the request limits."""
        served = self._chosen(model)
        return ModelDescription(
            model=served.info.source_model,
            max_length=served.tokenizer.max_length,
            precision=served.info.precision,
            triton_model_name=served.name,
            triton_model_version=served.info.version,
            tokenizer=served.tokenizer.describe(),
            limits=self.limits,
        )

    def _chosen(self, name: str) -> ServedModel:
        """The served model a request names; the call is counted under its name (observability.chose_model)."""
        served = self.models.get(name)
        chose_model(served.name)
        return served

    async def is_ready(self) -> bool:
        """Every served model can answer now. Calls made while a look is under way share it: the HTTP health
        routes need no token, and each look asks Triton once per served model."""
        if self._readiness is None:
            self._readiness = asyncio.ensure_future(self._look_ready())
            self._readiness.add_done_callback(self._looked)
        # Shielded: a probe that gives up does not cancel the look the others wait for.
        return await asyncio.shield(self._readiness)

    async def _look_ready(self) -> bool:
        served = [self.models.get(name) for name in self.models.names()]
        return bool(served) and all(await asyncio.gather(*(model.backend.is_ready() for model in served)))

    def _looked(self, look: asyncio.Future[bool]) -> None:
        self._readiness = None
        if not look.cancelled():
            look.exception()  # retrieved, so that a look whose waiters all left logs no "never retrieved"

    def close(self) -> None:
        """Stop the tokenizer threads; work still queued is dropped."""
        self.tokenize_executor.shutdown(wait=False, cancel_futures=True)

    async def rerank(self, request: RerankInput, deadline: float | None = None) -> RerankOutput:
        """Score every document against the query; results best first (equal scores by index), top_n of them."""
        served = self._chosen(request.model)
        if not request.query.strip():
            raise field_error(InvalidRequestError, request.fields.query(0), "must not be empty")
        if not request.documents:
            raise field_error(EmptyInputError, request.fields.collection, "must hold at least one document")
        documents = request.documents
        self._check_count(len(documents), request.fields)
        queries = [request.query] * len(documents)
        served, scored = await self._score_current(
            served,
            lambda model: self._score(model, queries, documents, request.options, request.fields, deadline),
            deadline,
        )
        results = [scored.result(int(i)) for i in rank(scored.scores, request.top_n)]
        return RerankOutput(model=served.info.source_model, results=results, usage=scored.usage)

    async def score(self, request: ScoreInput, deadline: float | None = None) -> ScoreOutput:
        """Score each (text_a, text_b) pair, in request order."""
        served = self._chosen(request.model)
        if not request.pairs:
            raise field_error(EmptyInputError, request.fields.collection, "must hold at least one pair")
        self._check_count(len(request.pairs), request.fields)
        queries, documents = [a for a, _ in request.pairs], [b for _, b in request.pairs]
        served, scored = await self._score_current(
            served,
            lambda model: self._score(model, queries, documents, request.options, request.fields, deadline),
            deadline,
        )
        scores = [scored.result(i) for i in range(len(request.pairs))]
        return ScoreOutput(model=served.info.source_model, scores=scores, usage=scored.usage)

    # -- one path for every request ----------------------------------------------------------

    def _check_count(self, count: int, fields: FieldNames) -> None:
        if count > self.limits.max_documents:
            raise too_many_documents(fields.collection, self.limits.max_documents, count)

    def _encode_options(self, served: ServedModel, options: ScoreOptions) -> EncodeOptions:
        """The tokenizer's options for the call. A max_length past the model's, or too small for any text, is refused
        here, named by the field that set it (max_length, truncate_prompt_tokens) in the same words for every API, the
        caller's number cut (an HTTP field may hold 4,300 digits)."""
        if options.max_length is not None:
            # The least that leaves a token each of query and document beside the special tokens.
            least = served.tokenizer.template.special_tokens + 2
            if options.max_length > served.tokenizer.max_length:
                described = f"exceeds the model's {served.tokenizer.max_length}, the most tokens it takes per input"
            elif options.max_length < least:
                described = f"leaves no room for text: at least {least} (the special tokens and a token of each text)"
            else:
                described = ""
            if described:
                raise field_error(
                    InvalidRequestError, options.max_length_field, f"{shown_number(options.max_length)} {described}"
                )
        return EncodeOptions(
            max_length=options.max_length or served.tokenizer.max_length,
            max_query_tokens=self.limits.max_query_tokens,
            max_total_tokens=self.limits.max_total_tokens,
            truncation=options.truncation,
            chunk_overlap=options.chunk_overlap,
            default_chunk_overlap=self.limits.default_chunk_overlap,
            max_windows=options.max_chunks,
            max_document_tokens=options.max_document_tokens,
        )

    async def _score_current(
        self, served: ServedModel, score: Callable[[ServedModel], Awaitable[_Scored]], deadline: float | None
    ) -> tuple[ServedModel, _Scored]:
        """`score` (the call's `_score`) on the served model, and the model that scored. Where Triton refuses the
        call as made for an export it no longer serves (the model was exported again and reloaded, and the watcher
        has not looked yet), the served models follow Triton at once and the whole call is scored once more on the
        model served now: its tokenizer, its cache key. Nothing of the refused attempt is answered or cached."""
        try:
            return served, await score(served)
        except StaleModelError:
            if self.on_stale_model is None:
                raise
            log.info("model %s was reloaded in Triton; following it before scoring the call again", served.name)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                # Shielded: a caller that gives up does not cut the look short for the others.
                await asyncio.wait_for(asyncio.shield(self.on_stale_model(served)), timeout)
            except TimeoutError:
                raise DeadlineExceededError("the deadline passed while the reloaded model was read") from None
            current = self.models.get(served.name)  # NOT_FOUND if it was unloaded meanwhile
            if current is served:  # Triton's new export could not be served (yet): UNAVAILABLE
                raise
        return current, await score(current)

    async def _score(
        self,
        served: ServedModel,
        queries: Sequence[str],
        documents: Sequence[str],
        options: ScoreOptions,
        fields: FieldNames,
        deadline: float | None,
    ) -> _Scored:
        """Score (queries[i], documents[i]) with the served model under the options' truncation, max_length
        and chunk_overlap; model inputs the score cache holds are not computed again."""
        encode_options = self._encode_options(served, options)
        # Identical pairs are tokenized and scored once; `slot` maps each pair to its first copy.
        distinct: dict[tuple[str, str], int] = {}
        slot = np.array([distinct.setdefault(pair, len(distinct)) for pair in zip(queries, documents, strict=True)])
        first = np.unique(slot, return_index=True)[1]
        unique_queries = [queries[i] for i in first]
        unique_documents = [documents[i] for i in first]

        # The cache's keys are digested on the tokenizer thread, off the event loop (score_cache.input_keys).
        cache_slot = self.cache.slot(served.cache_key)
        pairs, keys = await self._tokenize(
            served.tokenizer,
            unique_queries,
            unique_documents,
            encode_options,
            fields,
            first,
            deadline,
            options,
            cache_slot,
        )
        self.metrics.pairs.labels(model=served.name).observe(pairs.lengths.size)
        cached = self.cache.lookup(served.cache_key, pairs, keys)
        model_logits = cached.logits
        if cached.missing.size:
            todo = pairs
            if cached.missing.size < pairs.lengths.size:  # gathered off the event loop: a Python step per input
                todo = await asyncio.to_thread(pairs.select, cached.missing)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError("the deadline passed before scoring began")
            # Only what the model computes takes a share of the budget: answers from the cache cost it nothing.
            with self.admission.admit(todo.total_tokens, background=options.background):
                started = time.perf_counter()
                computed = await served.backend.score(todo, timeout_s=remaining, priority=options.priority)
                self.metrics.triton.labels(model=served.name).observe(time.perf_counter() - started)
            self.metrics.tokens.labels(model=served.name).inc(todo.total_tokens)
            model_logits[cached.missing] = computed
            await self._store(cached, computed)
        logits = pairs.best_per_pair(model_logits)
        truncated = pairs.truncated[slot]
        return _Scored(
            logits=logits[slot],
            scores=sigmoid(logits)[slot],
            windows=pairs.windows[slot],
            truncated=truncated,
            usage=Usage(
                input_tokens=pairs.total_tokens,
                truncated_documents=int(truncated.sum()),
                model_inputs=int(pairs.lengths.size),
            ),
        )

    async def _store(self, cached: Lookup, computed: np.ndarray) -> None:
        """Cache the computed logits a slice of inputs at a time, yielding to the event loop between slices: a call
        of 100,000 inputs (5-token CHUNK windows) would hold the loop for 0.1 s at once."""
        for start in range(0, cached.missing.size, CACHE_STORE_SLICE):
            if start:
                await asyncio.sleep(0)
            part = slice(start, start + CACHE_STORE_SLICE)
            self.cache.store(dataclasses.replace(cached, missing=cached.missing[part]), computed[part])

    async def _tokenize(
        self,
        tokenizer: PairTokenizer,
        queries: list[str],
        documents: list[str],
        options: EncodeOptions,
        fields: FieldNames,
        original_index: np.ndarray,
        deadline: float | None,
        score_options: ScoreOptions,
        cache_slot: bytes | None = None,
    ) -> tuple[TokenizedPairs, list[bytes] | None]:
        """Tokenize on the thread pool, background calls after calls at priority 0 that wait with them, and
        digest the inputs' score-cache keys there under `cache_slot` (None: the cache is off); the
        work stops (within one segment, milliseconds) when the deadline passes or the calling task is
        cancelled, wherever it is: queued or tokenizing."""
        if self._tokenizing >= self.limits.tokenize_queue_max:
            self.metrics.rejected.labels(reason="tokenize_queue").inc()
            raise OverloadedError(
                f"{self._tokenizing} calls are already tokenizing or waiting to (tokenize_queue_max); retry later"
            )
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        stop = threading.Event()

        def encode() -> tuple[TokenizedPairs, list[bytes] | None]:
            if stop.is_set():  # given up while it waited for a thread
                raise StoppedError
            started = time.perf_counter()
            self.metrics.queue_wait.observe(started - submitted)
            try:
                pairs = tokenizer.encode(queries, documents, options, stop.is_set)
            finally:
                self.metrics.tokenize.observe(time.perf_counter() - started)
            return pairs, None if cache_slot is None else input_keys(cache_slot, pairs)

        self._tokenizing += 1
        try:
            with tracer.start_as_current_span("tokenize", attributes={"pairs": len(documents)}):

                async def when_free() -> tuple[TokenizedPairs, list[bytes] | None]:
                    async with self.tokenize_slots.hold(score_options.background):
                        return await loop.run_in_executor(self.tokenize_executor, encode)

                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                return await asyncio.wait_for(when_free(), timeout)
        except TimeoutError:
            raise DeadlineExceededError("the deadline passed during tokenization") from None
        except EncodingError as error:
            raise _field_error(error, fields, original_index, score_options) from None
        finally:
            stop.set()  # a cancelled or timed-out call's thread stops at its next check
            self._tokenizing -= 1


def _field_error(
    error: EncodingError, fields: FieldNames, original_index: np.ndarray, options: ScoreOptions
) -> Exception:
    """The EncodingError of a de-duplicated pair, named by the request's own field and index (and max_length by
    the field that set it)."""
    index = None if error.index is None else int(original_index[error.index])
    if error.part == "total":
        return field_error(LimitExceededError, fields.collection, error.description)
    if error.part == "query":
        name = fields.query(index or 0)
    elif error.part == "document":
        name = fields.document(index or 0)
    else:
        name = error.part
    description = error.description
    # The field's name says what the tokenizer's words open with ("the query", "document 3", "max_length 2"): the
    # refusal names it once.
    for subject in ("the query ", f"document {error.index} ", f"{error.part} "):
        if description.startswith(subject):
            description = description[len(subject) :]
            break
    if options.max_length is not None:
        name = options.max_length_field if name == "max_length" else name
        description = description.replace("max_length", options.max_length_field)
    cls: type[InvalidRequestError] = InvalidRequestError
    if isinstance(error, (QueryTooLongError, PairTooLongError)):
        cls = InputLimitError
    elif isinstance(error, InvalidTextError):
        cls = UntokenizableTextError
    return field_error(cls, name, description)
