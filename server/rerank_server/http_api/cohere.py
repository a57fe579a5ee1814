"""Cohere's rerank API (v1 and v2) and Jina's, which shares Cohere v1's path: POST /v1/rerank, /v2/rerank.

Clients: the `cohere` SDK (Client and ClientV2 with base_url=), langchain-cohere, LlamaIndex's and
Haystack's Cohere rankers (all through /v2/rerank), and Jina's clients (LangChain, LlamaIndex,
jina-haystack) through /v1/rerank. The /v1/rerank answer carries both APIs' fields (Cohere's `id` and
`meta`, Jina's `model` and `usage`); each client reads its own and ignores the rest.

How the knobs map onto the core:
- relevance_score is the core's score, sigmoid(logit), in [0, 1]; results come best first, top_n of them.
- `model`: a served model's name chooses the model (GET /v1/models lists them; absent: the default model);
  another name is refused with 404 naming the served ones, unless one model is served: then it answers
  whatever name the client sends (see ServedModels.for_client). Jina's `model` answer field names the
  checkpoint that scored.
- v2 `max_tokens_per_doc` caps the tokens of each (query, document) input, query and special tokens
  included (the core's max_length), clamped to the model's limit: a cap on the document alone would need
  the query's length, which only the tokenizer knows. Cohere's default (4096) is the model's limit here.
- v1 `max_chunks_per_doc` turns on chunking (CHUNK: long documents are scored window by window and keep
  their best window, as Cohere does); the number of windows is bounded by max_total_tokens, not by it.
- v1 documents may be objects: `text` is ranked, or with `rank_fields` those fields, one `name: value`
  line each, in that order.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from rerank_server.core import RerankInput, RerankOutput, ScoreOptions, Truncation
from rerank_server.errors import InvalidRequestError, field_error
from rerank_server.http_api.common import MODEL_FIELD, HttpApi, call_core, context, request_id, requested_model
from rerank_server.http_api.errors import COHERE, COHERE_JINA

api = HttpApi("Cohere and Jina", COHERE)

# Each document is searched for each rank field: the cap bounds that work (documents x fields) and real
# requests name a few fields.
MAX_RANK_FIELDS = 64
# Cohere bills one search unit per query and up to 100 documents.
_DOCUMENTS_PER_SEARCH_UNIT = 100


class RerankV1Request(BaseModel):
    """Cohere v1 (and Jina) rerank request."""

    query: str
    documents: list[str | dict[str, Any]] = Field(description="strings, or objects ranked on `text` (or rank_fields)")
    model: str | None = Field(None, description=MODEL_FIELD)
    top_n: int | None = Field(None, ge=1, description="results to return (default: all)")
    rank_fields: list[str] | None = Field(
        None,
        max_length=MAX_RANK_FIELDS,
        description=f"fields of object documents to rank on, in order, each once (at most {MAX_RANK_FIELDS})",
    )
    return_documents: bool = False
    max_chunks_per_doc: int | None = Field(None, ge=1, description="set: long documents are scored in windows")


class RerankV2Request(BaseModel):
    """Cohere v2 rerank request."""

    query: str
    documents: list[str]
    model: str | None = Field(None, description=MODEL_FIELD)
    top_n: int | None = Field(None, ge=1, description="results to return (default: all)")
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="tokens per (query, document) input, clamped to the model's limit"
    )
    return_documents: bool = False


class Document(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Document | None = None


class RerankResponse(BaseModel):
    id: str
    results: list[RerankResult]
    meta: dict[str, Any]
    model: str | None = Field(None, description="/v1/rerank only (Jina)")
    usage: dict[str, int] | None = Field(None, description="/v1/rerank only (Jina)")


def _document_text(document: str | dict[str, Any], index: int, rank_fields: list[str] | None) -> str:
    if isinstance(document, str):
        return document
    fields = rank_fields or ["text"]
    values = []
    for name in fields:
        value = document.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise field_error(InvalidRequestError, f"documents[{index}].{name}", "must be a string")
        values.append(value if rank_fields is None else f"{name}: {value}")
    if not values:
        raise field_error(
            InvalidRequestError, f"documents[{index}]", f"has none of the fields to rank on ({', '.join(fields)})"
        )
    return "\n".join(values)


def _check_rank_fields(rank_fields: list[str] | None) -> None:
    """A repeated field would copy each document's text once per repeat: memory a multiple of the body's."""
    seen: set[str] = set()
    for i, name in enumerate(rank_fields or ()):
        if name in seen:
            raise field_error(InvalidRequestError, f"rank_fields[{i}]", "names a field already named; name each once")
        seen.add(name)


async def _rerank(
    request: Request,
    query: str,
    documents: list[str],
    top_n: int | None,
    options: ScoreOptions,
    return_documents: bool,
    version: str,
    model: str,
) -> tuple[RerankOutput, dict[str, Any]]:
    """Both routes' body: rank through the core, answer in Cohere's shape for API `version`."""
    core_input = RerankInput(query, documents, top_n=top_n or 0, options=options, model=model)
    core = context(request).core
    output = await call_core(request, lambda deadline: core.rerank(core_input, deadline))
    results: list[dict[str, Any]] = []
    for result in output.results:
        item: dict[str, Any] = {"index": result.index, "relevance_score": result.score}
        if return_documents:
            item["document"] = {"text": documents[result.index]}
        results.append(item)
    units = math.ceil(len(documents) / _DOCUMENTS_PER_SEARCH_UNIT)
    answer = {
        "id": request_id(request),
        "results": results,
        "meta": {"api_version": {"version": version}, "billed_units": {"search_units": units}},
    }
    return output, answer


@api.post(
    "/v1/rerank",
    shape=COHERE_JINA,
    ranks=True,
    response_model=RerankResponse,
    summary="Cohere v1 and Jina rerank",
    responses={400: {"description": "invalid request: {message, detail}"}},
)
async def rerank_v1(body: RerankV1Request, request: Request) -> JSONResponse:
    _check_rank_fields(body.rank_fields)
    documents = [_document_text(d, i, body.rank_fields) for i, d in enumerate(body.documents)]
    options = ScoreOptions(truncation=Truncation.CHUNK if body.max_chunks_per_doc else Truncation.END)
    output, answer = await _rerank(
        request,
        body.query,
        documents,
        body.top_n,
        options,
        body.return_documents,
        "1",
        requested_model(request, body.model),
    )
    # Jina's fields beside Cohere's.
    tokens = output.usage.input_tokens
    answer["model"] = output.model
    answer["usage"] = {"total_tokens": tokens, "prompt_tokens": tokens}
    return JSONResponse(answer)


@api.post(
    "/v2/rerank",
    ranks=True,
    response_model=RerankResponse,
    summary="Cohere v2 rerank",
    responses={400: {"description": "invalid request: {message}"}},
)
async def rerank_v2(body: RerankV2Request, request: Request) -> JSONResponse:
    model = requested_model(request, body.model)
    max_length = None
    if body.max_tokens_per_doc is not None:
        max_length = min(body.max_tokens_per_doc, context(request).core.describe(model).max_length)
    options = ScoreOptions(max_length=max_length)
    _, answer = await _rerank(
        request, body.query, body.documents, body.top_n, options, body.return_documents, "2", model
    )
    return JSONResponse(answer)
