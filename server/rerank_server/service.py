"""The gRPC surface of the core: rerank.v1.RerankService translated to and from core.RerankCore.

Each RPC turns its protobuf request into the core's plain types, awaits the core under the call's
deadline, and turns the result (or a ServiceError, as a status with google.rpc.BadRequest details)
back into protobuf. Nothing here validates, tokenizes or scores: that is the core's, shared with the
HTTP surfaces.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, NoReturn, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from rerank_client.pb import rerank_pb2, rerank_pb2_grpc
from rerank_server import calls
from rerank_server.core import (
    RerankCore,
    RerankInput,
    ScoreInput,
    ScoreOptions,
    Truncation,
    Usage,
)
from rerank_server.errors import InvalidRequestError, ServiceError, field_error, shown
from rerank_server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRUNCATION = {
    rerank_pb2.TRUNCATION_UNSPECIFIED: Truncation.END,
    rerank_pb2.TRUNCATION_END: Truncation.END,
    rerank_pb2.TRUNCATION_NONE: Truncation.NONE,
    rerank_pb2.TRUNCATION_CHUNK: Truncation.CHUNK,
    rerank_pb2.TRUNCATION_START: Truncation.START,
}


def grpc_code(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a core error (ErrorCode names are gRPC status names)."""
    return grpc.StatusCode[error.code.name]


def status_of(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status of an error, with a BadRequest when fields are at fault."""
    status = status_pb2.Status(code=grpc_code(error).value[0], message=error.message)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in error.violations
            ]
        )
        status.details.add().Pack(bad_request)
    return status


def stream_error(error: ServiceError) -> rerank_pb2.StreamError:
    return rerank_pb2.StreamError(
        code=grpc_code(error).value[0],
        message=error.message,
        field_violations=[rerank_pb2.FieldViolation(field=f, description=d) for f, d in error.violations],
    )


def _options(request: rerank_pb2.RerankRequest | rerank_pb2.ScoreRequest) -> ScoreOptions:
    if request.truncation not in _TRUNCATION:
        allowed = ", ".join(f"{rerank_pb2.Truncation.Name(v)} ({v})" for v in _TRUNCATION)
        raise field_error(InvalidRequestError, "truncation", f"{request.truncation} is not one of {allowed}")
    return ScoreOptions(
        truncation=_TRUNCATION[request.truncation],
        max_length=request.max_length or None,
        chunk_overlap=request.chunk_overlap if request.HasField("chunk_overlap") else None,
        priority=request.priority,
    )


def _usage(usage: Usage) -> rerank_pb2.Usage:
    return rerank_pb2.Usage(
        input_tokens=usage.input_tokens,
        truncated_documents=usage.truncated_documents,
        model_inputs=usage.model_inputs,
    )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RerankService(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, core: RerankCore, settings: Settings) -> None:
        self.core = core
        self.settings = settings

    # -- RPCs --------------------------------------------------------------------------------

    async def Rerank(  # noqa: N802 - the generated servicer's method name
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        return await _unary("Rerank", self._rerank(request, _deadline(context)), context)

    async def Score(  # noqa: N802
        self, request: rerank_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.ScoreResponse:
        return await _unary("Score", self._score(request, _deadline(context)), context)

    async def RerankStream(  # noqa: N802
        self, request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        """Answer messages concurrently, as they complete; at most stream_max_in_flight unanswered."""
        answers: asyncio.Queue[rerank_pb2.RerankStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.stream_max_in_flight)
        deadline = _deadline(context)

        async def answer(message: rerank_pb2.RerankStreamRequest) -> None:
            try:
                response = rerank_pb2.RerankStreamResponse(
                    id=message.id, response=await self._rerank(message.request, deadline)
                )
            except ServiceError as error:
                response = rerank_pb2.RerankStreamResponse(id=message.id, error=stream_error(error))
            except Exception:
                log.exception("RerankStream message %s failed", shown(message.id))
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
        return await _unary("GetModelInfo", self._model_info(request.model), context)

    async def ListModels(  # noqa: N802
        self, request: rerank_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.ListModelsResponse:
        return await _unary("ListModels", self._list_models(), context)

    # -- translation -------------------------------------------------------------------------

    async def _list_models(self) -> rerank_pb2.ListModelsResponse:
        return rerank_pb2.ListModelsResponse(
            models=[await self._model_info(name) for name in self.core.models.names()],
            default_model=self.core.models.default,
        )

    async def _model_info(self, model: str) -> rerank_pb2.GetModelInfoResponse:
        info = self.core.describe(model)
        return rerank_pb2.GetModelInfoResponse(
            model=info.model,
            max_length=info.max_length,
            precision=info.precision,
            triton_model_name=info.triton_model_name,
            triton_model_version=info.triton_model_version,
            tokenizer=info.tokenizer,
            limits=rerank_pb2.Limits(
                max_documents=info.limits.max_documents,
                max_total_tokens=info.limits.max_total_tokens,
                max_query_tokens=info.limits.max_query_tokens,
                max_message_bytes=info.limits.max_message_bytes,
                default_chunk_overlap=info.limits.default_chunk_overlap,
            ),
        )

    async def _rerank(self, request: rerank_pb2.RerankRequest, deadline: float | None) -> rerank_pb2.RerankResponse:
        ranked = await self.core.rerank(
            RerankInput(
                query=request.query,
                documents=request.documents,
                top_n=request.top_n,
                options=_options(request),
                model=request.model,
            ),
            deadline,
        )
        response = rerank_pb2.RerankResponse(model=ranked.model, usage=_usage(ranked.usage))
        for result in ranked.results:
            added = response.results.add(
                index=result.index,
                score=result.score,
                logit=result.logit,
                windows=result.windows,
                truncated=result.truncated,
            )
            if request.return_documents:
                added.document = request.documents[result.index]
        return response

    async def _score(self, request: rerank_pb2.ScoreRequest, deadline: float | None) -> rerank_pb2.ScoreResponse:
        pairs = [(pair.text_a, pair.text_b) for pair in request.pairs]
        scored = await self.core.score(
            ScoreInput(pairs=pairs, options=_options(request), model=request.model), deadline
        )
        response = rerank_pb2.ScoreResponse(model=scored.model, usage=_usage(scored.usage))
        for result in scored.scores:
            response.scores.add(
                score=result.score, logit=result.logit, windows=result.windows, truncated=result.truncated
            )
        return response


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> NoReturn:
    """End the call with the error's status, message and BadRequest details, and the request id (a unary
    call's only metadata when it fails: interceptors._observed)."""
    details = (
        (rpc_status.GRPC_DETAILS_METADATA_KEY, status_of(error).SerializeToString()),
        (calls.REQUEST_ID_KEY, calls.request_id.get()),
    )
    await context.abort(grpc_code(error), error.message, trailing_metadata=details)
    raise AssertionError("unreachable: abort raises")


async def _unary(name: str, work: Coroutine[Any, Any, T], context: grpc.aio.ServicerContext) -> T:
    """Run a unary handler; a ServiceError ends the call with its status and BadRequest details."""
    try:
        return await work
    except ServiceError as error:
        await abort(context, error)
    except Exception:
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable: abort raises")
