"""The rerank.v1.RerankService: validate, tokenize (off the event loop), score on the backend, rank."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

import grpc

from rerank_client._proto.rerank.v1 import rerank_pb2, rerank_pb2_grpc
from rerank_server.errors import InvalidRequestError, ServiceError
from rerank_server.ranking import rank, sigmoid
from rerank_server.settings import Settings
from rerank_server.tokenization import PairTokenizer, QueryTooLongError, TokenizedPairs
from rerank_server.triton_backend import ModelInfo, ScoringBackend

log = logging.getLogger(__name__)


class RerankService(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(
        self,
        settings: Settings,
        tokenizer: PairTokenizer,
        backend: ScoringBackend,
        model: ModelInfo,
        tokenize_executor: Executor,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.backend = backend
        self.model = model
        self.tokenize_executor = tokenize_executor

    async def Rerank(  # noqa: N802 - the generated servicer's method name
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        try:
            return await self._rerank(request, context)
        except ServiceError as error:
            await context.abort(error.code, error.message)
            raise  # unreachable: abort raises

    async def _rerank(
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        self._validate(request)
        pairs = await self._tokenize(request)
        logits = await self.backend.score(pairs, timeout_s=context.time_remaining())
        scores = sigmoid(logits)
        response = rerank_pb2.RerankResponse(
            model=self.model.source_model,
            usage=rerank_pb2.Usage(input_tokens=pairs.total_tokens, truncated_documents=int(pairs.truncated.sum())),
        )
        for index in rank(scores, request.top_n):
            result = response.results.add(index=int(index), score=float(scores[index]), logit=float(logits[index]))
            if request.return_documents:
                result.document = request.documents[index]
        return response

    def _validate(self, request: rerank_pb2.RerankRequest) -> None:
        if not request.query.strip():
            raise InvalidRequestError("query must not be empty")
        if not request.documents:
            raise InvalidRequestError("documents must hold at least one document")
        if len(request.documents) > self.settings.max_documents:
            raise InvalidRequestError(
                f"{len(request.documents)} documents exceed the limit of {self.settings.max_documents} per request"
            )

    async def _tokenize(self, request: rerank_pb2.RerankRequest) -> TokenizedPairs:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.tokenize_executor,
                self.tokenizer.encode,
                request.query,
                list(request.documents),
                self.settings.max_query_tokens,
            )
        except QueryTooLongError as error:
            raise InvalidRequestError(str(error)) from None
