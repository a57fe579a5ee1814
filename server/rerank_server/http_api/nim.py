"""NVIDIA NIM's reranking API (NeMo Retriever): POST /v1/ranking, GET /v1/models, and its probes
GET /v1/health/live and /v1/health/ready (the NIM Operator's liveness and readiness probes).

Clients: langchain-nvidia-ai-endpoints' NVIDIARerank and LlamaIndex's NVIDIARerank with base_url=
(".../v1"); LlamaIndex lists /v1/models when it is constructed, LangChain when no model is named.

How the knobs map onto the core:
- `rankings` hold every passage, best first, with its `logit` (NIM's score; sigmoid(logit) is the
  probability the other APIs answer).
- `truncate`: "END" → END; "NONE" or absent (NIM's default) → NONE: a passage that does not fit is
  refused with 400, as NIM refuses input past its token limit; a body its schema refuses gets 422.
- `model`: a served model's name chooses the model (absent: the default model); another name is refused
  with 404 naming the served ones, unless one model is served: then it answers. /v1/models lists the
  served models, the default one first.
"""

from __future__ import annotations

import time
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from rerank_server import calls
from rerank_server.core import FieldNames, RerankInput, ScoreOptions, Truncation
from rerank_server.http_api.common import MODEL_FIELD, HttpApi, RequestBody, call_core, context, requested_model
from rerank_server.http_api.errors import NIM

api = HttpApi("NVIDIA NIM", NIM, object_lists=frozenset({"passages"}))

# /v1/models' `created` (OpenAI's model object requires it, and typed OpenAI clients refuse an entry without
# it): when this server started serving, in Unix seconds.
_STARTED = int(time.time())
NIM_FIELDS = FieldNames(lambda i: "query.text", lambda i: f"passages[{i}].text", "passages")
_TRUNCATION = {"NONE": Truncation.NONE, "END": Truncation.END}


class Text(BaseModel):
    text: str


class RankingRequest(RequestBody):
    query: Text
    passages: list[Text]
    model: str | None = Field(None, description=MODEL_FIELD)
    truncate: Literal["NONE", "END"] = Field("NONE", description="NONE (default): refuse passages that do not fit")


class Ranking(BaseModel):
    index: int
    logit: float


class RankingResponse(BaseModel):
    rankings: list[Ranking]
    usage: dict[str, int]


@api.post("/v1/ranking", ranks=True, response_model=RankingResponse, summary="NIM ranking")
async def ranking(body: RankingRequest, request: Request) -> JSONResponse:
    core = context(request).core
    core_input = RerankInput(
        body.query.text,
        [passage.text for passage in body.passages],
        options=ScoreOptions(truncation=_TRUNCATION[body.truncate]),
        fields=NIM_FIELDS,
        model=requested_model(request, body.model),
    )
    output = await call_core(request, lambda deadline: core.rerank(core_input, deadline))
    tokens = output.usage.input_tokens
    return JSONResponse(
        {
            "rankings": [{"index": r.index, "logit": r.logit} for r in output.results],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@api.get("/v1/models", summary="the served models, OpenAI-style, the default one first")
async def models(request: Request) -> JSONResponse:
    served = context(request).core.models
    names = sorted(served.names(), key=lambda name: name != served.default)
    data = [
        {
            "id": name,
            "object": "model",
            "created": _STARTED,
            "owned_by": "rerank-service",
            "root": served.get(name).info.source_model,
            "max_model_len": served.get(name).info.max_length,  # vLLM's field: tokens per input
            "precision": served.get(name).info.precision,  # as GetModelInfo and TEI /info report it
        }
        for name in names
    ]
    return JSONResponse({"object": "list", "data": data})


def _health(message: str, status: int = 200) -> JSONResponse:
    return JSONResponse({"object": "health.response", "message": message}, status_code=status)


@api.get("/v1/health/live", open=True, summary="200 while the process serves HTTP")
async def live() -> JSONResponse:
    return _health("Service is live.")


@api.get("/v1/health/ready", open=True, summary="200 while the model can answer, 503 otherwise (and while draining)")
async def ready(request: Request) -> JSONResponse:
    ctx = context(request)
    if ctx.draining():
        return _health(calls.SHUTTING_DOWN, 503)
    if not await ctx.core.is_ready():
        return _health(calls.MODEL_NOT_READY, 503)
    return _health("Service is ready.")
