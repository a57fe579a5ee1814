"""The scoring core in process (fast tier): validation, de-duplication, truncation, chunking, ranking,
limits and admission over FakeBackend. Each behaviour here also runs against the real Triton through
the gRPC surface (tests/test_api.py) and the HTTP surfaces."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from transformers import AutoTokenizer

from rerank_server.core import RerankInput, ScoreInput, ScoreOptions, Truncation
from rerank_server.errors import ErrorCode, ServiceError
from rerank_server.ranking import sigmoid
from tests.conftest import TOKENIZER_DIR
from tests.fakes import MODEL, FakeBackend, deadline_in, fake_core, fake_logit
from tests.texts import QUERY, mixed_documents, text


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def expected_logit(hf_tokenizer, query: str, document: str, max_length: int) -> float:
    ids = hf_tokenizer([query], [document], truncation="only_second", max_length=max_length)["input_ids"][0]
    return fake_logit(np.array(ids))


async def failure(work) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await work
    return caught.value


async def test_rerank_ranks_by_score_with_each_pairs_own_logit(hf_tokenizer) -> None:
    documents = mixed_documents()
    ranked = await fake_core().rerank(RerankInput(QUERY, documents, options=ScoreOptions(max_length=48)))
    assert ranked.model == MODEL.source_model
    assert sorted(r.index for r in ranked.results) == list(range(len(documents)))
    for result in ranked.results:
        assert result.logit == pytest.approx(expected_logit(hf_tokenizer, QUERY, documents[result.index], 48))
        assert result.score == pytest.approx(float(sigmoid(np.array([result.logit]))[0]))
    keys = [(-r.score, r.index) for r in ranked.results]
    assert keys == sorted(keys), "not best first, equal scores by index"
    full = [len(hf_tokenizer([QUERY], [d])["input_ids"][0]) for d in documents]
    assert ranked.usage.truncated_documents == sum(n > 48 for n in full)


async def test_top_n_keeps_the_best() -> None:
    documents = mixed_documents()
    core = fake_core()
    every = await core.rerank(RerankInput(QUERY, documents))
    top = await core.rerank(RerankInput(QUERY, documents, top_n=3))
    assert top.results == every.results[:3]


async def test_identical_documents_are_scored_once_and_answered_for_each_index() -> None:
    backend = FakeBackend()
    documents = ["alpha beta", "gamma", "alpha beta", "gamma", "delta"]
    ranked = await fake_core(backend).rerank(RerankInput(QUERY, documents))
    assert backend.calls[0].lengths.size == 3
    assert ranked.usage.model_inputs == 3
    by_index = {r.index: r for r in ranked.results}
    assert by_index[0].logit == by_index[2].logit and by_index[1].logit == by_index[3].logit


async def test_chunk_scores_a_document_by_its_best_window(hf_tokenizer) -> None:
    document = text(400, seed=3)
    max_length, overlap = 64, 16
    ranked = await fake_core().rerank(
        RerankInput(QUERY, [document], options=ScoreOptions(Truncation.CHUNK, max_length, overlap))
    )
    query_ids = hf_tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    doc_ids = hf_tokenizer(document, add_special_tokens=False)["input_ids"]
    cls, sep = hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id
    room = max_length - len(query_ids) - 3
    logits, start = [], 0
    while True:
        logits.append(fake_logit(np.array([cls, *query_ids, sep, *doc_ids[start : start + room], sep])))
        if start + room >= len(doc_ids):
            break
        start += room - overlap
    (result,) = ranked.results
    assert result.windows == len(logits) > 5
    assert result.logit == pytest.approx(max(logits))


async def test_score_keeps_request_order_and_names_pair_fields() -> None:
    core = fake_core()
    pairs = [("q one", "d one"), ("q two", "d two"), ("q one", "d one")]
    scored = await core.score(ScoreInput(pairs))
    assert [s.index for s in scored.scores] == [0, 1, 2]
    assert scored.scores[0].logit == scored.scores[2].logit
    error = await failure(core.score(ScoreInput([("q", "d"), ("q", text(100))], ScoreOptions(Truncation.NONE, 16))))
    assert error.code is ErrorCode.INVALID_ARGUMENT
    assert error.violations[0][0] == "pairs[1].text_b"


@pytest.mark.parametrize(
    ("request_", "settings", "code", "field"),
    [
        (RerankInput("  ", ["d"]), {}, ErrorCode.INVALID_ARGUMENT, "query"),
        (RerankInput("q", []), {}, ErrorCode.INVALID_ARGUMENT, "documents"),
        (RerankInput("q", ["a", "b", "c", "d"]), {"max_documents": 3}, ErrorCode.INVALID_ARGUMENT, "documents"),
        (
            RerankInput("q", ["d"], options=ScoreOptions(max_length=100_000)),
            {},
            ErrorCode.INVALID_ARGUMENT,
            "max_length",
        ),
        (RerankInput(text(50), ["d"]), {"max_query_tokens": 10}, ErrorCode.INVALID_ARGUMENT, "query"),
        (
            RerankInput("q", ["short", "short", text(300)], options=ScoreOptions(Truncation.NONE, 64)),
            {},
            ErrorCode.INVALID_ARGUMENT,
            "documents[2]",
        ),
        (
            RerankInput("q", [text(200, seed=i) for i in range(8)]),
            {"max_total_tokens": 1000, "max_inflight_tokens": 1000},
            ErrorCode.RESOURCE_EXHAUSTED,
            "documents",
        ),
        (
            ScoreInput([("q", "d"), (text(50), "d")]),
            {"max_query_tokens": 10},
            ErrorCode.INVALID_ARGUMENT,
            "pairs[1].text_a",
        ),
    ],
)
async def test_request_errors_name_the_field_at_fault(request_, settings, code: ErrorCode, field: str) -> None:
    core = fake_core(**settings)
    work = core.rerank(request_) if isinstance(request_, RerankInput) else core.score(request_)
    error = await failure(work)
    assert error.code is code
    assert [f for f, _ in error.violations] == [field], error.message


async def test_a_passed_deadline_is_deadline_exceeded_and_never_reaches_the_backend() -> None:
    backend = FakeBackend()
    error = await failure(fake_core(backend).rerank(RerankInput("q", ["d"]), deadline=deadline_in(-1)))
    assert error.code is ErrorCode.DEADLINE_EXCEEDED
    assert backend.calls == []


async def test_admission_refuses_what_would_pass_the_inflight_budget() -> None:
    core = fake_core(FakeBackend(delay_s=0.5), max_total_tokens=300, max_inflight_tokens=300)
    documents = [text(30, seed=i) for i in range(4)]  # about 190 tokens with the query
    first = asyncio.create_task(core.rerank(RerankInput(QUERY, documents)))
    await asyncio.sleep(0.2)
    error = await failure(core.rerank(RerankInput(QUERY, documents)))
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED and "capacity" in error.message
    assert len((await first).results) == 4
    assert len((await core.rerank(RerankInput(QUERY, documents))).results) == 4  # the budget was returned


async def test_background_calls_may_hold_only_their_share_of_the_budget_and_are_refused_first() -> None:
    """Calls above priority 0 together hold at most background_inflight_share of max_inflight_tokens: with
    one call in flight, a background call of the same size is refused, and a call at 0 is still admitted."""
    core = fake_core(
        FakeBackend(delay_s=0.5), max_total_tokens=300, max_inflight_tokens=400, background_inflight_share=0.5
    )
    documents = [text(30, seed=i) for i in range(4)]  # about 190 tokens with the query
    background = ScoreOptions(priority=1)
    first = asyncio.create_task(core.rerank(RerankInput(QUERY, documents, options=background)))
    await asyncio.sleep(0.2)
    error = await failure(core.rerank(RerankInput(QUERY, documents[::-1], options=background)))
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "calls above priority 0 may hold 200 of them" in error.message, error.message
    refused = {
        reason: core.metrics.registry.get_sample_value("rerank_rejected_total", {"reason": reason})
        for reason in ("background_capacity", "capacity")
    }
    assert refused == {"background_capacity": 1, "capacity": 0}, refused
    urgent = await core.rerank(RerankInput(QUERY, documents[::-1]))
    assert len(urgent.results) == 4 and len((await first).results) == 4
    # An idle server admits a background call past the share (about 265 tokens), within max_total_tokens.
    lone = await core.rerank(RerankInput(QUERY, [text(60, seed=9), *documents], options=background))
    assert len(lone.results) == 5


async def test_a_request_names_the_served_model_or_none_and_another_name_is_not_found() -> None:
    core = fake_core()
    default = await core.rerank(RerankInput(QUERY, ["a", "b"]))
    named = await core.rerank(RerankInput(QUERY, ["a", "b"], model=MODEL.name))
    assert named == default
    assert core.describe(MODEL.name) == core.describe()
    for work in (
        core.rerank(RerankInput(QUERY, ["a"], model="other")),
        core.score(ScoreInput([(QUERY, "a")], model="other")),
    ):
        error = await failure(work)
        assert error.code is ErrorCode.NOT_FOUND
        assert error.violations == [("model", f"'other' is not served here; the served models are {MODEL.name}")]


async def test_text_that_is_no_unicode_is_an_invalid_argument_naming_its_field() -> None:
    core = fake_core()
    refused = await failure(core.rerank(RerankInput(QUERY, ["fine", "a\ud800b", "a\ud800b"])))
    assert refused.code is ErrorCode.INVALID_ARGUMENT
    assert refused.violations[0][0] == "documents[1]" and "surrogate at character 1" in refused.message
    refused = await failure(core.rerank(RerankInput("q\udfff", ["fine"])))
    assert refused.code is ErrorCode.INVALID_ARGUMENT and refused.violations[0][0] == "query"
    refused = await failure(core.score(ScoreInput([("a", "b"), ("c\ud800", "d")])))
    assert refused.violations[0][0] == "pairs[1].text_a"


async def test_a_full_tokenization_queue_is_overload_not_a_limit() -> None:
    from rerank_server.errors import OverloadedError

    core = fake_core(tokenize_queue_max=1, tokenizer_threads=1, max_total_tokens=10**8, max_inflight_tokens=10**8)
    long = text(200_000, seed=1)
    first = asyncio.ensure_future(core.rerank(RerankInput(QUERY, [long], options=ScoreOptions(Truncation.CHUNK))))
    await asyncio.sleep(0.05)  # the first call holds the queue's only place
    with pytest.raises(OverloadedError, match="tokenize_queue_max"):
        await core.rerank(RerankInput(QUERY, ["short"]))
    first.cancel()


async def test_a_call_at_priority_0_is_tokenized_before_background_calls_queued_earlier() -> None:
    """With every tokenizer thread busy, waiting calls take the next free thread by priority (0 first), not in
    arrival order: a small call at 0 waits for the tokenization already running, not for a queued one."""
    core = fake_core(tokenizer_threads=1, max_total_tokens=10**8, max_inflight_tokens=10**8)
    background = ScoreOptions(Truncation.CHUNK, priority=1)
    running, queued = (
        asyncio.ensure_future(core.rerank(RerankInput(QUERY, [text(100_000, seed=seed)], options=background)))
        for seed in (1, 2)
    )
    await asyncio.sleep(0.05)  # the first holds the only thread, the second waits for it
    urgent = await core.rerank(RerankInput(QUERY, ["short"]))
    assert len(urgent.results) == 1 and not queued.done()
    assert all(len(call.results) == 1 for call in await asyncio.gather(running, queued))


async def test_a_caller_that_gives_up_while_waiting_for_a_tokenizer_thread_passes_its_turn_on() -> None:
    core = fake_core(tokenizer_threads=1, max_total_tokens=10**8, max_inflight_tokens=10**8)
    long = RerankInput(QUERY, [text(100_000, seed=3)], options=ScoreOptions(Truncation.CHUNK))
    running = asyncio.ensure_future(core.rerank(long))
    await asyncio.sleep(0.05)
    error = await failure(core.rerank(RerankInput(QUERY, ["gives up"]), deadline=deadline_in(0.01)))
    assert error.code is ErrorCode.DEADLINE_EXCEEDED
    assert len((await running).results) == 1
    assert len((await core.rerank(RerankInput(QUERY, ["next"]))).results) == 1  # the thread is free again
    assert core.tokenize_slots.free == 1


def test_each_apis_priority_reaches_the_backend_and_maps_onto_two_triton_levels() -> None:
    """Cohere v2 and v1 (vLLM's rerank body), vLLM's score and TEI's shared /rerank (vLLM's body) pass the
    caller's priority to the backend; the Triton backend runs 0 and below first, anything later after."""
    import httpx

    from rerank_server.http_api.server import create_app
    from rerank_server.settings import Settings
    from rerank_server.triton_backend import DEFERRED_LEVEL, FIRST_LEVEL, priority_level

    backend = FakeBackend()
    app = create_app(fake_core(backend), Settings(triton_url="fake:0"))
    calls = [
        ("/v2/rerank", {"query": QUERY, "documents": ["a"], "priority": 3}),
        ("/v2/rerank", {"query": QUERY, "documents": ["b"]}),
        ("/v1/score", {"text_1": QUERY, "text_2": ["c"], "priority": -2}),
        ("/v1/rerank", {"query": QUERY, "documents": ["d"], "priority": 5, "truncate_prompt_tokens": -1}),
        ("/v1/rerank", {"query": QUERY, "documents": ["e"], "priority": 6}),
        ("/rerank", {"query": QUERY, "documents": ["f"], "priority": 7}),
    ]

    async def send() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rerank") as client:
            return [(await client.post(path, json=body)).status_code for path, body in calls]

    assert asyncio.run(send()) == [200] * len(calls)
    assert backend.priorities == [3, 0, -2, 5, 6, 7]
    assert [priority_level(p) for p in (-2, 0, 1, 999)] == [FIRST_LEVEL, FIRST_LEVEL, DEFERRED_LEVEL, DEFERRED_LEVEL]
    assert FIRST_LEVEL < DEFERRED_LEVEL  # Triton serves the lower level first


async def test_grpc_priority_reaches_the_backend_from_rerank_score_and_rerank_stream() -> None:
    """RerankRequest.priority and ScoreRequest.priority become ScoreOptions.priority on the one path every
    RPC takes; a request that does not set it runs at 0."""
    from collections.abc import AsyncIterator

    from rerank_client.pb import rerank_pb2
    from rerank_server.service import RerankService
    from rerank_server.settings import Settings

    class Context:
        """What a successful call reads of its grpc.aio context."""

        def time_remaining(self) -> float | None:
            return None

    backend = FakeBackend()
    service = RerankService(fake_core(backend), Settings(triton_url="fake:0"))
    context = Context()
    await service.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=["a"], priority=3), context)
    pair = rerank_pb2.TextPair(text_a=QUERY, text_b="b")
    await service.Score(rerank_pb2.ScoreRequest(pairs=[pair], priority=4), context)
    await service.Rerank(rerank_pb2.RerankRequest(query=QUERY, documents=["c"]), context)

    async def messages() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        request = rerank_pb2.RerankRequest(query=QUERY, documents=["d"], priority=7)
        yield rerank_pb2.RerankStreamRequest(id="s", request=request)

    answers = [answer async for answer in service.RerankStream(messages(), context)]
    assert [answer.WhichOneof("outcome") for answer in answers] == ["response"]
    assert backend.priorities == [3, 4, 0, 7]
