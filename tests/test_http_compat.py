"""The vendors' request shapes on the real server where their APIs differ from each other: vLLM's score
and rerank bodies, TEI's truncation_direction, /info and statuses, NIM's probes. Every score is checked
against the gRPC API's answer on the same input (one core, so not a single score may differ)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from tokenizers import Tokenizer

from rerank_client import RerankClient
from rerank_server.export.write import QUEUE_POLICY_PREFETCHING, QUEUE_POLICY_WITH_PRIORITY
from tests.conftest import TOKENIZER_DIR, Stack, one_model_repository, start_local, stop_serve_later, wait_for
from tests.test_http_errors import TEI, VLLM, assert_shape, good_body
from tests.texts import QUERY, text

pytestmark = pytest.mark.e2e

DOCUMENTS = ["beijing is the capital of china", "quick sort in python", "rain", text(700, seed=3)]


@pytest.fixture(scope="module")
def base_url(stack: Stack) -> str:
    assert stack.http_url is not None
    return stack.http_url


@pytest.fixture(scope="module")
def grpc(stack: Stack):
    with RerankClient(stack.target, timeout=60) as client:
        yield client


def scores_by_index(results: Iterable[Any]) -> dict[int, float]:
    return {r.index: r.score for r in results}


# vLLM's switch to logits, under each of its names.
ACTIVATION_OFF = ({"use_activation": False}, {"activation": False}, {"softmax": False})


# -- vLLM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VLLM)
def test_vllm_score_one_to_n_and_n_to_n(base_url: str, grpc: RerankClient, path: str) -> None:
    url = f"{base_url}{path}"
    short = DOCUMENTS[:3]
    expected = scores_by_index(grpc.rerank(QUERY, short).results)
    for text_1 in (QUERY, [QUERY]):  # 1:N, the query as a string or a list of one
        answer = httpx.post(url, json={"model": "reranker", "text_1": text_1, "text_2": short})
        body = answer.json()
        assert answer.status_code == 200, body
        assert body["object"] == "list" and body["id"].startswith("score-") and body["created"] > 0
        assert body["model"] and body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        assert [d["index"] for d in body["data"]] == [0, 1, 2]  # request order, not ranked
        assert all(d["object"] == "score" for d in body["data"])
        assert [d["score"] for d in body["data"]] == pytest.approx([expected[i] for i in range(3)], abs=1e-6)
    # 1:1 with two strings.
    one = httpx.post(url, json={"text_1": QUERY, "text_2": short[1]}).json()
    assert [d["score"] for d in one["data"]] == pytest.approx([expected[1]], abs=1e-6)
    # N:N: pair by pair, the gRPC Score call's answer.
    pairs = [("what is the capital of china", short[0]), (QUERY, short[1]), ("weather", short[2])]
    want = [s.score for s in grpc.score(pairs).scores]
    answer = httpx.post(url, json={"text_1": [a for a, _ in pairs], "text_2": [b for _, b in pairs]}).json()
    assert [d["score"] for d in answer["data"]] == pytest.approx(want, abs=1e-6)
    # use_activation false (or its older names, activation and softmax): logits.
    logits = {r.index: r.logit for r in grpc.rerank(QUERY, short).results}
    for flags in ACTIVATION_OFF:
        raw = httpx.post(url, json={"text_1": QUERY, "text_2": short, **flags}).json()
        assert [d["score"] for d in raw["data"]] == pytest.approx([logits[i] for i in range(3)], abs=1e-5)
    # The first name set decides, in vLLM's order: softmax, activation, use_activation.
    kept = httpx.post(url, json={"text_1": QUERY, "text_2": short, "softmax": True, "use_activation": False}).json()
    assert [d["score"] for d in kept["data"]] == pytest.approx([expected[i] for i in range(3)], abs=1e-6)


@pytest.mark.parametrize("path", VLLM)
def test_vllm_score_lengths_and_truncate_prompt_tokens(base_url: str, grpc: RerankClient, path: str) -> None:
    url = f"{base_url}{path}"
    mismatched = httpx.post(url, json={"text_1": ["a", "b"], "text_2": ["a", "b", "c"]})
    assert_shape(path, mismatched, 400, "text_2", "1:1, 1:N or N:N")
    assert_shape(path, httpx.post(url, json={"text_1": [], "text_2": ["a"]}), 400, "text_1")
    # Absent: an input past the model's length is refused, as vLLM does; -1 cuts at the model's; k at k.
    long = DOCUMENTS[3]
    assert_shape(path, httpx.post(url, json={"text_1": QUERY, "text_2": [long]}), 400, "text_2[0]", "does not fit")
    full = grpc.rerank(QUERY, [long]).results[0].score
    capped = grpc.rerank(QUERY, [long], max_length=48).results[0].score
    assert capped != pytest.approx(full, abs=1e-6)
    for k, want in ((-1, full), (48, capped)):
        answer = httpx.post(url, json={"text_1": QUERY, "text_2": [long], "truncate_prompt_tokens": k}).json()
        assert answer["data"][0]["score"] == pytest.approx(want, abs=1e-6)
    too_many = httpx.post(url, json={"text_1": QUERY, "text_2": [long], "truncate_prompt_tokens": 100000})
    assert_shape(path, too_many, 400, "truncate_prompt_tokens", "512")
    assert_shape(path, httpx.post(url, json={"text_1": QUERY, "text_2": "a", "truncate_prompt_tokens": -2}), 400)
    # Too small for any text: the error names the field the request set, not the core's max_length.
    small = httpx.post(url, json={"text_1": QUERY, "text_2": "a", "truncate_prompt_tokens": 4})
    assert "max_length" not in assert_shape(path, small, 400, "truncate_prompt_tokens: 4 leaves no room")


@pytest.mark.parametrize("path", VLLM)
def test_vllm_score_takes_vllms_other_names_for_the_two_sides(base_url: str, grpc: RerankClient, path: str) -> None:
    """vLLM's score request names its sides text_1 and text_2, or queries and documents (or items), or data_1
    and data_2: the same pairs, and errors name the fields the body used."""
    url = f"{base_url}{path}"
    short = DOCUMENTS[:3]
    expected = scores_by_index(grpc.rerank(QUERY, short).results)
    for first, second in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
        answer = httpx.post(url, json={first: QUERY, second: short})
        assert answer.status_code == 200, answer.text
        assert [d["score"] for d in answer.json()["data"]] == pytest.approx([expected[i] for i in range(3)], abs=1e-6)
    mismatched = httpx.post(url, json={"queries": ["a", "b"], "documents": ["a", "b", "c"]})
    assert_shape(path, mismatched, 400, "documents", "1:1, 1:N or N:N")
    assert_shape(path, httpx.post(url, json={"queries": QUERY}), 400, "documents: is required")
    assert_shape(path, httpx.post(url, json={"queries": [], "documents": ["a"]}), 400, "queries")
    assert_shape(path, httpx.post(url, json={"queries": QUERY, "documents": [DOCUMENTS[3]]}), 400, "documents[0]")


def test_vllm_truncation_side_left_keeps_the_documents_last_tokens(base_url: str, grpc: RerankClient) -> None:
    long = DOCUMENTS[3]
    start = grpc.rerank(QUERY, [long], truncation="start", max_length=48).results[0]
    end = grpc.rerank(QUERY, [long], max_length=48).results[0]
    assert start.score != pytest.approx(end.score, abs=1e-6)
    cut = {"truncate_prompt_tokens": 48}
    for side, want in (("left", start.score), ("right", end.score), (None, end.score)):
        sided = {**cut, "truncation_side": side} if side else cut
        for path in VLLM:
            answer = httpx.post(f"{base_url}{path}", json={"text_1": QUERY, "text_2": [long], **sided}).json()
            assert answer["data"][0]["score"] == pytest.approx(want, abs=1e-6), (path, side)
        for path in (TEI, "/v1/rerank"):  # vLLM's rerank body
            answer = httpx.post(f"{base_url}{path}", json={"query": QUERY, "documents": [long], **sided}).json()
            assert answer["results"][0]["relevance_score"] == pytest.approx(want, abs=1e-6), (path, side)
    # The side applies with truncate_prompt_tokens only: without it a document that does not fit is refused.
    alone = httpx.post(f"{base_url}{VLLM[0]}", json={"text_1": QUERY, "text_2": [long], "truncation_side": "left"})
    assert_shape(VLLM[0], alone, 400, "does not fit")


def test_vllm_rerank_body_on_the_tei_path(base_url: str, grpc: RerankClient) -> None:
    """POST /rerank with `documents` is vLLM's rerank: its answer shape, best first, documents echoed."""
    expected = grpc.rerank(QUERY, DOCUMENTS[:3]).results
    body = {"model": "reranker", "query": QUERY, "documents": DOCUMENTS[:3], "top_n": 2}
    answer = httpx.post(f"{base_url}{TEI}", json=body)
    got = answer.json()
    assert answer.status_code == 200, got
    assert got["id"].startswith("rerank-") and got["model"] and got["usage"]["total_tokens"] > 0
    assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"]  # vLLM's RerankUsage has both
    assert [r["index"] for r in got["results"]] == [r.index for r in expected[:2]]
    assert [r["relevance_score"] for r in got["results"]] == pytest.approx([r.score for r in expected[:2]], abs=1e-6)
    assert [r["document"]["text"] for r in got["results"]] == [DOCUMENTS[r.index] for r in expected[:2]]
    every = httpx.post(f"{base_url}{TEI}", json={**body, "top_n": 0, "return_documents": False}).json()
    assert len(every["results"]) == 3 and all("document" not in r for r in every["results"])
    # use_activation false (or its older names): logits, best first as before.
    for flags in ACTIVATION_OFF:
        raw = httpx.post(f"{base_url}{TEI}", json={**body, **flags}).json()
        assert [r["index"] for r in raw["results"]] == [r.index for r in expected[:2]]
        assert [r["relevance_score"] for r in raw["results"]] == pytest.approx(
            [r.logit for r in expected[:2]], abs=1e-5
        )
    small = httpx.post(f"{base_url}{TEI}", json={**body, "truncate_prompt_tokens": 4})
    assert "max_length" not in assert_shape(TEI, small, 422, "truncate_prompt_tokens: 4 leaves no room")
    # The TEI body on the same path keeps TEI's answer.
    tei = httpx.post(f"{base_url}{TEI}", json=good_body(TEI, DOCUMENTS[:3])).json()
    assert isinstance(tei, list) and {"index", "score"} == set(tei[0])
    # A vLLM body's errors take the path's (TEI's) shape.
    assert_shape(TEI, httpx.post(f"{base_url}{TEI}", json={**body, "top_n": -1}), 422, "top_n")


# -- TEI ----------------------------------------------------------------------------------------


def test_tei_left_and_grpc_start_truncation_keep_the_texts_last_tokens(base_url: str, grpc: RerankClient) -> None:
    tail = text(600, seed=9)
    documents = ["alpha " * 400 + tail, "omega " * 400 + tail]  # different starts, the same last tokens
    url = f"{base_url}{TEI}"
    left = httpx.post(url, json=good_body(TEI, documents, truncation_direction="Left", raw_scores=True)).json()
    right = httpx.post(url, json=good_body(TEI, documents, truncation_direction="Right", raw_scores=True)).json()
    left_scores = {r["index"]: r["score"] for r in left}
    right_scores = {r["index"]: r["score"] for r in right}
    assert left_scores[0] == pytest.approx(left_scores[1], abs=1e-6)
    assert right_scores[0] != pytest.approx(right_scores[1], abs=1e-3)
    # Exactly the pair [CLS] query [SEP] <the last tokens that fit> [SEP], scored through gRPC.
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    room = 512 - 3 - len(tokenizer.encode(QUERY, add_special_tokens=False).ids)
    ids = tokenizer.encode(documents[0], add_special_tokens=False).ids
    suffix = tokenizer.decode(ids[-room:])
    assert tokenizer.encode(suffix, add_special_tokens=False).ids == ids[-room:]
    assert left_scores[0] == pytest.approx(grpc.rerank(QUERY, [suffix], truncation="none").results[0].logit, abs=1e-5)
    # gRPC's TRUNCATION_START is the same cut.
    start = {r.index: r.logit for r in grpc.rerank(QUERY, documents, truncation="start").results}
    assert start == pytest.approx(left_scores, abs=1e-6)
    # TEI takes each direction lowercase too.
    for direction, want in (("left", left_scores), ("right", right_scores)):
        answer = httpx.post(url, json=good_body(TEI, documents, truncation_direction=direction, raw_scores=True))
        assert answer.status_code == 200, answer.text
        assert {r["index"]: r["score"] for r in answer.json()} == pytest.approx(want, abs=1e-6)


def test_tei_info_fields_and_statuses(base_url: str) -> None:
    info = httpx.get(f"{base_url}/info").json()
    for field in ("max_concurrent_requests", "max_batch_requests", "auto_truncate", "sha", "docker_label"):
        assert field in info, field
    assert info["auto_truncate"] is True and info["max_concurrent_requests"] > 0
    assert info["served_model_name"] == "reranker"  # the default model, named as requests name it
    url = f"{base_url}{TEI}"

    def error_type(response: httpx.Response, status: int, *fragments: str) -> str:
        assert_shape(TEI, response, status, *fragments)
        return str(response.json()["error_type"])

    # 413: TEI's validation errors. 400: no texts. 422: a body it cannot read, a text the tokenizer cannot take.
    assert error_type(httpx.post(url, json=good_body(TEI, ["a"] * 1001)), 413, "max_documents") == "Validation"
    too_long = httpx.post(url, json=good_body(TEI, [DOCUMENTS[3]], truncate=False))
    assert error_type(too_long, 413, "does not fit") == "Validation"
    assert error_type(httpx.post(url, json={"query": "q", "texts": []}), 400, "texts") == "Empty"
    surrogate = b'{"query": "q", "texts": ["ok", "bad \\ud800 text"]}'
    response = httpx.post(url, content=surrogate, headers={"content-type": "application/json"})
    assert error_type(response, 422, "texts[1]", "lone surrogate") == "Tokenizer"
    assert error_type(httpx.post(url, json={"query": "q"}), 422, "texts") == "Validation"


# -- NIM ----------------------------------------------------------------------------------------


def test_nim_health_routes(stack: Stack) -> None:
    assert stack.http_url is not None
    for path, message in (("/v1/health/live", "Service is live."), ("/v1/health/ready", "Service is ready.")):
        response = httpx.get(f"{stack.http_url}{path}")
        assert response.status_code == 200 and response.json() == {"object": "health.response", "message": message}


def test_v1_models_lists_openai_model_objects(base_url: str, grpc: RerankClient) -> None:
    """Each entry has the fields OpenAI's model object requires (typed OpenAI clients, which vLLM's and NIM's
    users point here, refuse one without `created`), and vLLM's max_model_len."""
    listed = httpx.get(f"{base_url}/v1/models").json()["data"]
    for entry in listed:
        assert entry["object"] == "model" and isinstance(entry["id"], str) and isinstance(entry["owned_by"], str)
        assert isinstance(entry["created"], int) and 0 < entry["created"] <= time.time()
        assert entry["max_model_len"] == grpc.model_info(model=entry["id"]).max_length
    assert listed[0]["id"] == "reranker" and listed[0]["max_model_len"] == 512


# -- Cohere v1 and Jina on /v1/rerank, Cohere v2 -------------------------------------------------

COHERE_SDK = {"x-fern-sdk-name": "cohere"}  # what every Cohere SDK sends


def v1(base_url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.post(f"{base_url}/v1/rerank", json={"model": "reranker", **body}, headers=headers)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_cohere_object_documents_are_echoed_and_non_strings_written_as_json(base_url: str, grpc: RerankClient) -> None:
    sent = {"title": "x", "text": "violet", "year": 2020, "draft": False, "tags": ["a", "b"], "extra": {"k": 1}}
    body = {"query": QUERY, "documents": [sent], "rank_fields": ["title", "year", "draft", "tags", "text"]}
    answer = v1(base_url, {**body, "return_documents": True})
    assert answer["results"][0]["document"] == sent
    ranked_on = 'title: x\nyear: 2020\ndraft: false\ntags: ["a", "b"]\ntext: violet'
    want = grpc.rerank(QUERY, [ranked_on]).results[0].score
    assert answer["results"][0]["relevance_score"] == pytest.approx(want, abs=1e-6)
    # Without rank_fields the `text` field is ranked, a number written as JSON too.
    number = v1(base_url, {"query": QUERY, "documents": [{"text": 42}]}, COHERE_SDK)
    assert number["results"][0]["relevance_score"] == pytest.approx(grpc.rerank(QUERY, ["42"]).results[0].score)


def test_max_chunks_per_doc_is_a_cap_with_coheres_default_and_limit(base_url: str, grpc: RerankClient) -> None:
    long = text(3000, seed=11)  # about 3,000 tokens: several 512-token windows
    end = grpc.rerank(QUERY, [long]).results[0].score
    chunked = grpc.rerank(QUERY, [long], truncation="chunk").results[0]
    assert 2 < chunked.windows <= 10
    # A cap of one window scores the document's first window: END's score.
    one = v1(base_url, {"query": QUERY, "documents": [long], "max_chunks_per_doc": 1})
    assert one["results"][0]["relevance_score"] == pytest.approx(end, abs=1e-6)
    # A Cohere call without it: Cohere's default (10 windows), here every window.
    default = v1(base_url, {"query": QUERY, "documents": [long]}, COHERE_SDK)
    assert default["results"][0]["relevance_score"] == pytest.approx(chunked.score, abs=1e-6)
    assert "document" not in default["results"][0]
    # documents x chunks past 10,000 is refused, as Cohere does; at it, served.
    many = {"query": QUERY, "documents": ["a"] * 101, "max_chunks_per_doc": 100}
    refused = httpx.post(f"{base_url}/v1/rerank", json=many)
    assert refused.status_code == 400 and "max_chunks_per_doc" in refused.json()["message"]
    assert len(v1(base_url, {**many, "documents": ["a"] * 100})["results"]) == 100
    assert len(v1(base_url, {"query": QUERY, "documents": ["a"] * 1000}, COHERE_SDK)["results"]) == 1000


def test_a_jina_call_gets_jinas_defaults(base_url: str, grpc: RerankClient) -> None:
    """No Cohere SDK header, no Cohere-only field: documents returned, long documents cut at their end."""
    answer = v1(base_url, {"model": "reranker", "query": QUERY, "documents": DOCUMENTS})
    expected = grpc.rerank(QUERY, DOCUMENTS).results
    assert [r["index"] for r in answer["results"]] == [r.index for r in expected]
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx([r.score for r in expected], abs=1e-6)
    assert [r["document"]["text"] for r in answer["results"]] == [DOCUMENTS[r.index] for r in expected]
    assert answer["model"] and answer["usage"]["total_tokens"] > 0
    hidden = v1(base_url, {"query": QUERY, "documents": DOCUMENTS, "return_documents": False})
    assert all("document" not in r for r in hidden["results"])


def test_vllm_rerank_body_on_the_v1_path(base_url: str, grpc: RerankClient) -> None:
    body = {"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "truncate_prompt_tokens": 48, "priority": 3}
    answer = v1(base_url, body)
    expected = grpc.rerank(QUERY, DOCUMENTS, max_length=48).results[:2]
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx([r.score for r in expected], abs=1e-6)
    assert [r["document"]["text"] for r in answer["results"]] == [DOCUMENTS[r.index] for r in expected]
    assert answer["model"] and answer["usage"]["total_tokens"] > 0
    every = v1(base_url, {**body, "top_n": 0})  # vLLM's default: all of them
    assert len(every["results"]) == len(DOCUMENTS)
    # use_activation false (or its older names): logits; a Cohere or Jina call that does not send it gets scores.
    for flags in ACTIVATION_OFF:
        raw = v1(base_url, {**body, **flags})
        assert [r["relevance_score"] for r in raw["results"]] == pytest.approx([r.logit for r in expected], abs=1e-5)
    full = grpc.rerank(QUERY, DOCUMENTS[:3]).results
    for headers in (COHERE_SDK, None):
        scored = v1(base_url, {"query": QUERY, "documents": DOCUMENTS[:3]}, headers)
        assert [r["relevance_score"] for r in scored["results"]] == pytest.approx([r.score for r in full], abs=1e-6)


def test_cohere_v2_priority_is_accepted(base_url: str) -> None:
    body = {"model": "reranker", "query": QUERY, "documents": DOCUMENTS[:2], "priority": 5}
    assert httpx.post(f"{base_url}/v2/rerank", json=body).status_code == 200
    refused = httpx.post(f"{base_url}/v2/rerank", json={**body, "priority": -1})
    assert refused.status_code == 400 and "priority" in refused.json()["message"]


def test_cohere_v2_max_tokens_per_doc_cuts_each_document(base_url: str, grpc: RerankClient) -> None:
    """Each document is cut to its first max_tokens_per_doc tokens, as Cohere does: the query does not count,
    so a cap below the query's length is answered, and the model's limit still bounds the input."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    cap = 5
    assert len(tokenizer.encode(QUERY, add_special_tokens=False).ids) > cap
    documents = [DOCUMENTS[3], "rain"]  # about 900 tokens, and one token
    ids = tokenizer.encode(documents[0], add_special_tokens=False).ids[:cap]
    head = tokenizer.decode(ids)
    assert tokenizer.encode(head, add_special_tokens=False).ids == ids
    want = {r.index: r.score for r in grpc.rerank(QUERY, [head, documents[1]], truncation="none").results}
    url = f"{base_url}/v2/rerank"
    answer = httpx.post(url, json={"query": QUERY, "documents": documents, "max_tokens_per_doc": cap})
    assert answer.status_code == 200, answer.text
    assert {r["index"]: r["relevance_score"] for r in answer.json()["results"]} == pytest.approx(want, abs=1e-6)
    # Past the model's limit the cap changes nothing: the document is cut to fit, as without it.
    full = {r.index: r.score for r in grpc.rerank(QUERY, documents).results}
    huge = httpx.post(url, json={"query": QUERY, "documents": documents, "max_tokens_per_doc": 4096}).json()
    assert {r["index"]: r["relevance_score"] for r in huge["results"]} == pytest.approx(full, abs=1e-6)


def test_cohere_v2_takes_its_first_versions_fields(base_url: str, grpc: RerankClient) -> None:
    """Object documents with rank_fields, return_documents and max_chunks_per_doc, as v2's first version took
    them (older Cohere SDKs, LiteLLM): ranked and echoed as on v1."""
    sent = [{"title": "capital", "text": DOCUMENTS[0], "id": "a"}, {"text": DOCUMENTS[2]}]
    body = {"query": QUERY, "documents": sent, "rank_fields": ["title", "text"], "return_documents": True}
    answer = httpx.post(f"{base_url}/v2/rerank", json=body)
    assert answer.status_code == 200, answer.text
    ranked_on = [f"title: capital\ntext: {DOCUMENTS[0]}", f"text: {DOCUMENTS[2]}"]
    want = {r.index: r.score for r in grpc.rerank(QUERY, ranked_on).results}
    results = answer.json()["results"]
    assert {r["index"]: r["relevance_score"] for r in results} == pytest.approx(want, abs=1e-6)
    assert [r["document"] for r in results] == [sent[r["index"]] for r in results]
    # Without rank_fields an object is ranked on its `text`.
    plain = httpx.post(f"{base_url}/v2/rerank", json={"query": QUERY, "documents": [{"text": DOCUMENTS[0]}]}).json()
    assert plain["results"][0]["relevance_score"] == pytest.approx(grpc.rerank(QUERY, DOCUMENTS[:1]).results[0].score)
    long = text(3000, seed=11)
    chunked = grpc.rerank(QUERY, [long], truncation="chunk").results[0].score
    answer = httpx.post(f"{base_url}/v2/rerank", json={"query": QUERY, "documents": [long], "max_chunks_per_doc": 10})
    assert answer.json()["results"][0]["relevance_score"] == pytest.approx(chunked, abs=1e-6)
    both = {"query": QUERY, "documents": [long], "max_chunks_per_doc": 10, "max_tokens_per_doc": 100}
    refused = httpx.post(f"{base_url}/v2/rerank", json=both)
    assert refused.status_code == 400 and "max_tokens_per_doc" in refused.json()["message"]


# -- priority (Cohere v2, vLLM, gRPC) ---------------------------------------------------------------------


def _pending(stack: Stack) -> int:
    """Requests waiting in Triton's queue for the model (Triton's own gauge)."""
    assert stack.triton_metrics_url is not None
    text_format = httpx.get(stack.triton_metrics_url, timeout=10).text
    lines = [line for line in text_format.splitlines() if line.startswith("nv_inference_pending_request_count{")]
    assert lines, "Triton exports nv_inference_pending_request_count"
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in lines)


# Four times max_batch_size: the queue behind the batch the stopped stub holds is long enough to tell a call
# answered ahead of it (most of it still queued) from one answered behind it (less than a batch left).
DOCUMENTS_QUEUED = 128


def _settled_pending(stack: Stack, at_least: int, quiet_s: float = 0.5) -> int:
    """Triton's queue length once it is at least `at_least` and has not changed for `quiet_s`."""
    wait_for(lambda: _pending(stack) >= at_least, f"{at_least} requests queued")
    count, since = _pending(stack), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.02)
        now = _pending(stack)
        if now != count:
            count, since = now, time.monotonic()
    return count


# How a run of _jump_the_queue sends a call: (stack, documents, priority or None for the default) -> how many
# results came back. Each raises on a failed call.
Send = Callable[[Stack, list[str], int | None], int]


def _cohere_v2(stack: Stack, documents: list[str], priority: int | None) -> int:
    body: dict[str, Any] = {"query": QUERY, "documents": documents}
    if priority is not None:
        body["priority"] = priority
    answer = httpx.post(f"{stack.http_url}/v2/rerank", json=body, timeout=600)
    assert answer.status_code == 200, answer.text[:500]
    return len(answer.json()["results"])


def _grpc(stack: Stack, documents: list[str], priority: int | None) -> int:
    with RerankClient(stack.target, timeout=600) as client:
        return len(client.rerank(QUERY, documents, priority=priority).results)


def _jump_the_queue(stack: Stack, background_priority: int, send: Send = _cohere_v2) -> tuple[int, bool, int]:
    """A call of DOCUMENTS_QUEUED documents at `background_priority`, each its own Triton request, queued
    while the model's stub is stopped (SIGSTOP: Triton keeps queueing, nothing runs); then a one-document
    call at the default priority joins the queue, and the stub resumes; `send` sends both (Cohere v2 or
    gRPC). Returns how many requests still waited in Triton's queue when the small call was answered,
    whether the large call had been answered by then, and how many waited before the small call joined."""
    # ~450-token pairs: a batch of them takes the tiny model long enough (about 0.5 s here) that the small
    # call's answer reaches the test before the queue behind it drains.
    documents = [text(400, seed=background_priority * 10_000 + i) for i in range(DOCUMENTS_QUEUED)]
    tritonserver = next(p for p in psutil.Process(stack.process.pid).children() if p.name() == "tritonserver")
    (stub,) = [p for p in tritonserver.children() if "stub" in p.name()]
    stub.suspend()
    try:
        with ThreadPoolExecutor(2) as pool:
            background = pool.submit(send, stack, documents, background_priority)
            # All but the batch handed to the stopped stub wait in the queue. That batch may be smaller than
            # max_batch_size (the batcher forms it while requests still arrive), so the count must settle
            # before the small call is sent: a count still rising would be read as the small call's request.
            queued = _settled_pending(stack, DOCUMENTS_QUEUED - 32)
            first = pool.submit(send, stack, ["beijing"], None)
            wait_for(lambda: _pending(stack) == queued + 1, "the small call's request queued")
            stub.resume()
            answered = first.result()
            left, done = _pending(stack), background.done()
            answer = background.result()
    finally:
        stub.resume()
    assert answered == 1 and answer == DOCUMENTS_QUEUED, (answered, answer)
    return left, done, queued


def test_triton_priority_export_orders_tritons_queue_over_cohere_v2_and_grpc(
    model_repository: Path, tmp_path: Path
) -> None:
    """In a model exported with --triton-priority, priority 0 (the default) runs before later priorities
    waiting in Triton's queue, over Cohere v2 and over gRPC; among calls of one priority the queue keeps
    arrival order. Each pair is its own Triton request here (--triton-request-max-tokens 64), and the score
    cache is off, so every run computes every pair."""
    # The tests' reranker with the dynamic_batching block `rerank export --triton-priority` writes.
    repository = tmp_path / "repository"
    shutil.copytree(model_repository / "reranker", repository / "reranker", symlinks=True)
    config = repository / "reranker" / "config.pbtxt"
    assert QUEUE_POLICY_PREFETCHING in config.read_text()
    config.write_text(config.read_text().replace(QUEUE_POLICY_PREFETCHING, QUEUE_POLICY_WITH_PRIORITY))
    stack = start_local(repository, "--triton-request-max-tokens=64", "--score-cache-bytes=0")
    try:
        # Same priority: the small call waits behind every request queued before it.
        left, done, _ = _jump_the_queue(stack, background_priority=0)
        assert left < 32, left
        # A later priority: the small call goes into the next batch Triton forms, ahead of the large call.
        # The model answers each request of an execution once its own pairs are scored (shortest first): the
        # small call's answer comes before that execution's long pairs are done, so before the next execution
        # takes its max_batch_size (32) requests from the queue.
        for send in (_cohere_v2, _grpc):  # gRPC: RerankRequest.priority, through the Python SDK
            left, done, queued = _jump_the_queue(stack, background_priority=1, send=send)
            assert left >= queued - 31 and not done, (left, done, queued)
    finally:
        stop_serve_later(stack)


def test_the_default_export_answers_every_priority_in_arrival_order(model_repository: Path, tmp_path: Path) -> None:
    """The default config.pbtxt has no priority levels (so that Triton's batcher prefetches): a call above 0
    is answered, not refused, and Triton's queue keeps arrival order (it reads every priority as its default)."""
    repository = one_model_repository(model_repository, tmp_path / "repository")
    assert "priority_levels" not in (repository / "reranker" / "config.pbtxt").read_text()
    stack = start_local(repository, "--triton-request-max-tokens=64", "--score-cache-bytes=0")
    try:
        left, _, _ = _jump_the_queue(stack, background_priority=1)
        assert left < 32, left
    finally:
        stop_serve_later(stack)
