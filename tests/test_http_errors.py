"""Every error path of the HTTP APIs over plain HTTP (httpx): each API's own status and body shape, the
server's limits, auth, TLS, overload, Triton down, drain and deadline; never a 500 for bad input, and the
server keeps serving after each."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rerank_client import InvalidRequestError, RerankClient, tls_credentials
from rerank_server.calls import MODEL_NOT_READY, SHUTTING_DOWN
from rerank_server.http_api.gate import span_name
from rerank_server.http_api.registry import OPEN_PATHS, RANKING_PATHS, ROUTES, shape_for
from rerank_server.http_api.server import create_app
from rerank_server.settings import Settings
from tests.certs import Authority
from tests.conftest import HELD_S, Stack, free_port, frontend, start_serve, stop_serve
from tests.fakes import FakeBackend, fake_core
from tests.test_core_models import two_models
from tests.test_operations import sample, scrape
from tests.texts import QUERY, text

COHERE_V1, COHERE_V2, TEI, NIM = "/v1/rerank", "/v2/rerank", "/rerank", "/v1/ranking"
VLLM_SCORE, VLLM_SCORE_V1 = "/score", "/v1/score"
VLLM = (VLLM_SCORE, VLLM_SCORE_V1)
# Each ranking route's query and document-list fields.
QUERY_FIELD = dict.fromkeys(VLLM, "text_1")
DOCUMENTS_FIELD = {TEI: "texts", NIM: "passages", **dict.fromkeys(VLLM, "text_2")}


def good_body(path: str, documents: list[str], **extra: Any) -> dict[str, Any]:
    if path == TEI:
        return {"query": QUERY, "texts": documents, **extra}
    if path == NIM:
        return {"query": {"text": QUERY}, "passages": [{"text": d} for d in documents], **extra}
    if path in (COHERE_V1, COHERE_V2):
        return {"query": QUERY, "documents": documents, **extra}
    if path in VLLM:
        return {"text_1": QUERY, "text_2": documents, **extra}
    raise AssertionError(f"no request body known for {path}: add the new API's to good_body")


def cutting(path: str) -> dict[str, Any]:
    """The field that turns END truncation on where it is not the default (NIM, vLLM)."""
    if path in VLLM:
        return {"truncate_prompt_tokens": -1}
    return {"truncate": "END"} if path == NIM else {}


def assert_shape(path: str, response: httpx.Response, status: int, *fragments: str) -> str:
    """The response has `status` and the API's error body; returns the message, which holds `fragments`."""
    assert response.status_code == status, response.text
    body = response.json()
    if path == TEI:
        assert set(body) == {"error", "error_type"}, body
        message = body["error"]
    elif path == NIM:
        assert {"status", "title", "detail"} <= set(body) and body["status"] == status, body
        message = body["detail"]
    elif path in VLLM:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] == status and body["error"]["type"].endswith("Error"), body
        message = body["error"]["message"]
    elif path == COHERE_V1:  # Cohere v1 reads `message`, Jina `detail`
        assert body["message"] == body["detail"], body
        message = body["message"]
    else:
        assert set(body) == {"message"}, body
        message = body["message"]
    for fragment in fragments:
        assert fragment in message, message
    assert response.headers["x-request-id"]
    return str(message)


def still_serving(base_url: str, **headers: str) -> None:
    response = httpx.post(f"{base_url}{COHERE_V2}", json=good_body(COHERE_V2, ["a", "b"]), headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


@pytest.fixture(scope="module")
def base_url(stack: Stack) -> str:
    assert stack.http_url is not None
    return stack.http_url


# -- bad input: each API's status and shape ----------------------------------------------------

# Every route that ranks, as the server declares them: a new API's ranking route gets every test below.
ALL = RANKING_PATHS
INVALID = {COHERE_V1: 400, COHERE_V2: 400, TEI: 422, NIM: 422, VLLM_SCORE: 400, VLLM_SCORE_V1: 400}
# Bad input by a size limit (too many documents, a text too long with truncation off): TEI says 413, NIM 400.
OVER_LIMIT = {**INVALID, TEI: 413, NIM: 400}
# No documents: TEI says 400 (error_type Empty).
EMPTY = {**INVALID, TEI: 400}


def test_the_declared_ranking_routes_are_the_ones_these_tests_know() -> None:
    assert set(ALL) == {COHERE_V1, COHERE_V2, TEI, NIM, VLLM_SCORE, VLLM_SCORE_V1}


def test_every_route_the_app_serves_is_declared_once_with_its_shape() -> None:
    app = create_app(fake_core(), Settings(triton_url="fake:0"))
    served = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item}
    declared = {(route.method, route.path) for route in ROUTES}
    assert served == declared and len(ROUTES) == len(declared)
    # Errors on a route, or under it, take its flavour's shape; unknown paths Cohere's.
    shapes = {route.path: shape_for(route.path).surface for route in ROUTES}
    assert shapes == {
        COHERE_V1: "cohere",
        COHERE_V2: "cohere",
        TEI: "tei",
        "/info": "tei",
        "/health": "tei",
        NIM: "nim",
        "/v1/models": "nim",
        "/v1/health/live": "nim",
        "/v1/health/ready": "nim",
        VLLM_SCORE: "vllm",
        VLLM_SCORE_V1: "vllm",
    }
    assert shape_for("/v1/models/other").surface == "nim" and shape_for("/nowhere").surface == "cohere"
    assert {"/health", "/v1/health/live", "/v1/health/ready"} == OPEN_PATHS


def test_the_health_probes_say_why_they_fail() -> None:
    """TEI's /health and NIM's /v1/health/ready answer 503 while draining and while the model is not ready, in
    the same words (calls.py's)."""

    async def probe(app: Any) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rerank") as client:
            return [await client.get(path) for path in ("/health", "/v1/health/ready")]

    settings = Settings(triton_url="fake:0")
    draining = create_app(fake_core(), settings, draining=lambda: True)
    unready = create_app(fake_core(FakeBackend(ready=False)), settings)
    for app, message in ((draining, SHUTTING_DOWN), (unready, MODEL_NOT_READY)):
        tei, nim = asyncio.run(probe(app))
        assert (tei.status_code, tei.json()) == (503, {"error": message, "error_type": "Unhealthy"})
        assert (nim.status_code, nim.json()["message"]) == (503, message)


def test_spans_are_named_by_standard_methods_only() -> None:
    """A request line's method is any token up to 16 KiB from anyone: only the standard ones name a span."""
    assert span_name("POST", COHERE_V2) == "POST /v2/rerank" and span_name("OPTIONS", TEI) == "OPTIONS /rerank"
    for method in ("X" * 16_384, "post", "PROPFIND", "CONNECT", "TRACE"):
        assert span_name(method, "other") == "HTTP other"


def test_tei_rerank_takes_a_model_as_the_other_apis_do() -> None:
    """TEI's body has no `model`, but a server of several models honours one there (TEI's and vLLM's bodies
    on /rerank alike), absent is the default model, and an unknown name is a 404 in TEI's shape."""
    core, alpha, beta = two_models()
    app = create_app(core, Settings(triton_url="fake:0"))

    async def send(*bodies: dict[str, Any]) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rerank") as client:
            return [await client.post(TEI, json=body) for body in bodies]

    tei, named, vllm_body, default, unknown = asyncio.run(
        send(
            good_body(TEI, ["a"], model="beta", raw_scores=True),
            good_body(TEI, ["b"], model="alpha"),
            {"query": QUERY, "documents": ["c"], "model": "beta"},
            good_body(TEI, ["d"]),
            good_body(TEI, ["e"], model="gamma"),
        )
    )
    assert [r.status_code for r in (tei, named, vllm_body, default)] == [200] * 4
    assert (len(alpha.calls), len(beta.calls)) == (2, 2)  # beta: the two that name it
    assert tei.json()[0]["score"] > 50  # beta's logits are offset by 100
    assert vllm_body.json()["model"] == "checkpoint-beta"
    # TEI's shape (create_app alone: no gate, so no x-request-id to check).
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "NotFound", unknown.text
    assert "gamma" in unknown.json()["error"] and "alpha, beta" in unknown.json()["error"]


@pytest.mark.e2e
@pytest.mark.parametrize("path", ALL)
def test_malformed_json_empty_body_and_wrong_types_are_refused_in_the_apis_shape(base_url: str, path: str) -> None:
    status = INVALID[path]
    url = f"{base_url}{path}"
    headers = {"content-type": "application/json"}
    assert_shape(path, httpx.post(url, content=b'{"query": "q", "documents": [', headers=headers), status, "JSON")
    assert_shape(path, httpx.post(url, content=b"", headers=headers), status)
    assert_shape(path, httpx.post(url, content=b"\xff\xfe\x00garbage", headers=headers), status)
    assert_shape(path, httpx.post(url, json=[1, 2, 3]), status)
    form = httpx.post(url, content=json.dumps(good_body(path, ["a"])).encode())  # no content-type
    assert_shape(path, form, status, "content-type: application/json")
    # The content type the caller sent is repeated cut, not whole.
    odd = httpx.post(url, content=b"{}", headers={"content-type": "text/" + "x" * 5000})
    assert len(assert_shape(path, odd, status, "(got 'text/xxx", "(5,005 characters)")) < 400
    query_field = QUERY_FIELD.get(path, "query")
    wrong_query = {**good_body(path, ["a"]), query_field: 5 if path != NIM else {"text": 5}}
    assert_shape(path, httpx.post(url, json=wrong_query), status, query_field)
    documents_field = DOCUMENTS_FIELD.get(path, "documents")
    # vLLM's text_2 may be one string.
    wrong_documents = {**good_body(path, ["a"]), documents_field: 5 if path in VLLM else "not a list"}
    assert_shape(path, httpx.post(url, json=wrong_documents), status, documents_field)
    wrong_item = {**good_body(path, ["a"]), documents_field: ["a", None]}
    assert_shape(path, httpx.post(url, json=wrong_item), status, f"{documents_field}[1]")
    still_serving(base_url)


@pytest.mark.e2e
@pytest.mark.parametrize("path", ALL)
def test_empty_query_no_documents_and_too_many_documents_are_refused(base_url: str, path: str) -> None:
    status = INVALID[path]
    url = f"{base_url}{path}"
    documents_field = DOCUMENTS_FIELD.get(path, "documents")
    query_field = QUERY_FIELD.get(path, "query")
    empty_query = good_body(path, ["a"])
    empty_query[query_field] = {"text": "  "} if path == NIM else "  "
    assert_shape(path, httpx.post(url, json=empty_query), status, query_field, "must not be empty")
    assert_shape(path, httpx.post(url, json=good_body(path, [])), EMPTY[path], documents_field)
    many = httpx.post(url, json=good_body(path, ["a"] * 1001), timeout=60)
    assert_shape(path, many, OVER_LIMIT[path], documents_field, "max_documents")
    still_serving(base_url)


# What no refusal may show: pydantic's own words and links, a Python class, an internal type name.
LEAKS = ("Input should", "errors.pydantic.dev", "<class", "dict[str", "instance of", ".str:", "Field required")
BIG = int("9" * 4300)  # Python's most digits: a number any API reads
LONG = "x" * 10_000


def assert_plain(message: str, field: str | None) -> None:
    """A refusal in plain words: none of LEAKS, no caller's value repeated past 64 characters (errors.cut), and
    `field` named once, at the start."""
    assert not re.search(r"(.)\1{64}", message), message[:300]
    assert len(message) < 400, message[:300]
    assert not [leak for leak in LEAKS if leak in message], message
    if field is not None:
        named = re.findall(rf"(?<![\w.\[]){re.escape(field)}(?![\w\[])", message)
        assert message.startswith(f"{field}: ") and len(named) == 1, message


def bad_bodies(path: str) -> list[tuple[Any, int, str | None, str]]:
    """(body, status, field, words) of bad input on `path`: each refused naming `field` with `words`."""
    query = QUERY_FIELD.get(path, "query")
    documents = DOCUMENTS_FIELD.get(path, "documents")
    item = {COHERE_V1: "a string or an object", COHERE_V2: "a string or an object", NIM: "an object"}
    flag = {TEI: "raw_scores", NIM: "truncate", **dict.fromkeys(VLLM, "use_activation")}.get(path, "return_documents")
    cases: list[tuple[Any, int, str | None, str]] = [
        (LONG, INVALID[path], None, "the body must be a JSON object (got the string 'xxx"),
        ({**good_body(path, ["a"]), query: BIG}, INVALID[path], query, "(got 999"),
        ({**good_body(path, ["a"]), documents: [BIG]}, INVALID[path], f"{documents}[0]", item.get(path, "a string")),
        ({**good_body(path, ["a"]), flag: LONG}, INVALID[path], flag, "(10,000 characters)"),
        (good_body(path, ["a"]) | {query: "word " * 3000}, OVER_LIMIT[path], query, "is more than 508 tokens"),
    ]
    if path == NIM:  # NIM's query is an object
        cases[-1] = ({**good_body(path, ["a"]), "query": {"text": "word " * 3000}}, 400, "query.text", "is more than")
    if path in (COHERE_V1, COHERE_V2):
        least = "0" if path == COHERE_V1 else "1"
        cases.append((good_body(path, ["a"], top_n=-BIG), 400, "top_n", f"must be at least {least} (got -999"))
        fields = good_body(path, [{"text": "a"}], rank_fields=[LONG])  # type: ignore[list-item]
        cases.append((fields, 400, "documents[0]", "has none of the fields to rank on ('xxx"))
    if path == COHERE_V2:
        chunks = good_body(path, ["a", "b"], max_chunks_per_doc=BIG)
        cases.append((chunks, 400, "max_chunks_per_doc", "pass the limit of 10,000 chunks per request"))
    if path in (COHERE_V1, TEI, *VLLM):  # vLLM's truncate_prompt_tokens (TEI's path: vLLM's body)
        body = good_body(path, ["a"]) if path != TEI else {"query": QUERY, "documents": ["a"]}
        cases.append(
            ({**body, "truncate_prompt_tokens": BIG}, INVALID[path], "truncate_prompt_tokens", "(4,300 digits)")
        )
    return cases


@pytest.mark.e2e
@pytest.mark.parametrize("path", ALL)
def test_refusals_name_their_field_once_and_cut_what_they_repeat(stack: Stack, base_url: str, path: str) -> None:
    """Each refusal says which field, what was wrong and what is allowed, once, in plain words, and repeats at most
    64 characters of what the caller sent, in the answer and in the log. A 4,300-digit truncate_prompt_tokens came
    back whole ("truncate_prompt_tokens: 9999... is greater than ..."), as did each of 64 rank_fields; pydantic's
    words named a union's members ("documents[0].dict[str,any]"), a class ("instance of Text"), and the tokenizer's
    the field again ("query: the query is ...", "texts[0]: document 0 does not fit")."""
    lines = len(stack.output)
    for body, status, field, words in bad_bodies(path):
        response = httpx.post(f"{base_url}{path}", json=body, timeout=60)
        assert_plain(assert_shape(path, response, status, words), field)
    assert not [line for line in stack.output[lines:] if re.search(r"(.)\1{64}", line)]
    still_serving(base_url)


@pytest.mark.e2e
def test_a_limit_is_worded_the_same_in_every_api(stack: Stack, base_url: str) -> None:
    """A length past the model's is refused in the same words by each API that takes one (gRPC's max_length, vLLM's
    truncate_prompt_tokens on every path that takes vLLM's body): they were two wordings."""
    with RerankClient(stack.target, timeout=60) as client, pytest.raises(InvalidRequestError) as caught:
        client.rerank(QUERY, ["a"], max_length=100_000)
    described = {caught.value.details.removeprefix("max_length: ")}
    for path, body in (
        (COHERE_V1, good_body(COHERE_V1, ["a"])),
        (VLLM_SCORE, good_body(VLLM_SCORE, ["a"])),
        (TEI, {"query": QUERY, "documents": ["a"]}),
    ):
        response = httpx.post(f"{base_url}{path}", json={**body, "truncate_prompt_tokens": 100_000}, timeout=60)
        message = assert_shape(path, response, INVALID[path], "truncate_prompt_tokens: ")
        described.add(message.removeprefix("truncate_prompt_tokens: "))
    assert described == {"100000 exceeds the model's 512, the most tokens it takes per input"}


@pytest.mark.e2e
def test_top_n_and_cohere_object_documents_are_checked(base_url: str) -> None:
    for top_n in (0, -1, "three"):
        body = good_body(COHERE_V2, ["a", "b"], top_n=top_n)
        assert_shape(COHERE_V2, httpx.post(f"{base_url}{COHERE_V2}", json=body), 400, "top_n")
    no_text = good_body(COHERE_V1, [{"title": "t"}])  # type: ignore[list-item]
    assert_shape(COHERE_V1, httpx.post(f"{base_url}{COHERE_V1}", json=no_text), 400, "documents[0]")
    # rank_fields: ranked on one `name: value` line per field, in order; the document comes back as sent.
    fields = good_body(COHERE_V1, [{"title": "quick sort", "body": "python"}], rank_fields=["title", "body"])  # type: ignore[list-item]
    fields["return_documents"] = True
    answer = httpx.post(f"{base_url}{COHERE_V1}", json=fields).json()
    assert answer["results"][0]["document"] == {"title": "quick sort", "body": "python"}
    lines = httpx.post(f"{base_url}{COHERE_V1}", json=good_body(COHERE_V1, ["title: quick sort\nbody: python"])).json()
    assert answer["results"][0]["relevance_score"] == pytest.approx(lines["results"][0]["relevance_score"], abs=1e-6)


@pytest.mark.e2e
def test_unknown_routes_and_methods_are_404_and_405_not_500(base_url: str) -> None:
    assert_shape(COHERE_V2, httpx.get(f"{base_url}{COHERE_V2}"), 405)
    assert_shape(TEI, httpx.get(f"{base_url}{TEI}"), 405)
    # A 405 names the methods the path allows (RFC 9110 15.5.6: Allow is required); it was missing.
    for method, path, allowed in (("GET", COHERE_V2, "POST"), ("DELETE", TEI, "POST"), ("PUT", "/v1/models", "GET")):
        response = httpx.request(method, f"{base_url}{path}")
        assert response.status_code == 405 and response.headers.get("allow") == allowed, (path, response.headers)
    response = httpx.post(f"{base_url}/v1/v1/rerank", json={})  # a base URL ending in /v1 given to the Cohere SDK
    assert response.status_code == 404 and "/v1/v1/rerank" in response.json()["message"]
    # A trailing slash: a 404 in the API's shape, not an empty 307 to a Location built from the Host header.
    for path in (COHERE_V2, TEI, NIM):
        response = httpx.post(f"{base_url}{path}/", json={}, headers={"host": "elsewhere.example"})
        assert "location" not in response.headers, response.headers
        assert_shape(path, response, 404, f"{path}/")


# -- the knobs mapped onto the core -----------------------------------------------------------


@pytest.mark.e2e
def test_truncation_knobs_map_onto_the_core(stack: Stack, base_url: str) -> None:
    long = [text(700, seed=3), "short"]  # 700 words pass the tiny model's 512 tokens
    # TEI: truncate false refuses (NONE); absent or true cuts (END); Left is refused.
    refused = httpx.post(f"{base_url}{TEI}", json=good_body(TEI, long, truncate=False))
    assert_shape(TEI, refused, 413, "texts[0]", "does not fit")
    assert httpx.post(f"{base_url}{TEI}", json=good_body(TEI, long)).status_code == 200
    assert httpx.post(f"{base_url}{TEI}", json=good_body(TEI, long, truncate=True)).status_code == 200
    odd = httpx.post(f"{base_url}{TEI}", json=good_body(TEI, long, truncation_direction="Middle"))
    assert_shape(TEI, odd, 422, "truncation_direction")
    # NIM: NONE is the default and refuses (400, as NIM refuses input past its token limit); END cuts.
    assert_shape(NIM, httpx.post(f"{base_url}{NIM}", json=good_body(NIM, long)), 400, "passages[0]", "does not fit")
    cut = httpx.post(f"{base_url}{NIM}", json=good_body(NIM, long, truncate="END"))
    assert cut.status_code == 200 and len(cut.json()["rankings"]) == 2
    assert_shape(NIM, httpx.post(f"{base_url}{NIM}", json=good_body(NIM, long, truncate="SOME")), 422, "truncate")
    # Cohere v1 max_chunks_per_doc: CHUNK, scored window by window.
    with RerankClient(stack.target, timeout=60) as client:
        chunked = {r.index: r.score for r in client.rerank(QUERY, long, truncation="chunk").results}
    answer = httpx.post(f"{base_url}{COHERE_V1}", json=good_body(COHERE_V1, long, max_chunks_per_doc=10)).json()
    assert {r["index"]: r["relevance_score"] for r in answer["results"]} == pytest.approx(chunked, abs=1e-6)


@pytest.mark.e2e
def test_jina_answer_on_the_cohere_v1_path(base_url: str) -> None:
    documents = ["beijing", "quick sort in python", "rain"]
    answer = httpx.post(f"{base_url}{COHERE_V1}", json=good_body(COHERE_V1, documents, top_n=2, return_documents=True))
    body = answer.json()
    assert answer.status_code == 200 and len(body["results"]) == 2
    assert body["model"] and body["usage"]["total_tokens"] > 0
    assert all(r["document"]["text"] == documents[r["index"]] for r in body["results"])
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


# -- operations: ids, logs, metrics, descriptions ----------------------------------------------


@pytest.mark.e2e
def test_request_ids_json_logs_and_metrics_by_surface(stack: Stack, base_url: str) -> None:
    response = httpx.post(f"{base_url}{COHERE_V2}", json=good_body(COHERE_V2, ["a"]), headers={"x-request-id": "h-77"})
    assert response.headers["x-request-id"] == "h-77" and response.json()["id"] == "h-77"
    generated = httpx.post(f"{base_url}{TEI}", json=good_body(TEI, ["a"])).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    httpx.post(f"{base_url}{NIM}", json={"query": "not an object"})
    deadline = time.monotonic() + 10
    mine: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not mine:
        entries = [json.loads(line) for line in stack.output if line.startswith("{")]
        mine = [e for e in entries if e.get("request_id") == "h-77" and e.get("message") == "call finished"]
        time.sleep(0.2)
    assert mine and mine[0]["surface"] == "cohere" and mine[0]["rpc"] == COHERE_V2 and mine[0]["code"] == 200
    assert stack.metrics_url is not None
    metrics = scrape(stack.metrics_url)
    assert sample(metrics, "rerank_calls_total", surface="cohere", rpc=COHERE_V2, code="200") >= 1
    assert sample(metrics, "rerank_calls_total", surface="tei", rpc=TEI, code="200") >= 1
    assert sample(metrics, "rerank_calls_total", surface="nim", rpc=NIM, code="422") >= 1
    assert sample(metrics, "rerank_call_duration_seconds_count", surface="tei", rpc=TEI) >= 1


@pytest.mark.e2e
def test_openapi_info_health_and_models(base_url: str) -> None:
    spec = httpx.get(f"{base_url}/openapi.json").json()
    assert {COHERE_V1, COHERE_V2, TEI, NIM, "/info", "/health", "/v1/models"} <= set(spec["paths"])
    docs = httpx.get(f"{base_url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    info = httpx.get(f"{base_url}/info").json()
    assert info["max_input_length"] == 512 and info["max_client_batch_size"] == 1000
    assert httpx.get(f"{base_url}/health").status_code == 200
    models = httpx.get(f"{base_url}/v1/models").json()
    # The default model first (TEI's /info describes it), named as requests name it.
    assert models["object"] == "list" and models["data"][0]["id"] == "reranker"
    assert models["data"][0]["root"] == info["model_id"]
    assert models["data"][0]["precision"] == info["model_dtype"] == "fp32"


# -- limits, auth, TLS --------------------------------------------------------------------------


@pytest.mark.e2e
def test_auth_body_and_token_limits(stack: Stack, model_repository: Path) -> None:
    args = ("--auth-token=s3cret", "--max-message-bytes=65536", "--max-total-tokens=2048")
    with frontend(stack, model_repository, *args) as served:
        url = served.http_url
        assert url is not None
        # The same token check as gRPC: Bearer in any case, or the raw token (LlamaIndex's TEI client).
        for value in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "s3cret"):
            still_serving(url, authorization=value)
        for path in ALL:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
                response = httpx.post(f"{url}{path}", json=good_body(path, ["a"]), headers=headers)
                assert_shape(path, response, 401, "token")
                assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no token
        auth = {"authorization": "Bearer s3cret"}
        # The API description needs the token, like gRPC reflection: only health is open.
        for page in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
            assert_shape(COHERE_V2, httpx.get(f"{url}{page}"), 401, "token")
            assert httpx.get(f"{url}{page}", headers=auth).status_code == 200, page
        assert httpx.get(f"{url}/info").status_code == 401 and httpx.get(f"{url}/v1/models").status_code == 401
        # 413 from Content-Length, before the body is read ...
        big = good_body(COHERE_V2, ["x" * 70_000])
        assert_shape(COHERE_V2, httpx.post(f"{url}{COHERE_V2}", json=big, headers=auth), 413, "65536")
        assert_shape(TEI, httpx.post(f"{url}{TEI}", json=good_body(TEI, ["x" * 70_000]), headers=auth), 413)

        # ... and from a chunked body as soon as it passes the limit.
        def chunks() -> Iterator[bytes]:
            yield b'{"query": "q", "documents": ["'
            for _ in range(100):
                yield b"x" * 1024
            yield b'"]}'

        chunked = httpx.post(
            f"{url}{COHERE_V2}", content=chunks(), headers={**auth, "content-type": "application/json"}
        )
        assert_shape(COHERE_V2, chunked, 413, "65536")
        # A request over max_total_tokens: 413 naming the documents, not a 500.
        many_tokens = good_body(NIM, [text(300, seed=i) for i in range(10)], truncate="END")
        assert_shape(NIM, httpx.post(f"{url}{NIM}", json=many_tokens, headers=auth), 413, "passages")
        still_serving(url, **auth)


@pytest.mark.e2e
def test_a_body_of_millions_of_tiny_values_is_refused_from_a_scan(stack: Stack) -> None:
    # 15 MB of `"",` would be parsed into 5 million strings (GBs) before max_documents could refuse them;
    # the gate counts JSON values first and stops at its bound.
    assert stack.http_url is not None
    body = b'{"model": "m", "query": "q", "documents": [' + b'"",' * 5_000_000 + b'""]}'
    frontend_process = psutil.Process(stack.process.pid)
    before = frontend_process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample_rss() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, frontend_process.memory_info().rss)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    try:
        response = httpx.post(
            f"{stack.http_url}{COHERE_V2}", content=body, headers={"content-type": "application/json"}, timeout=60
        )
    finally:
        done.set()
        sampler.join()
    assert_shape(COHERE_V2, response, 413, "max_documents")
    # The body itself is held (about 15 MB, plus its join); never the gigabytes of a parse.
    assert peak - before < 4 * len(body), f"frontend grew {(peak - before) / 2**20:.0f} MiB"
    still_serving(stack.http_url)


@pytest.mark.e2e
def test_tls_with_the_same_files_as_grpc(stack: Stack, model_repository: Path, tmp_path: Path) -> None:
    ca = Authority(tmp_path, "ca")
    server = ca.issue("server", server=True)
    args = (f"--tls-cert-file={server.cert}", f"--tls-key-file={server.key}")
    with frontend(stack, model_repository, *args, credentials=tls_credentials(ca.issued.cert)) as served:
        assert served.http_url is not None
        https = served.http_url.replace("http://127.0.0.1", "https://localhost")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca.issued.cert))) as client:
            response = client.post(f"{https}{COHERE_V2}", json=good_body(COHERE_V2, ["a"]))
            assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{served.http_url}{COHERE_V2}", json=good_body(COHERE_V2, ["a"]), timeout=5)


# -- overload, drain, deadline, Triton down ---------------------------------------------------


def sigterm_once_in_flight(served: Stack) -> None:
    """SIGTERM the frontend once its metrics count tokens in flight (or after 60 s)."""
    assert served.metrics_url is not None
    deadline = time.monotonic() + 60
    while sample(scrape(served.metrics_url), "rerank_inflight_tokens") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    served.process.send_signal(signal.SIGTERM)


@pytest.mark.e2e
def test_overload_is_429_with_retry_after_and_sigterm_drains(stack: Stack, model_repository: Path) -> None:
    args = ("--model-name=reranker_held", "--max-inflight-tokens=10000", "--max-total-tokens=10000")
    with frontend(stack, model_repository, *args, "--shutdown-grace-s=300") as served:
        url = served.http_url
        documents = [text(9000, seed=50)]  # 8192 tokens: one call fills the capacity, HELD_S in Triton's queue
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [
                pool.submit(httpx.post, f"{url}{path}", json=good_body(path, documents, **cutting(path)), timeout=300)
                for path in (COHERE_V2, TEI, NIM, COHERE_V1)
            ]
            responses = [call.result() for call in calls]
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
        for path, response in zip((COHERE_V2, TEI, NIM, COHERE_V1), responses, strict=True):
            if response.status_code == 429:
                assert_shape(path, response, 429, "max_inflight_tokens is 10000")
                assert response.headers["retry-after"] == "1"

        # SIGTERM with a call in flight: new calls get 503, the one in flight finishes, exit 0.
        results: list[httpx.Response] = []
        first = threading.Thread(
            target=lambda: results.append(httpx.post(f"{url}{TEI}", json=good_body(TEI, documents), timeout=300))
        )
        first.start()
        sigterm_once_in_flight(served)
        time.sleep(0.5)
        late = httpx.post(f"{url}{COHERE_V2}", json=good_body(COHERE_V2, ["too late"]), timeout=30)
        assert_shape(COHERE_V2, late, 503, "shutting down")
        assert late.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/health").status_code == 503
        assert httpx.get(f"{url}/v1/health/ready").status_code == 503
        assert httpx.get(f"{url}/v1/health/live").status_code == 200
        first.join(300)
        assert [r.status_code for r in results] == [200]
        assert served.process.wait(60) == 0


@pytest.mark.e2e
def test_deadline_is_504(stack: Stack, model_repository: Path) -> None:
    args = ("--model-name=reranker_held", "--http-timeout-s=0.3")
    with frontend(stack, model_repository, *args) as served:
        url = served.http_url
        for path in ALL:
            started = time.monotonic()
            # Every call is held HELD_S in Triton's queue, past the deadline.
            response = httpx.post(f"{url}{path}", json=good_body(path, [text(30, seed=9)], **cutting(path)), timeout=60)
            assert_shape(path, response, 504, "http_timeout_s")
            assert time.monotonic() - started < HELD_S
        # Triton works off the abandoned calls and their budget comes back; the server serves on (a call
        # with a deadline longer than the hold, over gRPC on the same frontend).
        assert served.metrics_url is not None
        deadline = time.monotonic() + 60
        while sample(scrape(served.metrics_url), "rerank_inflight_tokens") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sample(scrape(served.metrics_url), "rerank_inflight_tokens") == 0
        with RerankClient(served.target, timeout=30, retries=0) as client:
            assert len(client.rerank(QUERY, ["a", "b"]).results) == 2
        assert httpx.get(f"{url}/health").status_code == 200


class Proxy:
    """A TCP relay to Triton the test can cut, to take Triton away from one frontend only."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.mark.e2e
def test_triton_down_is_503_with_retry_after(stack: Stack, model_repository: Path) -> None:
    proxy = Proxy(stack.triton_url.replace("localhost", "127.0.0.1"))
    served = start_serve(
        [
            f"--triton-url=127.0.0.1:{proxy.port}",
            f"--model-repository={model_repository}",
            "--health-interval-s=0.2",
            f"--http-port={free_port()}",
        ]
    )
    try:
        url = served.http_url
        assert url is not None
        still_serving(url)
        proxy.cut()
        for path in ALL:
            response = httpx.post(f"{url}{path}", json=good_body(path, ["a"]), timeout=30)
            assert_shape(path, response, 503, "unavailable")
            assert response.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/health").status_code == 503
        assert served.process.poll() is None
    finally:
        proxy.cut()
        stop_serve(served)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, biased toward the APIs' own field names and near-valid shapes."""
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 3, 2**31, 2**63, -(2**40), 1.5, float(rng.randrange(10))])
    if choice in (3, 4, 5):
        return rng.choice(
            ["", " ", "a", "quick sort", "\u0000", "\ud7ff" * 3, "é" * 50, "Left", "END", "NONE", "x" * 3000]
        )
    if choice in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = [
        "query",
        "documents",
        "texts",
        "passages",
        "text",
        "top_n",
        "model",
        "truncate",
        "truncation_direction",
        "raw_scores",
        "return_text",
        "return_documents",
        "rank_fields",
        "max_chunks_per_doc",
        "max_tokens_per_doc",
    ]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


@pytest.mark.e2e
def test_random_bodies_never_get_a_500(base_url: str) -> None:
    rng = random.Random(7)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for i in range(800):
            path = ALL[i % len(ALL)]
            body = random_json(rng)
            if rng.random() < 0.5:  # near-valid: a correct skeleton with one knob set to a random value
                knob = rng.choice(
                    [
                        "top_n",
                        "truncate",
                        "truncation_direction",
                        "raw_scores",
                        "return_documents",
                        "return_text",
                        "rank_fields",
                        "max_chunks_per_doc",
                        "max_tokens_per_doc",
                        "model",
                    ]
                )
                body = {**good_body(path, ["a", "quick sort"]), knob: random_json(rng, 2)}
            response = client.post(
                path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (path, body, response.text)
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0, statuses
    still_serving(base_url)


@pytest.mark.e2e
def test_a_call_outliving_the_shutdown_grace_gets_503_not_500(stack: Stack, model_repository: Path) -> None:
    with frontend(stack, model_repository, "--model-name=reranker_held", "--shutdown-grace-s=1") as served:
        url = served.http_url
        results: list[httpx.Response] = []

        def call() -> None:
            body = good_body(COHERE_V2, [text(30, seed=i) for i in range(4)])  # held HELD_S, past the grace
            results.append(httpx.post(f"{url}{COHERE_V2}", json=body, timeout=300))

        caller = threading.Thread(target=call)
        caller.start()
        sigterm_once_in_flight(served)
        caller.join(120)
        assert len(results) == 1
        assert_shape(COHERE_V2, results[0], 503, "stopped before the call finished")
        assert served.process.wait(60) == 0
        assert not [line for line in served.output if "Exception in ASGI application" in line]
