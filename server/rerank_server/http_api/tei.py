"""Hugging Face text-embeddings-inference's rerank API: POST /rerank, GET /info, GET /health. POST /rerank
also takes vLLM's rerank body (`documents` instead of `texts`) and answers it in vLLM's shape (vllm.py).

Clients: LlamaIndex's TextEmbeddingInference postprocessor, Haystack's HuggingFaceTEIRanker.

How the knobs map onto the core:
- `score` is sigmoid(logit) (TEI's default); `raw_scores: true` answers the logit instead.
- Every text gets an entry, best first (LlamaIndex asserts one entry per text).
- `truncate`: absent or true → END (the text is cut to fit, like TEI with --auto-truncate); false → NONE
  (a text that does not fit is refused with 413, like TEI without it).
- `truncation_direction`: "right" (default) cuts a text's end (END); "left" its start (START: the text's
  last tokens are kept); either spelled lowercase or capitalized, as TEI takes them.
- Statuses are TEI's: 413 for its validation errors (too many texts, a text too long with truncate false,
  a query past max_query_tokens, a request past max_total_tokens: TEI up to 1.8's status, see
  docs/http.md), 400 for no texts (error_type Empty), 422 for a body that does not parse or a text the
  tokenizer cannot take (error_type Tokenizer).
- `model` is not part of TEI's request (a TEI server serves one model), but it is taken as the other APIs
  take it: a served model's name chooses the model (absent: the default model); another name is refused
  with 404 naming the served ones, unless one model is served: then it answers. /info describes the
  default model (`served_model_name` is its name, as requests name it).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from rerank_server import calls
from rerank_server.core import FieldNames, RerankInput, ScoreOptions, Truncation
from rerank_server.http_api import vllm
from rerank_server.http_api.common import MODEL_FIELD, HttpApi, RequestBody, call_core, context, requested_model
from rerank_server.http_api.errors import TEI

api = HttpApi("TEI", TEI)

TEI_FIELDS = FieldNames(lambda i: "query", lambda i: f"texts[{i}]", "texts")


class TeiRerankRequest(RequestBody):
    query: str
    texts: list[str]
    truncate: bool | None = Field(None, description="absent or true: cut texts to fit; false: refuse them (413)")
    truncation_direction: Literal["left", "right", "Left", "Right"] = Field(
        "right", description="which end of a text is cut: right keeps its first tokens, left its last"
    )
    raw_scores: bool = Field(False, description="answer logits instead of sigmoid scores")
    return_text: bool = False
    model: str | None = Field(None, description=MODEL_FIELD)


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TeiError(BaseModel):
    error: str
    error_type: str


_TRUNCATION = {"right": Truncation.END, "left": Truncation.START}
_BODIES = {
    "anyOf": [
        TeiRerankRequest.model_json_schema(),
        vllm.VllmRerankRequest.model_json_schema(),
    ]
}


def _validated(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


@api.post(
    "/rerank",
    ranks=True,
    response_model=list[TeiRank],
    summary="TEI rerank (and vLLM's rerank body: `documents` instead of `texts`)",
    responses={413: {"model": TeiError}, 422: {"model": TeiError}, 429: {"model": TeiError}},
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": _BODIES}}, "required": True}},
)
async def rerank(request: Request, raw: Any = Body(...)) -> JSONResponse:  # noqa: B008
    # Any body: one that is not an object is refused by the request model, in the words of every API's.
    if isinstance(raw, dict) and "documents" in raw and "texts" not in raw:
        return await vllm.rerank(_validated(vllm.VllmRerankRequest, raw), request)
    body: TeiRerankRequest = _validated(TeiRerankRequest, raw)
    truncation = Truncation.NONE if body.truncate is False else _TRUNCATION[body.truncation_direction.lower()]
    core = context(request).core
    core_input = RerankInput(
        body.query,
        body.texts,
        options=ScoreOptions(truncation=truncation),
        fields=TEI_FIELDS,
        model=requested_model(request, body.model),
    )
    output = await call_core(request, lambda deadline: core.rerank(core_input, deadline))
    ranks: list[dict[str, Any]] = []
    for result in output.results:
        item: dict[str, Any] = {"index": result.index, "score": result.logit if body.raw_scores else result.score}
        if body.return_text:
            item["text"] = body.texts[result.index]
        ranks.append(item)
    return JSONResponse(ranks)


@api.get("/info", summary="TEI model information")
async def info(request: Request) -> JSONResponse:
    ctx = context(request)
    description = ctx.core.describe()
    return JSONResponse(
        {
            "model_id": description.model,
            "served_model_name": description.triton_model_name,
            "model_sha": None,
            "model_dtype": description.precision,
            "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
            "max_input_length": description.max_length,
            "max_client_batch_size": description.limits.max_documents,
            "max_batch_tokens": description.limits.max_total_tokens,
            # Calls tokenizing or waiting to; past it a call gets 429, as past TEI's limit.
            "max_concurrent_requests": description.limits.tokenize_queue_max,
            # Triton's dynamic batcher batches by tokens, not by requests: no request count bounds a batch.
            "max_batch_requests": None,
            "auto_truncate": True,  # `truncate` absent cuts texts to fit
            "tokenization_workers": ctx.settings.tokenizer_threads,
            "version": "rerank-service",
            "sha": None,
            "docker_label": None,
        }
    )


@api.get("/health", open=True, summary="200 while the model can answer, 503 otherwise (and while draining)")
async def health(request: Request) -> JSONResponse:
    ctx = context(request)
    if ctx.draining():
        return JSONResponse({"error": calls.SHUTTING_DOWN, "error_type": "Unhealthy"}, status_code=503)
    if not await ctx.core.is_ready():
        return JSONResponse({"error": calls.MODEL_NOT_READY, "error_type": "Unhealthy"}, status_code=503)
    return JSONResponse({})
