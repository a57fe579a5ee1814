"""vLLM's score and rerank APIs: POST /score, /v1/score; vLLM's rerank body on /rerank (shared with TEI,
see tei.py) and /v1/rerank (shared with Cohere v1 and Jina, see cohere.py).

Clients: plain HTTP (vLLM ships no client library): LangChain and LlamaIndex vLLM rerankers, Ray Serve
and gateways (LiteLLM, Envoy AI Gateway) that route /score and /rerank to a vLLM server.

How the knobs map onto the core:
- `text_1` plays the query, `text_2` the document, or under vLLM's newer names `queries` and `documents`
  (or `items`), or `data_1` and `data_2`. Both a string: one pair; the first a string (or a list of one)
  and the second a list: that text against each (1:N, a rerank); two lists of one length: pair by pair
  (N:N). `data` answers each pair in request order with its `score`, sigmoid(logit) (vLLM's default
  activation for a one-label cross-encoder).
- `use_activation: false` (or its older names `activation` and `softmax`) answers the logit instead, in
  `score` and in rerank's `relevance_score`; of the three the first set, in vLLM's order softmax,
  activation, use_activation, decides (vLLM's get_use_activation).
- `truncate_prompt_tokens`: absent → NONE (a pair past the model's length is refused, as vLLM does);
  k → END at k tokens per (text_1, text_2) input, special tokens included, the text_2 side cut; -1 → END
  at the model's limit; past the model's limit → refused. Errors about that length name the field.
  `truncation_side` "left" cuts the text_2 side's start instead (START: its last tokens kept).
- `model`: a served model's name chooses the model (absent: the default model); another name is refused
  with 404 naming the served ones, unless one model is served: then it answers (the answer's `model`
  names the checkpoint that scored).
- `priority`: lower first, as vLLM's scheduler; 0 (the default) and below run first, a call above 0 waits in
  Triton's queue behind them (core.ScoreOptions.priority).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from rerank_server.core import FieldNames, RerankInput, ScoreInput, ScoreOptions, Truncation
from rerank_server.errors import EmptyInputError, InvalidRequestError, field_error
from rerank_server.http_api import common
from rerank_server.http_api.common import MODEL_FIELD, HttpApi, call_core, context, request_id, requested_model
from rerank_server.http_api.errors import VLLM

api = HttpApi("vLLM", VLLM)

# The names vLLM's score request takes for its two sides, in the order vLLM's request types try them.
SCORE_SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class VllmActivation(common.RequestBody):
    """vLLM's activation switch, under its three names (score and rerank bodies alike)."""

    softmax: bool | None = Field(None, description="an older name of `use_activation`")
    activation: bool | None = Field(None, description="an older name of `use_activation`")
    use_activation: bool | None = Field(None, description="false: answer logits (default: sigmoid scores)")

    def logits(self) -> bool:
        """The answer is logits: the first of the names set, in vLLM's order, says false."""
        chosen = next((v for v in (self.softmax, self.activation, self.use_activation) if v is not None), True)
        return not chosen


class VllmOptions(VllmActivation):
    """The knobs vLLM's score and rerank requests share."""

    model: str | None = Field(None, description=MODEL_FIELD)
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="absent: refuse inputs past the model's length; k: cut to k tokens; -1: the model's"
    )
    priority: int = Field(0, description="lower is handled first; 0 (the default) and below first of all")
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="with truncate_prompt_tokens: right (default) keeps a text's first tokens, left its last"
    )


def _texts(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("texts_type", "must be a string or a list of strings")
    return value


# One string is a list of one (the pairing rules treat them alike); errors then name text_2[i] alone.
Texts = Annotated[list[str], BeforeValidator(_texts)]


class ScoreRequest(VllmOptions):
    text_1: Texts | None = Field(None, description="a string or a list: the query side")
    text_2: Texts | None = Field(None, description="a string or a list: the document side")
    queries: Texts | None = Field(None, description="vLLM's newer name of text_1")
    documents: Texts | None = Field(None, description="vLLM's newer name of text_2 (with queries)")
    items: Texts | None = Field(None, description="another name of text_2 (with queries)")
    data_1: Texts | None = Field(None, description="another name of text_1")
    data_2: Texts | None = Field(None, description="another name of text_2")

    def sides(self) -> tuple[str, list[str], str, list[str]]:
        """The two sides the body sets, each with its name (the first pair of names set, in SCORE_SIDES)."""
        for first, second in SCORE_SIDES:
            texts_1, texts_2 = getattr(self, first), getattr(self, second)
            if texts_1 is not None and texts_2 is not None:
                return first, texts_1, second, texts_2
        pairs = ", ".join(f"{first} and {second}" for first, second in SCORE_SIDES)
        missing = "text_1"  # or the partner of a side the body sets
        for first, second in SCORE_SIDES:
            if getattr(self, first) is not None or getattr(self, second) is not None:
                missing = second if getattr(self, first) is not None else first
                break
        raise field_error(InvalidRequestError, missing, f"is required (the two sides: one of {pairs})")


class VllmRerankRequest(VllmOptions):
    """vLLM's rerank body (Jina's and Cohere's fields, plus vLLM's)."""

    query: str
    documents: list[str]
    top_n: int = Field(0, ge=0, description="results to return; 0: all")
    return_documents: bool = True


def options(k: int | None, priority: int = 0, side: str | None = None) -> ScoreOptions:
    """truncate_prompt_tokens `k` and truncation_side `side` as the core's truncation and max_length: a `k` past the
    model's limit is refused by the core, naming truncate_prompt_tokens, as it refuses gRPC's max_length."""
    if k is None:
        return ScoreOptions(truncation=Truncation.NONE, priority=priority)
    return ScoreOptions(
        truncation=Truncation.START if side == "left" else Truncation.END,
        max_length=None if k == -1 else k,
        max_length_field="truncate_prompt_tokens",
        priority=priority,
    )


async def _score(body: ScoreRequest, request: Request) -> JSONResponse:
    name_1, first, name_2, second = body.sides()
    if not first:
        raise field_error(EmptyInputError, name_1, "must hold at least one text")
    if len(first) > 1 and len(first) != len(second):
        raise field_error(
            InvalidRequestError,
            name_2,
            f"holds {len(second)} texts for the {len(first)} of {name_1}: the lengths must be 1:1, 1:N or N:N",
        )
    model = requested_model(request, body.model)
    score_options = options(body.truncate_prompt_tokens, body.priority, body.truncation_side)
    core = context(request).core
    if len(first) == 1:
        # 1:N is a rerank: the query is tokenized once and checked like every API's query.
        fields = FieldNames(lambda i: name_1, lambda i: f"{name_2}[{i}]", name_2)
        rerank_input = RerankInput(first[0], second, options=score_options, fields=fields, model=model)
        ranked = await call_core(request, lambda deadline: core.rerank(rerank_input, deadline))
        answered, usage, results = ranked.model, ranked.usage, sorted(ranked.results, key=lambda r: r.index)
    else:
        fields = FieldNames(lambda i: f"{name_1}[{i}]", lambda i: f"{name_2}[{i}]", name_2)
        score_input = ScoreInput(
            list(zip(first, second, strict=True)), options=score_options, fields=fields, model=model
        )
        scored = await call_core(request, lambda deadline: core.score(score_input, deadline))
        answered, usage, results = scored.model, scored.usage, scored.scores
    logits = body.logits()
    tokens = usage.input_tokens
    return JSONResponse(
        {
            "id": f"score-{request_id(request)}",
            "object": "list",
            "created": int(time.time()),
            "model": answered,
            "data": [{"index": r.index, "object": "score", "score": r.logit if logits else r.score} for r in results],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
    )


@api.post("/score", ranks=True, summary="vLLM score")
async def score(body: ScoreRequest, request: Request) -> JSONResponse:
    return await _score(body, request)


@api.post("/v1/score", ranks=True, summary="vLLM score")
async def score_v1(body: ScoreRequest, request: Request) -> JSONResponse:
    return await _score(body, request)


async def rerank(body: VllmRerankRequest, request: Request) -> JSONResponse:
    """vLLM's rerank answer: results best first (top_n of them, 0: all), each with its document."""
    core = context(request).core
    model = requested_model(request, body.model)
    core_input = RerankInput(
        body.query,
        body.documents,
        top_n=body.top_n,
        options=options(body.truncate_prompt_tokens, body.priority, body.truncation_side),
        model=model,
    )
    output = await call_core(request, lambda deadline: core.rerank(core_input, deadline))
    logits = body.logits()
    results: list[dict[str, Any]] = []
    for result in output.results:
        item: dict[str, Any] = {"index": result.index, "relevance_score": result.logit if logits else result.score}
        if body.return_documents:
            item["document"] = {"text": body.documents[result.index]}
        results.append(item)
    return JSONResponse(
        {
            "id": f"rerank-{request_id(request)}",
            "model": output.model,
            "usage": {"prompt_tokens": output.usage.input_tokens, "total_tokens": output.usage.input_tokens},
            "results": results,
        }
    )
