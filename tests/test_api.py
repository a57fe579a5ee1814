"""The complete API on a real Triton: truncation modes, Score, RerankStream, GetModelInfo, duplicates,
limits and their errors, deadlines and cancellation, hard text, 8192-token documents."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from rerank_client import (
    AsyncRerankClient,
    CancelledError,
    InvalidRequestError,
    RerankClient,
    RerankError,
    RerankResult,
    RerankStreamResponse,
    RerankTimeoutError,
    ResourceExhaustedError,
    from_stream_error,
    stream_request,
)
from tests.conftest import Stack, frontend, run_rerank
from tests.reference import eager
from tests.texts import QUERY, mixed_documents, text

pytestmark = pytest.mark.e2e

ATOL = 1e-4


@pytest.fixture(scope="module")
def client(stack: Stack):
    with RerankClient(stack.target, timeout=120) as c:
        yield c


def by_index(response) -> dict[int, RerankResult]:
    return {r.index: r for r in response.results}


# -- truncation ------------------------------------------------------------------------------


def test_end_truncation_with_a_per_request_max_length_matches_eager(client: RerankClient, checkpoints) -> None:
    documents = mixed_documents()
    response = client.rerank(QUERY, documents, truncation="end", max_length=48)
    reference = eager(checkpoints["reranker"])
    results = by_index(response)
    logits = [results[i].logit for i in range(len(documents))]
    np.testing.assert_allclose(logits, reference.logits(QUERY, documents, max_length=48), atol=ATOL)
    full = [len(reference.encode(QUERY, d)) for d in documents]
    assert [results[i].truncated for i in range(len(documents))] == [n > 48 for n in full]
    assert response.usage.truncated_documents == sum(n > 48 for n in full)
    assert all(r.windows == 1 for r in response.results)


def test_chunk_scores_are_the_max_over_windows_computed_with_eager(client: RerankClient, checkpoints) -> None:
    reference = eager(checkpoints["reranker"])
    documents = [text(5, seed=1), text(120, seed=2), text(400, seed=3), text(40, seed=4)]
    max_length, overlap = 64, 16
    response = client.rerank(QUERY, documents, truncation="chunk", max_length=max_length, chunk_overlap=overlap)
    results = by_index(response)
    total_windows = 0
    for i, document in enumerate(documents):
        best, windows = reference.chunk_logits(QUERY, document, max_length, overlap)
        assert results[i].windows == windows
        assert results[i].logit == pytest.approx(best, abs=ATOL)
        assert not results[i].truncated
        total_windows += windows
    assert results[2].windows > 5, "the long document was not split"
    assert response.usage.model_inputs == total_windows


def test_chunk_overlap_defaults_to_the_servers(client: RerankClient, checkpoints) -> None:
    info = client.model_info()
    document = text(400, seed=3)
    default = client.rerank(QUERY, [document], truncation="chunk", max_length=64)
    room = 64 - 3 - len(eager(checkpoints["reranker"]).tokenizer(QUERY, add_special_tokens=False)["input_ids"])
    overlap = min(info.limits.default_chunk_overlap, room // 2)
    explicit = client.rerank(QUERY, [document], truncation="chunk", max_length=64, chunk_overlap=overlap)
    assert default.results[0].windows == explicit.results[0].windows
    assert default.results[0].logit == explicit.results[0].logit


def test_none_truncation_refuses_a_pair_that_does_not_fit(client: RerankClient, checkpoints) -> None:
    reference = eager(checkpoints["reranker"])
    documents = ["short", text(80, seed=9), "also short"]
    assert len(reference.tokenizer([QUERY], [documents[1]])["input_ids"][0]) > 64
    with pytest.raises(InvalidRequestError) as caught:
        client.rerank(QUERY, documents, truncation="none", max_length=64)
    # The document is tokenized only as far as the answer needs, so the length is a bound.
    assert "documents[1]: does not fit: with the query it is more than 64 tokens long and max_length is 64" in str(
        caught.value
    )
    assert [(v.field, v.description.startswith("does not fit")) for v in caught.value.field_violations] == [
        ("documents[1]", True)
    ]
    fine = client.rerank(QUERY, ["short", "also short"], truncation="none", max_length=64)
    assert len(fine.results) == 2


# -- Score, duplicates, model info -----------------------------------------------------------


def test_score_answers_pairs_in_request_order(client: RerankClient, checkpoints) -> None:
    reference = eager(checkpoints["reranker"])
    pairs = [(QUERY, text(30, seed=1)), ("another question", "an answer"), ("", "empty text_a"), (QUERY, "")]
    response = client.score(pairs)
    expected = [reference.logits(a, [b])[0] for a, b in pairs]
    np.testing.assert_allclose([s.logit for s in response.scores], expected, atol=ATOL)
    np.testing.assert_allclose([s.score for s in response.scores], 1 / (1 + np.exp(-np.array(expected))), atol=1e-5)
    assert response.model == "reranker"
    with pytest.raises(InvalidRequestError, match="pairs: must hold at least one pair"):
        client.score([])


def test_identical_documents_are_scored_once_and_answered_for_each_index(client: RerankClient) -> None:
    a, b = text(30, seed=1), text(12, seed=2)
    documents = [a, b, a, a, b, "third"]
    response = client.rerank(QUERY, documents, return_documents=True)
    single = client.rerank(QUERY, [a, b, "third"])
    assert response.usage.model_inputs == 3
    assert response.usage.input_tokens == single.usage.input_tokens
    results = by_index(response)
    assert results[0].logit == results[2].logit == results[3].logit
    assert results[1].logit == results[4].logit
    assert [results[i].document for i in range(6)] == documents
    pairs = client.score([(QUERY, a), ("other", a), (QUERY, a)])
    assert pairs.usage.model_inputs == 2 and pairs.scores[0].logit == pairs.scores[2].logit


def test_model_info_describes_the_model_and_limits(client: RerankClient) -> None:
    info = client.model_info()
    assert info.model == "reranker"
    assert info.max_length == 512
    assert info.precision == "fp32"
    assert info.triton_model_name == "reranker" and info.triton_model_version == "1"
    assert info.tokenizer == "BPE, 50368 ids"
    assert info.limits.max_documents == 1000
    assert info.limits.max_query_tokens == 2048
    assert info.limits.max_total_tokens > 0 and info.limits.max_message_bytes == 16 * 1024 * 1024


# -- limits and errors -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(stack: Stack, model_repository: Path):
    """A frontend with small limits, on the same Triton."""
    args = ("--max-documents=4", "--max-total-tokens=600", "--max-query-tokens=12", "--max-message-bytes=20000")
    with frontend(stack, model_repository, *args) as served, RerankClient(served.target, timeout=60) as c:
        yield c


def test_limits_are_reported_by_model_info(limited: RerankClient) -> None:
    limits = limited.model_info().limits
    assert (limits.max_documents, limits.max_total_tokens, limits.max_query_tokens, limits.max_message_bytes) == (
        4,
        600,
        12,
        20000,
    )


@pytest.mark.parametrize(
    ("call", "error", "field", "words"),
    [
        (lambda c: c.rerank(QUERY, ["d"] * 5), InvalidRequestError, "documents", "max_documents"),
        (lambda c: c.score([("a", "b")] * 5), InvalidRequestError, "pairs", "max_documents"),
        (lambda c: c.rerank(text(40), ["d"]), InvalidRequestError, "query", "max_query_tokens"),
        (lambda c: c.score([("a", "b"), (text(40), "d")]), InvalidRequestError, "pairs[1].text_a", "max_query_tokens"),
        (
            lambda c: c.rerank(QUERY, [text(200, seed=i) for i in range(4)]),
            ResourceExhaustedError,
            "documents",
            "max_total_tokens",
        ),
        (
            lambda c: c.rerank(QUERY, [text(600)], truncation="chunk"),
            ResourceExhaustedError,
            "documents",
            "max_total_tokens",
        ),
        (
            lambda c: c.rerank(QUERY, ["d"], max_length=100000),
            InvalidRequestError,
            "max_length",
            "exceeds the model's 512",
        ),
        (lambda c: c.rerank(QUERY, ["d"], max_length=3), InvalidRequestError, "max_length", "no room"),
        (
            lambda c: c.rerank(QUERY, [text(100)], truncation="chunk", max_length=32, chunk_overlap=30),
            InvalidRequestError,
            "chunk_overlap",
            "smaller than a window",
        ),
        (lambda c: c.rerank("", ["d"]), InvalidRequestError, "query", "must not be empty"),
        (lambda c: c.rerank(QUERY, []), InvalidRequestError, "documents", "at least one"),
    ],
)
def test_each_limit_and_error_names_its_field(limited: RerankClient, call, error, field: str, words: str) -> None:
    with pytest.raises(error) as caught:
        call(limited)
    assert words in caught.value.details
    assert [v.field for v in caught.value.field_violations] == [field]
    assert words in caught.value.field_violations[0].description
    assert len(limited.rerank(QUERY, ["still serving"]).results) == 1


# What no refusal may show: pydantic's or protobuf's own words, a Python class, an internal type name.
LEAKS = ("Input should", "errors.pydantic.dev", "<class", "Error parsing", "dict[str", "instance of", "Traceback")


def assert_plain(details: str, violations: list, field: str | None = None) -> None:
    """A refusal in plain words: none of LEAKS, no caller's value repeated past 64 characters (errors.cut), and
    `field` named once, at the start, its violation's description the message's words after it."""
    assert not re.search(r"(.)\1{64}", details), details[:300]
    assert len(details) < 400, details[:300]
    assert not [leak for leak in LEAKS if leak in details], details
    if field is not None:
        named = re.findall(rf"(?<![\w.\[]){re.escape(field)}(?![\w\[])", details)  # not max_query_tokens's
        assert details.startswith(f"{field}: ") and len(named) == 1, details
        assert [(v.field, v.description) for v in violations] == [(field, details.removeprefix(f"{field}: "))]


@pytest.mark.parametrize(
    ("call", "field", "words"),
    [
        (lambda c: c.rerank(QUERY, ["d"], model="m" * 5000), "model", "(5,000 characters) is not served here"),
        (lambda c: c.rerank(QUERY, ["d"], max_length=100000), "max_length", "100000 exceeds the model's 512"),
        (lambda c: c.rerank(QUERY, ["d"], max_length=3), "max_length", "3 leaves no room for text: at least"),
        (lambda c: c.score([(QUERY, "d")], max_length=100000), "max_length", "100000 exceeds the model's 512"),
        (
            lambda c: c.rerank(QUERY, [text(100)], truncation="chunk", max_length=32, chunk_overlap=4_000_000_000),
            "chunk_overlap",
            "4000000000 must be smaller than a window's",
        ),
        (lambda c: c.rerank(text(40), ["d"]), "query", "is more than 12 tokens long; the limit is 12"),
        (lambda c: c.score([(text(40), "d")]), "pairs[0].text_a", "text_a: is more than 12 tokens long"),
        (lambda c: c.rerank("q", ["a", text(80)], truncation="none", max_length=32), "documents[1]", "does not fit"),
        (lambda c: c.rerank(QUERY, ["d"] * 5), "documents", "holds more than 4 entries; the limit is 4 per request"),
        (lambda c: c.rerank(QUERY, ["d"], truncation=99), "truncation", "99 is not one of TRUNCATION_UNSPECIFIED (0)"),
    ],
)
def test_each_refusal_names_its_field_once_and_cuts_what_it_repeats(
    limited: RerankClient, call, field: str, words: str
) -> None:
    """Each gRPC refusal says its field once ("max_length: max_length 100000 exceeds ..." said it twice), what was
    wrong and what is allowed, and repeats at most 64 characters of a caller's value (a model name came back
    100 characters long, in Python's repr)."""
    with pytest.raises(RerankError) as caught:
        call(limited)
    assert words in caught.value.details
    assert_plain(caught.value.details, caught.value.field_violations, field)
    if field == "documents[1]":
        assert "document 1" not in caught.value.details


def test_an_undecodable_message_is_refused_in_plain_words(stack: Stack) -> None:
    """protobuf's "Error parsing message with type ..." said neither what was wrong nor what to send."""
    with grpc.insecure_channel(stack.target) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/rerank.v1.RerankService/Rerank")(b"\x0a\x03\xff\xfe\xfd", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert details.startswith("malformed request message: the bytes are not a rerank.v1.RerankRequest"), details
    assert_plain(details, [])


def test_a_message_past_the_size_limit_is_refused(limited: RerankClient) -> None:
    with pytest.raises(ResourceExhaustedError) as caught:
        limited.rerank(QUERY, ["x" * 30000])
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "20000" in caught.value.details  # names the limit
    assert len(limited.rerank(QUERY, ["still serving"]).results) == 1


def test_the_cli_prints_field_violations(stack: Stack) -> None:
    done = run_rerank("query", "--target", stack.target, "--truncation", "none", "--max-length", "16", QUERY, text(50))
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "documents[0]: does not fit" in done.stderr


# -- stream ----------------------------------------------------------------------------------


async def test_a_stream_of_a_thousand_messages_answers_each_id(stack: Stack, checkpoints) -> None:
    documents = [text(n, seed=n) for n in (3, 9, 20)]
    expected = eager(checkpoints["reranker"]).logits(QUERY, documents)
    bad = {f"m{i}" for i in range(0, 1000, 97)}

    async def messages():
        for i in range(1000):
            query = "" if f"m{i}" in bad else QUERY
            yield stream_request(f"m{i}", query, documents, top_n=2)

    seen: dict[str, RerankStreamResponse] = {}
    async with AsyncRerankClient(stack.target, timeout=300) as c:
        async for response in c.rerank_stream(messages()):
            assert response.id not in seen, f"{response.id} answered twice"
            seen[response.id] = response
    assert set(seen) == {f"m{i}" for i in range(1000)}
    for message_id, response in seen.items():
        if message_id in bad:
            error = from_stream_error(response.error)
            assert isinstance(error, InvalidRequestError) and "query: must not be empty" in str(error)
            assert [v.field for v in error.field_violations] == ["query"]
        else:
            assert [r.index for r in response.response.results] == list(np.argsort(-expected)[:2])
            assert response.response.results[0].logit == pytest.approx(expected.max(), abs=ATOL)


def test_the_sync_stream_and_the_cli_stream(stack: Stack, tmp_path: Path) -> None:
    with RerankClient(stack.target, timeout=60) as c:
        answers = list(c.rerank_stream(stream_request(str(i), QUERY, ["a", text(i + 1)]) for i in range(20)))
    assert sorted(int(a.id) for a in answers) == list(range(20))
    lines = tmp_path / "requests.jsonl"
    lines.write_text(
        "\n".join(json.dumps({"id": f"r{i}", "query": QUERY, "documents": ["x", "y"], "top_n": 1}) for i in range(3))
    )
    done = run_rerank("stream", "--target", stack.target, str(lines), timeout=60)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(o["id"] for o in out) == ["r0", "r1", "r2"]
    assert all(len(o["response"]["results"]) == 1 for o in out)


def test_the_cli_covers_score_and_info(stack: Stack) -> None:
    info = run_rerank("info", "--target", stack.target, timeout=60)
    assert info.returncode == 0 and json.loads(info.stdout)["tritonModelName"] == "reranker"
    score = run_rerank("score", "--target", stack.target, "--json", "--pair", "q", "a", "--pair", "q2", "b")
    assert score.returncode == 0, score.stderr
    assert len(json.loads(score.stdout)["scores"]) == 2


# -- hard text -------------------------------------------------------------------------------


def test_text_that_stresses_tokenization_is_scored_like_eager(client: RerankClient, checkpoints) -> None:
    documents = [
        "北京是中华人民共和国的首都。",
        "مرحبا بالعالم، هذا نص من اليمين إلى اليسار",
        "emoji 🚀🔥👩‍👩‍👧 flags 🇨🇳🇫🇷",
        "combining e\u0301 a\u0308 o\u0302 and zero\u200bwidth\u200cnon\u200djoiner\ufeff",
        "",
        "\n\t \r\n",
        "\x00 control \x07 chars",
    ]
    response = client.rerank("什么是 quick sort? 🤔", documents)
    results = by_index(response)
    expected = eager(checkpoints["reranker"]).logits("什么是 quick sort? 🤔", documents)
    np.testing.assert_allclose([results[i].logit for i in range(len(documents))], expected, atol=ATOL)


def test_ten_megabytes_of_whitespace_are_truncated_not_choked_on(client: RerankClient) -> None:
    huge = " \n\t " * 2_500_000
    response = client.rerank(QUERY, [huge, "a real document"], timeout=120)
    results = by_index(response)
    assert results[0].truncated and not results[1].truncated
    assert response.usage.input_tokens > 512
    assert len(client.rerank(QUERY, ["still serving"]).results) == 1


# -- 8192-token documents --------------------------------------------------------------------


def test_8192_token_documents_go_through_the_token_budget(long_stack: Stack, checkpoints) -> None:
    reference = eager(checkpoints["reranker_long"], "sdpa")
    documents = [text(9000, seed=1), text(30, seed=2), text(9000, seed=3), text(4000, seed=4), text(9000, seed=5)]
    before = model_counters(long_stack, "reranker_long")
    with RerankClient(long_stack.target, timeout=300) as c:
        response = c.rerank(QUERY, documents)
    after = model_counters(long_stack, "reranker_long")
    results = by_index(response)
    assert [results[i].truncated for i in range(5)] == [True, False, True, False, True]
    np.testing.assert_allclose([results[i].logit for i in range(5)], reference.logits(QUERY, documents), atol=ATOL)
    assert response.usage.input_tokens == sum(len(reference.encode(QUERY, d)) for d in documents)
    # Three 8192-token pairs under a 16384-token budget cannot share one model run.
    assert after["padded"] - before["padded"] <= 2 * 16384 + 8192
    assert after["computed"] - before["computed"] == 5


# -- deadlines and cancellation --------------------------------------------------------------


def model_counters(stack: Stack, model: str) -> dict[str, float]:
    """The model's custom counters on Triton's metrics endpoint, once they have settled."""
    url = stack.triton_metrics_url
    assert url is not None

    def read() -> dict[str, float]:
        text_ = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {"computed": 0.0, "dropped": 0.0, "real": 0.0, "padded": 0.0}
        for _name, labels, value in re.findall(r"^(rerank_model_\w+)\{([^}]*)\} (\S+)$", text_, re.M):
            if f'model="{model}"' in labels:
                key = re.search(r'(?:outcome|kind)="(\w+)"', labels)
                if key:  # summed over the instances' stubs (the pid label)
                    values[key.group(1)] += float(value)
        return values

    previous, current = None, read()
    while current != previous:
        time.sleep(0.5)
        previous, current = current, read()
    return current


LARGE = [text(9000, seed=100 + i) for i in range(24)]  # 24 pairs of 8192 tokens: 12 model runs


async def test_a_cancelled_call_stops_its_pending_work(long_stack: Stack) -> None:
    before = model_counters(long_stack, "reranker_long")
    async with AsyncRerankClient(long_stack.target, timeout=300) as c:
        call = asyncio.create_task(c.rerank(QUERY, LARGE))
        await asyncio.sleep(1.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    after = model_counters(long_stack, "reranker_long")
    computed = after["computed"] - before["computed"]
    assert computed < len(LARGE), f"all {len(LARGE)} pairs were computed after the call was cancelled"
    async with AsyncRerankClient(long_stack.target, timeout=60) as c:
        assert len((await c.rerank(QUERY, ["still serving"])).results) == 1


def test_an_expired_deadline_drops_the_remaining_work(long_stack: Stack) -> None:
    before = model_counters(long_stack, "reranker_long")
    with RerankClient(long_stack.target) as c:
        started = time.monotonic()
        with pytest.raises(RerankTimeoutError):
            c.rerank(QUERY, LARGE, timeout=1.5)
        assert time.monotonic() - started < 10
    after = model_counters(long_stack, "reranker_long")
    assert after["computed"] - before["computed"] < len(LARGE)


async def test_the_async_client_covers_every_rpc(stack: Stack) -> None:
    async with AsyncRerankClient(stack.target, timeout=60) as c:
        info = await c.model_info()
        scored = await c.score([("q", "a"), ("q", "b")], truncation="end")
        ranked = await c.rerank("q", ["a", "b"], truncation="chunk", max_length=info.max_length)
        answers = [a async for a in c.rerank_stream([stream_request("x", "q", ["a"])])]
        with pytest.raises(InvalidRequestError) as caught:
            await c.score([("q", "a")], max_length=info.max_length + 1)
    assert info.model == "reranker" and len(scored.scores) == 2
    assert {r.index: r.logit for r in ranked.results}[0] == pytest.approx(scored.scores[0].logit, abs=ATOL)
    assert [a.id for a in answers] == ["x"]
    assert [v.field for v in caught.value.field_violations] == ["max_length"]


async def test_a_closed_clients_calls_fail_cancelled_in_both_twins(stack: Stack) -> None:
    """As the TypeScript and Go clients' do; gRPC's own ValueError and UsageError are no RerankError."""
    with RerankClient(stack.target, timeout=60) as client:
        assert len(client.rerank("q", ["a"]).results) == 1
    for call in (
        lambda: client.rerank("q", ["a"]),
        lambda: list(client.rerank_stream([stream_request("x", "q", ["a"])])),
    ):
        with pytest.raises(CancelledError, match="the client is closed"):
            call()
    async with AsyncRerankClient(stack.target, timeout=60) as twin:
        assert len((await twin.rerank("q", ["a"])).results) == 1
    with pytest.raises(CancelledError, match="the client is closed"):
        await twin.model_info()
    with pytest.raises(CancelledError, match="the client is closed"):
        [a async for a in twin.rerank_stream([stream_request("x", "q", ["a"])])]


def test_an_http_caller_that_disconnects_stops_its_pending_work(long_stack: Stack) -> None:
    # HTTP has no cancellation message: a client that closes its connection is the signal.
    import httpx

    assert long_stack.http_url is not None
    before = model_counters(long_stack, "reranker_long")
    body = {"model": "reranker_long", "query": QUERY, "documents": LARGE}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{long_stack.http_url}/v2/rerank", json=body, timeout=httpx.Timeout(60, read=1.5))
    # One instance runs one execution at a time: this call is answered once the abandoned one has ended,
    # after all its pairs had they not been dropped.
    with RerankClient(long_stack.target, timeout=300) as c:
        assert len(c.rerank(QUERY, ["still serving"]).results) == 1
    after = model_counters(long_stack, "reranker_long")
    computed = after["computed"] - before["computed"] - 1
    assert computed < len(LARGE), "every pair was computed for a caller who left"
