"""The rerank.v1.RerankService: validate, tokenize (off the event loop), score on the backend, answer.

Rerank, Score and each RerankStream message go through one path, `_score`: distinct pairs are
tokenized once, scored by the backend under the caller's deadline, and reduced to one logit per
pair (the best window with CHUNK truncation).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from rerank_client._proto.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from rerank_server.admission import TokenAdmission
from rerank_server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    LimitExceededError,
    ServiceError,
    field_error,
)
from rerank_server.observability import Metrics
from rerank_server.ranking import rank, sigmoid
from rerank_server.settings import Settings
from rerank_server.tokenization import EncodeOptions, EncodingError, PairTokenizer, TokenizedPairs, Truncation
from rerank_server.tracing import tracer
from rerank_server.triton_backend import ModelInfo, ScoringBackend

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRUNCATION = {
    rerank_pb2.TRUNCATION_UNSPECIFIED: Truncation.END,
    rerank_pb2.TRUNCATION_END: Truncation.END,
    rerank_pb2.TRUNCATION_NONE: Truncation.NONE,
    rerank_pb2.TRUNCATION_CHUNK: Truncation.CHUNK,
}


@dataclass(frozen=True)
class FieldNames:
    """How one RPC names the request fields an EncodingError points at."""

    query: Callable[[int], str]
    document: Callable[[int], str]
    collection: str


RERANK_FIELDS = FieldNames(lambda i: "query", lambda i: f"documents[{i}]", "documents")
SCORE_FIELDS = FieldNames(lambda i: f"pairs[{i}].text_a", lambda i: f"pairs[{i}].text_b", "pairs")


@dataclass(frozen=True)
class Scored:
    """Scores of a request's pairs, in request order (duplicates answered from their first copy)."""

    logits: np.ndarray
    scores: np.ndarray
    windows: np.ndarray
    truncated: np.ndarray
    usage: rerank_pb2.Usage


class RerankService(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(
        self,
        settings: Settings,
        tokenizer: PairTokenizer,
        backend: ScoringBackend,
        model: ModelInfo,
        tokenize_executor: Executor,
        metrics: Metrics,
        admission: TokenAdmission,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.backend = backend
        self.model = model
        self.tokenize_executor = tokenize_executor
        self.metrics = metrics
        self.admission = admission

    # -- RPCs --------------------------------------------------------------------------------

    async def Rerank(  # noqa: N802 - the generated servicer's method name
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        return await _unary("Rerank", self._rerank(request, context), context)

    async def Score(  # noqa: N802
        self, request: rerank_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.ScoreResponse:
        return await _unary("Score", self._score_request(request, context), context)

    async def RerankStream(  # noqa: N802
        self, request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        """Answer messages concurrently, as they complete; at most stream_max_in_flight unanswered."""
        answers: asyncio.Queue[rerank_pb2.RerankStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.stream_max_in_flight)

        async def answer(message: rerank_pb2.RerankStreamRequest) -> None:
            try:
                response = rerank_pb2.RerankStreamResponse(
                    id=message.id, response=await self._rerank(message.request, context)
                )
            except ServiceError as error:
                response = rerank_pb2.RerankStreamResponse(id=message.id, error=error.stream_error())
            except Exception:
                log.exception("RerankStream message %r failed", message.id)
                internal = rerank_pb2.StreamError(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
                response = rerank_pb2.RerankStreamResponse(id=message.id, error=internal)
            await answers.put(response)

        async def read() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    async for message in request_iterator:
                        await slots.acquire()  # released once its answer is written
                        group.create_task(answer(message))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
                slots.release()
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()

    async def GetModelInfo(  # noqa: N802
        self, request: rerank_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.GetModelInfoResponse:
        return rerank_pb2.GetModelInfoResponse(
            model=self.model.source_model,
            max_length=self.tokenizer.max_length,
            precision=self.model.precision,
            triton_model_name=self.model.name,
            triton_model_version=self.model.version,
            tokenizer=self.tokenizer.describe(),
            limits=rerank_pb2.Limits(
                max_documents=self.settings.max_documents,
                max_total_tokens=self.settings.max_total_tokens,
                max_query_tokens=self.settings.max_query_tokens,
                max_message_bytes=self.settings.max_message_bytes,
                default_chunk_overlap=self.settings.chunk_overlap_tokens,
            ),
        )

    # -- request handling --------------------------------------------------------------------

    async def _rerank(
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        if not request.query.strip():
            raise field_error(InvalidRequestError, "query", "must not be empty")
        documents = list(request.documents)
        if not documents:
            raise field_error(InvalidRequestError, "documents", "must hold at least one document")
        scored = await self._score([request.query] * len(documents), documents, request, RERANK_FIELDS, context)
        response = rerank_pb2.RerankResponse(model=self.model.source_model, usage=scored.usage)
        for index in rank(scored.scores, request.top_n):
            result = response.results.add(
                index=int(index),
                score=float(scored.scores[index]),
                logit=float(scored.logits[index]),
                windows=int(scored.windows[index]),
                truncated=bool(scored.truncated[index]),
            )
            if request.return_documents:
                result.document = documents[index]
        return response

    async def _score_request(
        self, request: rerank_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.ScoreResponse:
        if not request.pairs:
            raise field_error(InvalidRequestError, "pairs", "must hold at least one pair")
        queries, documents = [pair.text_a for pair in request.pairs], [pair.text_b for pair in request.pairs]
        scored = await self._score(queries, documents, request, SCORE_FIELDS, context)
        response = rerank_pb2.ScoreResponse(model=self.model.source_model, usage=scored.usage)
        for i in range(len(request.pairs)):
            response.scores.add(
                score=float(scored.scores[i]),
                logit=float(scored.logits[i]),
                windows=int(scored.windows[i]),
                truncated=bool(scored.truncated[i]),
            )
        return response

    async def _score(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        request: rerank_pb2.RerankRequest | rerank_pb2.ScoreRequest,
        fields: FieldNames,
        context: grpc.aio.ServicerContext,
    ) -> Scored:
        """Score (queries[i], documents[i]) under the request's truncation, max_length and chunk_overlap."""
        if len(documents) > self.settings.max_documents:
            raise field_error(
                InvalidRequestError,
                fields.collection,
                f"{len(documents)} exceed the limit of {self.settings.max_documents} per request (max_documents)",
            )
        if request.truncation not in _TRUNCATION:
            raise field_error(InvalidRequestError, "truncation", f"unknown value {request.truncation}")
        options = EncodeOptions(
            max_length=request.max_length or self.tokenizer.max_length,
            max_query_tokens=self.settings.max_query_tokens,
            max_total_tokens=self.settings.max_total_tokens,
            truncation=_TRUNCATION[request.truncation],
            chunk_overlap=request.chunk_overlap if request.HasField("chunk_overlap") else None,
            default_chunk_overlap=self.settings.chunk_overlap_tokens,
        )
        # Identical pairs are tokenized and scored once; `slot` maps each pair to its first copy.
        distinct: dict[tuple[str, str], int] = {}
        slot = np.array([distinct.setdefault(pair, len(distinct)) for pair in zip(queries, documents, strict=True)])
        first = np.unique(slot, return_index=True)[1]
        unique_queries = [queries[i] for i in first]
        unique_documents = [documents[i] for i in first]

        pairs = await self._tokenize(unique_queries, unique_documents, options, fields, first)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("the deadline passed before scoring began")
        with self.admission.admit(pairs.total_tokens):
            started = time.perf_counter()
            model_logits = await self.backend.score(pairs, timeout_s=remaining)
            self.metrics.triton.observe(time.perf_counter() - started)
        self.metrics.pairs.observe(pairs.lengths.size)
        self.metrics.tokens.inc(pairs.total_tokens)
        logits = pairs.best_per_pair(model_logits)
        truncated = pairs.truncated[slot]
        return Scored(
            logits=logits[slot],
            scores=sigmoid(logits)[slot],
            windows=pairs.windows[slot],
            truncated=truncated,
            usage=rerank_pb2.Usage(
                input_tokens=pairs.total_tokens,
                truncated_documents=int(truncated.sum()),
                model_inputs=int(pairs.lengths.size),
            ),
        )

    async def _tokenize(
        self,
        queries: list[str],
        documents: list[str],
        options: EncodeOptions,
        fields: FieldNames,
        original_index: np.ndarray,
    ) -> TokenizedPairs:
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()

        def encode() -> TokenizedPairs:
            started = time.perf_counter()
            self.metrics.queue_wait.observe(started - submitted)
            try:
                return self.tokenizer.encode(queries, documents, options)
            finally:
                self.metrics.tokenize.observe(time.perf_counter() - started)

        try:
            with tracer.start_as_current_span("tokenize", attributes={"pairs": len(documents)}):
                return await loop.run_in_executor(self.tokenize_executor, encode)
        except EncodingError as error:
            index = None if error.index is None else int(original_index[error.index])
            if error.part == "total":
                raise field_error(LimitExceededError, fields.collection, error.description) from None
            if error.part == "query":
                field = fields.query(index or 0)
            elif error.part == "document":
                field = fields.document(index or 0)
            else:
                field = error.part
            description = error.description.replace(f"document {error.index} ", f"document {index} ", 1)
            raise field_error(InvalidRequestError, field, description) from None


async def _unary(name: str, work: Coroutine[Any, Any, T], context: grpc.aio.ServicerContext) -> T:
    """Run a unary handler; a ServiceError ends the call with its status and BadRequest details."""
    try:
        return await work
    except ServiceError as error:
        await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())
    except Exception:
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable: abort raises")
