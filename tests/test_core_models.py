"""Several models and the score cache in the core (fast tier, over FakeBackend): each request scored by
the model it names with that model's tokenizer and length, one admission budget for all of them, and
cached logits identical to computed ones, never crossing models. tests/test_models.py runs the same
through gRPC and HTTP on a real Triton."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest

from rerank_server.core import RerankInput, ScoreInput, ScoreOptions, Truncation
from rerank_server.errors import ErrorCode, ServiceError
from tests.fakes import MODEL, FakeBackend, fake_core, fake_logit, fake_model
from tests.texts import QUERY, text

ALPHA = dataclasses.replace(MODEL, name="alpha", source_model="checkpoint-alpha", max_length=512, export_id="a")
BETA = dataclasses.replace(MODEL, name="beta", source_model="checkpoint-beta", max_length=64, export_id="b")
CACHE = 1 << 20


def two_models(delay_s: float = 0.0, **settings: Any):
    alpha, beta = FakeBackend(delay_s=delay_s), FakeBackend(offset=100.0)
    core = fake_core(models=[fake_model(ALPHA, alpha), fake_model(BETA, beta)], **settings)
    return core, alpha, beta


async def failure(work) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await work
    return caught.value


async def test_each_request_is_scored_by_the_model_it_names_with_its_own_length() -> None:
    core, alpha, beta = two_models()
    long_document = text(200, seed=1)
    by_alpha = await core.rerank(RerankInput(QUERY, [long_document]))  # the default: the first model
    by_beta = await core.rerank(RerankInput(QUERY, [long_document], model="beta"))
    assert (by_alpha.model, by_beta.model) == ("checkpoint-alpha", "checkpoint-beta")
    assert len(alpha.calls) == len(beta.calls) == 1
    # beta's tokenizer cuts at its own 64 tokens; alpha's fits the whole pair.
    assert beta.calls[0].lengths.tolist() == [64] and alpha.calls[0].lengths[0] > 64
    assert by_beta.results[0].truncated and not by_alpha.results[0].truncated
    assert by_beta.results[0].logit == pytest.approx(fake_logit(beta.calls[0].input_ids) + 100.0)
    assert core.describe("beta").max_length == 64 and core.describe().triton_model_name == "alpha"
    error = await failure(core.score(ScoreInput([(QUERY, "d")], ScoreOptions(max_length=100), model="beta")))
    assert error.code is ErrorCode.INVALID_ARGUMENT and "exceeds the model's 64" in error.message
    error = await failure(core.rerank(RerankInput(QUERY, ["d"], model="gamma")))
    assert error.code is ErrorCode.NOT_FOUND and "alpha, beta" in error.message


async def test_one_admission_budget_across_models() -> None:
    core, _, _ = two_models(delay_s=0.5, max_total_tokens=300, max_inflight_tokens=300)
    documents = [text(30, seed=i) for i in range(4)]  # about 190 tokens with the query
    first = asyncio.create_task(core.rerank(RerankInput(QUERY, documents, model="alpha")))
    await asyncio.sleep(0.2)
    error = await failure(core.rerank(RerankInput(QUERY, documents, model="beta")))
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED and "capacity" in error.message
    await first


async def test_a_repeated_request_is_answered_from_the_cache_identically() -> None:
    core, alpha, _ = two_models(score_cache_bytes=CACHE)
    documents = [text(20 + i, seed=i) for i in range(6)]
    first = await core.rerank(RerankInput(QUERY, documents))
    again = await core.rerank(RerankInput(QUERY, documents))
    assert again == first and len(alpha.calls) == 1
    page = await core.rerank(RerankInput(QUERY, documents, top_n=2))
    assert page.results == first.results[:2] and len(alpha.calls) == 1
    # Half new documents: only those are computed, and the old ones' answers are unchanged.
    mixed = await core.rerank(RerankInput(QUERY, [*documents[:3], "new one", "new two"]))
    assert alpha.calls[-1].lengths.size == 2
    old = {r.index: r.logit for r in first.results}
    assert all(r.logit == old[r.index] for r in mixed.results if r.index < 3)
    metrics = core.metrics.registry
    assert metrics.get_sample_value("rerank_score_cache_hits_total", {"model": "alpha"}) == 6 + 6 + 3


async def test_the_cache_never_answers_one_model_with_anothers_logit() -> None:
    core, _alpha, beta = two_models(score_cache_bytes=CACHE)
    documents = ["same ids", "for both models"]
    by_alpha = await core.score(ScoreInput([(QUERY, d) for d in documents]))
    by_beta = await core.score(ScoreInput([(QUERY, d) for d in documents], model="beta"))
    assert len(beta.calls) == 1
    assert [s.logit for s in by_beta.scores] == pytest.approx([s.logit + 100.0 for s in by_alpha.scores])


async def test_a_chunk_window_is_cached_on_its_own() -> None:
    core, alpha, _ = two_models(score_cache_bytes=CACHE)
    document = text(300, seed=3)
    chunked = await core.rerank(RerankInput(QUERY, [document], options=ScoreOptions(Truncation.CHUNK, 64, 16)))
    assert chunked.results[0].windows > 3 and len(alpha.calls) == 1
    # END at the same max_length keeps the document's first window: the same ids, answered from the cache.
    cut = await core.rerank(RerankInput(QUERY, [document], options=ScoreOptions(Truncation.END, 64)))
    assert len(alpha.calls) == 1
    first_window = alpha.calls[0].input_ids[: alpha.calls[0].lengths[0]]
    assert cut.results[0].logit == np.float32(fake_logit(first_window))


async def test_with_the_cache_off_every_request_is_computed() -> None:
    core, alpha, _ = two_models()
    for _ in range(2):
        await core.rerank(RerankInput(QUERY, ["a", "b"]))
    assert len(alpha.calls) == 2 and core.cache.entries == 0


async def test_only_computed_tokens_take_admission_and_a_hit_needs_no_budget() -> None:
    core, alpha, _ = two_models(delay_s=0.5, score_cache_bytes=CACHE, max_total_tokens=300, max_inflight_tokens=300)
    documents = [text(30, seed=i) for i in range(4)]
    await core.rerank(RerankInput(QUERY, documents))
    busy = asyncio.create_task(core.rerank(RerankInput(QUERY, [text(30, seed=9 + i) for i in range(4)])))
    await asyncio.sleep(0.2)
    # The budget is taken by `busy`, yet a request the cache holds is answered.
    assert len((await core.rerank(RerankInput(QUERY, documents))).results) == 4
    await busy
    assert np.sum([c.lengths.size for c in alpha.calls]) == 8


# -- a model exported again and reloaded in Triton before the watcher looks ------------------------------

ALPHA_AGAIN = dataclasses.replace(ALPHA, source_model="checkpoint-gamma", export_id="a2")


def reloaded_alpha(core: Any, alpha: FakeBackend, replace: bool = True) -> tuple[FakeBackend, list[str]]:
    """Triton now serves another export of alpha (its old one refuses calls); the core's hook is the watcher's
    look, which serves the new export and forgets the old one's cache (when `replace`)."""
    alpha.replaced = True
    new_backend = FakeBackend(offset=50.0)
    looks: list[str] = []

    async def look(stale: Any) -> None:
        looks.append(stale.info.export_id)
        if replace:
            old = core.models.put(fake_model(ALPHA_AGAIN, new_backend))
            core.cache.forget(old.cache_key)

    core.on_stale_model = look
    return new_backend, looks


async def test_a_call_refused_as_made_for_a_replaced_export_is_scored_again_on_the_new_one() -> None:
    core, alpha, _ = two_models(score_cache_bytes=CACHE)
    documents = [text(20 + i, seed=i) for i in range(4)]
    await core.rerank(RerankInput(QUERY, documents[:2]))  # cached under the old export
    new_backend, looks = reloaded_alpha(core, alpha)
    # Two documents the cache holds for the old export, two it does not: the new export answers all four.
    response = await core.rerank(RerankInput(QUERY, documents))
    assert looks == ["a"] and response.model == "checkpoint-gamma"
    assert len(new_backend.calls) == 1 and new_backend.calls[0].lengths.size == 4
    ids = new_backend.calls[0]
    offsets = np.concatenate(([0], np.cumsum(ids.lengths)))
    expected = sorted(fake_logit(ids.input_ids[offsets[i] : offsets[i + 1]]) + 50.0 for i in range(4))
    assert sorted(r.logit for r in response.results) == pytest.approx(expected)
    # Only the new export's logits are cached: the old ones were forgotten and nothing was stored under its key.
    assert core.cache.entries == 4
    again = await core.score(ScoreInput([(QUERY, d) for d in documents[:2]]))
    assert len(new_backend.calls) == 1 and again.model == "checkpoint-gamma"
    assert {s.logit for s in again.scores} <= {r.logit for r in response.results}


async def test_a_refused_call_is_unavailable_when_the_new_export_cannot_be_served() -> None:
    core, alpha, _ = two_models(score_cache_bytes=CACHE)
    _, looks = reloaded_alpha(core, alpha, replace=False)
    error = await failure(core.rerank(RerankInput(QUERY, ["d"])))
    assert error.code is ErrorCode.UNAVAILABLE and "reloaded" in error.message and looks == ["a"]
    assert core.cache.entries == 0


async def test_calls_refused_as_stale_share_one_look_and_a_look_that_kept_the_model_is_not_repeated_at_once() -> None:
    """Frontend._follow_stale: a burst of refused calls waits for one look at Triton, not one each in a row; after
    a look that did not replace the model, further refused calls within the health interval make none."""
    from types import SimpleNamespace

    from rerank_server.app import Frontend

    looks: list[object] = []

    async def look(model: object) -> None:
        looks.append(model)
        await asyncio.sleep(0.05)  # the look keeps the model: Triton's export could not be served

    frontend: Any = SimpleNamespace(
        _stale_looks={},
        _stale_looked_at={},
        settings=SimpleNamespace(health_interval_s=60.0),
        _follow_triton=look,
    )
    stale_model: Any = SimpleNamespace(name=MODEL)
    frontend.models = SimpleNamespace(find=lambda name: stale_model)  # still served: no look has replaced it
    await asyncio.gather(*(Frontend._follow_stale(frontend, stale_model) for _ in range(100)))
    assert looks == [stale_model]
    await Frontend._follow_stale(frontend, stale_model)  # within the interval: no new look
    assert looks == [stale_model]
    frontend._stale_looked_at[MODEL] -= 61.0
    await Frontend._follow_stale(frontend, stale_model)
    assert looks == [stale_model, stale_model]
