"""Several models in one server, on a real Triton: two checkpoints this suite uses nowhere else (of different
shapes) exported into one repository and served by plain `rerank serve`; each request's `model` field
chooses the model (gRPC and each HTTP API), each answer equals its own model's fp32 eager; GetModelInfo,
ListModels, /v1/models; NOT_FOUND / 404 for a model not served; metrics and health per model; the score
cache on a repeated request; and models loaded, reloaded and unloaded through Triton's model control
while the server runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2

from rerank_client import InvalidRequestError, ModelNotFoundError, RerankClient, from_stream_error, stream_request
from rerank_client.pb import SERVICE_NAME
from rerank_server.export.verify import ABSOLUTE_TOLERANCE
from rerank_server.testing import free_port, health_status, save_random_checkpoint
from rerank_triton_model import package_digest
from tests.conftest import TOKENIZER_DIR, Stack, export_all, run_rerank, start_local, stop_serve_later
from tests.reference import eager
from tests.test_api import model_counters
from tests.test_operations import sample, scrape
from tests.texts import QUERY, mixed_documents, text

OTHER_DIGEST = "0123456789abcdef"
OPERATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"

ATOL = ABSOLUTE_TOLERANCE["fp32"]  # what `rerank export` holds an fp32 export to against eager
CACHE_BYTES = 16 * 2**20
SERVING = health_pb2.HealthCheckResponse.SERVING
# Shapes no other test serves: alpha CLS-pooled, 2 layers; beta wider, mean-pooled, 3 layers, 256 tokens.
CHECKPOINTS: dict[str, tuple[dict[str, object], int]] = {
    "alpha": (
        {
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "local_attention": 16,
            "global_attn_every_n_layers": 2,
            "max_position_embeddings": 512,
        },
        41,
    ),
    "beta": (
        {
            "hidden_size": 96,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 6,
            "local_attention": 32,
            "global_attn_every_n_layers": 3,
            "classifier_pooling": "mean",
            "max_position_embeddings": 256,
        },
        42,
    ),
    # Loaded later, and exported again as `alpha` (a re-export under a served name).
    "gamma": (
        {
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 3,
            "local_attention": 16,
            "max_position_embeddings": 512,
        },
        43,
    ),
}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pair_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair-checkpoints")
    return {
        name: save_random_checkpoint(root / name, TOKENIZER_DIR, seed=seed, **config)
        for name, (config, seed) in CHECKPOINTS.items()
    }


def export_args(checkpoint: Path, repository: Path, name: str, *extra: str) -> list[str]:
    return ["--model", str(checkpoint), "--output", str(repository), "--name", name, "--precision", "fp32", *extra]


def export(checkpoint: Path, repository: Path, name: str, *extra: str) -> None:
    export_all([export_args(checkpoint, repository, name, *extra)])


@pytest.fixture(scope="module")
def pair_repository(tmp_path_factory: pytest.TempPathFactory, pair_checkpoints: dict[str, Path]) -> Path:
    repository = tmp_path_factory.mktemp("pair-repository")
    export_all([export_args(pair_checkpoints[name], repository, name) for name in ("alpha", "beta")])
    return repository


@pytest.fixture(scope="module")
def pair_stack(pair_repository: Path) -> Iterator[Stack]:
    """Plain `rerank serve` on the repository (every model it holds), with the score cache on."""
    served = start_local(pair_repository, f"--score-cache-bytes={CACHE_BYTES}")
    yield served
    stop_serve_later(served)


@pytest.fixture(scope="module")
def client(pair_stack: Stack) -> Iterator[RerankClient]:
    with RerankClient(pair_stack.target, timeout=120) as c:
        yield c


def logits_by_index(response: Any) -> list[float]:
    found = {r.index: r.logit for r in response.results}
    return [found[i] for i in range(len(found))]


# -- choosing a model --------------------------------------------------------------------------


def test_list_models_describes_both_and_the_first_by_name_is_the_default(
    client: RerankClient, pair_checkpoints
) -> None:
    listed = client.list_models()
    assert listed.default_model == "alpha"
    assert [m.triton_model_name for m in listed.models] == ["alpha", "beta"]
    alpha, beta = listed.models
    assert (alpha.max_length, beta.max_length) == (512, 256)  # each keeps its own
    assert alpha.model == pair_checkpoints["alpha"].name and beta.model == pair_checkpoints["beta"].name
    assert alpha.precision == beta.precision == "fp32"
    assert client.model_info() == alpha and client.model_info(model="beta") == beta


def test_each_model_answers_with_its_own_logits_over_grpc(client: RerankClient, pair_checkpoints) -> None:
    documents = mixed_documents()
    expected = {name: eager(pair_checkpoints[name]).logits(QUERY, documents) for name in ("alpha", "beta")}
    assert np.max(np.abs(expected["alpha"] - expected["beta"])) > 0.1, "the two models must tell apart"
    for name, model in (("alpha", ""), ("alpha", "alpha"), ("beta", "beta")):
        response = client.rerank(QUERY, documents, model=model)
        np.testing.assert_allclose(logits_by_index(response), expected[name], atol=ATOL)
        assert response.model == pair_checkpoints[name].name
        scored = client.score([(QUERY, d) for d in documents], model=model)
        np.testing.assert_allclose([s.logit for s in scored.scores], expected[name], atol=ATOL)
    # A stream's messages each choose their own model.
    answers = {
        a.id: a.response
        for a in client.rerank_stream(
            stream_request(f"{name}-{i}", QUERY, documents, model=name) for i in range(3) for name in ("alpha", "beta")
        )
    }
    for message_id, response in answers.items():
        np.testing.assert_allclose(logits_by_index(response), expected[message_id.split("-")[0]], atol=ATOL)


def test_each_model_answers_with_its_own_logits_over_http(pair_stack: Stack, pair_checkpoints) -> None:
    documents = mixed_documents()[:4]
    expected = {name: eager(pair_checkpoints[name]).logits(QUERY, documents) for name in ("alpha", "beta")}
    url = pair_stack.http_url
    for name in ("alpha", "beta"):
        cohere = httpx.post(f"{url}/v2/rerank", json={"model": name, "query": QUERY, "documents": documents}).json()
        scores = {r["index"]: r["relevance_score"] for r in cohere["results"]}
        np.testing.assert_allclose([scores[i] for i in range(4)], 1 / (1 + np.exp(-expected[name])), atol=ATOL)
        jina = httpx.post(f"{url}/v1/rerank", json={"model": name, "query": QUERY, "documents": documents}).json()
        assert jina["model"] == pair_checkpoints[name].name
        nim = httpx.post(
            f"{url}/v1/ranking",
            json={
                "model": name,
                "query": {"text": QUERY},
                "passages": [{"text": d} for d in documents],
                "truncate": "END",
            },
        ).json()
        logits = {r["index"]: r["logit"] for r in nim["rankings"]}
        np.testing.assert_allclose([logits[i] for i in range(4)], expected[name], atol=ATOL)
        # vLLM's truncate_prompt_tokens -1 is the chosen model's own limit (beta's 256).
        vllm = httpx.post(
            f"{url}/v1/score",
            json={
                "model": name,
                "text_1": QUERY,
                "text_2": documents,
                "activation": False,
                "truncate_prompt_tokens": -1,
            },
        ).json()
        assert vllm["model"] == pair_checkpoints[name].name
        np.testing.assert_allclose([r["score"] for r in vllm["data"]], expected[name], atol=ATOL)
    # TEI has no model field: the default model answers, and /info describes it.
    tei = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": documents, "raw_scores": True}).json()
    np.testing.assert_allclose(
        [{r["index"]: r["score"] for r in tei}[i] for i in range(4)], expected["alpha"], atol=ATOL
    )
    info = httpx.get(f"{url}/info").json()
    assert info["model_id"] == pair_checkpoints["alpha"].name and info["max_input_length"] == 512
    listed = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["alpha", "beta"]
    assert [m["root"] for m in listed] == [pair_checkpoints["alpha"].name, pair_checkpoints["beta"].name]


def test_a_model_not_served_is_not_found_naming_the_served_ones(client: RerankClient, pair_stack: Stack) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        client.rerank(QUERY, ["a"], model="delta")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.details == "model: 'delta' is not served here; the served models are alpha, beta"
    (bad,) = client.rerank_stream([stream_request("x", QUERY, ["a"], model="delta")])
    assert isinstance(from_stream_error(bad.error), ModelNotFoundError)
    url = pair_stack.http_url
    body = {"model": "delta", "query": QUERY, "documents": ["a"]}
    cohere = httpx.post(f"{url}/v2/rerank", json=body)
    assert cohere.status_code == 404 and "alpha, beta" in cohere.json()["message"]
    jina = httpx.post(f"{url}/v1/rerank", json=body)
    assert jina.status_code == 404 and jina.json()["detail"] == jina.json()["message"]
    nim = httpx.post(
        f"{url}/v1/ranking", json={"model": "delta", "query": {"text": QUERY}, "passages": [{"text": "a"}]}
    )
    assert nim.status_code == 404
    assert nim.json()["status"] == 404 and "'delta' is not served here" in nim.json()["detail"]
    vllm = httpx.post(f"{url}/score", json={"model": "delta", "text_1": QUERY, "text_2": ["a"]})
    assert vllm.status_code == 404 and "alpha, beta" in vllm.text
    done = run_rerank("query", "--target", pair_stack.target, "--model", "delta", QUERY, "a", timeout=60)
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr and "alpha, beta" in done.stderr


def test_each_model_keeps_its_own_maximum_length(client: RerankClient) -> None:
    long_document = text(400, seed=5)
    assert client.rerank(QUERY, [long_document], model="alpha", max_length=400).results[0].truncated
    with pytest.raises(InvalidRequestError, match="exceeds the model's 256"):
        client.rerank(QUERY, [long_document], model="beta", max_length=400)
    assert client.rerank(QUERY, [long_document], model="beta").usage.input_tokens == 256


def test_the_cli_chooses_and_lists_models(pair_stack: Stack, pair_checkpoints) -> None:
    done = run_rerank("query", "--target", pair_stack.target, "--model", "beta", "--json", QUERY, "a", "b", timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == pair_checkpoints["beta"].name
    listed = run_rerank("models", "--target", pair_stack.target, timeout=60)
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)
    assert models["defaultModel"] == "alpha" and [m["tritonModelName"] for m in models["models"]] == ["alpha", "beta"]


def test_metrics_and_health_per_model(client: RerankClient, pair_stack: Stack) -> None:
    before = scrape(pair_stack.metrics_url)
    client.rerank(QUERY, ["for alpha"], model="alpha")
    client.rerank(QUERY, ["for the default"])  # alpha, the default
    client.rerank(QUERY, ["for beta"], model="beta")
    (streamed,) = client.rerank_stream([stream_request("s", QUERY, ["for beta"], model="beta")])
    assert not streamed.HasField("error")
    answer = httpx.post(f"{pair_stack.http_url}/v2/rerank", json={"model": "beta", "query": QUERY, "documents": ["b"]})
    assert answer.status_code == 200
    with pytest.raises(ModelNotFoundError):
        client.rerank(QUERY, ["for delta"], model="delta")
    metrics = scrape(pair_stack.metrics_url)
    for name in ("alpha", "beta"):
        assert sample(metrics, "rerank_request_pairs_count", model=name) >= 1
        assert sample(metrics, "rerank_input_tokens_total", model=name) > 0
        assert health_status(pair_stack.target, f"{SERVICE_NAME}/{name}") == SERVING

    def calls(**labels: str) -> float:
        return sample(metrics, "rerank_calls_total", **labels) - sample(before, "rerank_calls_total", **labels)

    # Each call is counted and timed under the model it chose; a model not served counts under "".
    assert calls(surface="grpc", rpc="Rerank", code="OK", model="alpha") == 2
    assert calls(surface="grpc", rpc="Rerank", code="OK", model="beta") == 1
    assert calls(surface="grpc", rpc="RerankStream", code="OK", model="beta") == 1
    assert calls(surface="cohere", code="200", model="beta") == 1
    assert calls(surface="grpc", rpc="Rerank", code="NOT_FOUND", model="") == 1
    latency = "rerank_call_duration_seconds_count"
    assert (
        sample(metrics, latency, rpc="Rerank", model="beta") - sample(before, latency, rpc="Rerank", model="beta") == 1
    )
    assert 'model="delta"' not in metrics  # only served names become label values


# -- the score cache ---------------------------------------------------------------------------


def test_a_repeated_request_is_answered_from_the_cache_with_the_same_answer(client: RerankClient, pair_stack) -> None:
    documents = [text(12 + i % 40, seed=1000 + i) for i in range(300)]
    before = scrape(pair_stack.metrics_url)
    computed_before = model_counters(pair_stack, "beta")["computed"]
    first = client.rerank(QUERY, documents, model="beta")
    computed_first = model_counters(pair_stack, "beta")["computed"]
    again = client.rerank(QUERY, documents, model="beta")
    assert again == first  # the whole response: order, scores, logits bit for bit, usage
    assert model_counters(pair_stack, "beta")["computed"] == computed_first == computed_before + 300
    after = scrape(pair_stack.metrics_url)
    hits = sample(after, "rerank_score_cache_hits_total", model="beta") - sample(
        before, "rerank_score_cache_hits_total", model="beta"
    )
    assert hits == 300
    # The other model holds none of them.
    misses_before = sample(after, "rerank_score_cache_misses_total", model="alpha")
    client.rerank(QUERY, documents[:10], model="alpha")
    assert (
        sample(scrape(pair_stack.metrics_url), "rerank_score_cache_misses_total", model="alpha") == misses_before + 10
    )


# -- loading and unloading through Triton's model control ------------------------------------------


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = 120, explain: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f}s: {what}\n{explain()}"
        time.sleep(0.5)


def test_models_load_reload_and_unload_while_serving(
    pair_repository: Path, pair_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(pair_repository, repository)
    triton_http_port = free_port()
    served = start_local(repository, f"--score-cache-bytes={CACHE_BYTES}", f"--triton-http-port={triton_http_port}")
    triton = triton_grpc.InferenceServerClient(served.triton_url)
    documents = mixed_documents()[:5]

    def as_documented(model: str, action: str) -> None:
        """docs/operations.md's curl command for this, on this Triton's HTTP port."""
        shown = f"curl -X POST localhost:8000/v2/repository/models/{model}/{action}"
        assert shown in OPERATIONS_DOC.read_text()
        done = subprocess.run(shown.replace(":8000/", f":{triton_http_port}/").split(), capture_output=True, text=True)
        assert done.returncode == 0 and not done.stdout, (done.stdout, done.stderr)  # Triton answers success empty

    try:
        with RerankClient(served.target, timeout=120) as client:
            names = lambda: [m.triton_model_name for m in client.list_models().models]  # noqa: E731

            # On a timeout: what the frontend served, what Triton's index said, and the serve log.
            def explain() -> str:
                index = triton.get_model_repository_index(as_json=True)
                return "\n".join([f"served: {names()}", f"triton: {index}", *served.output[-40:]])

            old_alpha = client.rerank(QUERY, documents, model="alpha")  # now in the cache

            # A third model exported into the live repository and loaded: served, no restart.
            export(pair_checkpoints["gamma"], repository, "gamma")
            # As if another version of the service had exported it: served, with a warning naming it.
            config = repository / "gamma" / "config.pbtxt"
            config.write_text(config.read_text().replace(package_digest(), OTHER_DIGEST))
            as_documented("gamma", "load")
            wait_until(lambda: names() == ["alpha", "beta", "gamma"], "gamma served", explain=explain)
            stale = [line for line in served.output if "exported by another version" in line]
            assert len(stale) == 1 and "model gamma " in stale[0] and OTHER_DIGEST in stale[0], stale
            np.testing.assert_allclose(
                logits_by_index(client.rerank(QUERY, documents, model="gamma")),
                eager(pair_checkpoints["gamma"]).logits(QUERY, documents),
                atol=ATOL,
            )

            # alpha exported again from another checkpoint and reloaded: the new weights answer, never
            # the cached logits of the model it replaced.
            export(pair_checkpoints["gamma"], repository, "alpha", "--overwrite")
            triton.load_model("alpha")
            wait_until(
                lambda: client.model_info(model="alpha").model == pair_checkpoints["gamma"].name,
                "alpha reloaded",
                explain=explain,
            )
            new_alpha = client.rerank(QUERY, documents, model="alpha")
            expected = eager(pair_checkpoints["gamma"]).logits(QUERY, documents)
            np.testing.assert_allclose(logits_by_index(new_alpha), expected, atol=ATOL)
            assert np.max(np.abs(np.array(logits_by_index(old_alpha)) - expected)) > 0.1
            # Once the old alpha is unloaded, Triton's counters hold the new alpha's 5 pairs: the old stub's
            # unload neither removes them nor leaves its own (were the two stubs' series one shared counter,
            # the first unload would free it under the other, and Triton die of heap corruption).
            wait_until(
                lambda: model_counters(served, "alpha")["computed"] == len(documents),
                "the reloaded alpha's own counters",
                explain=explain,
            )

            # beta unloaded: not served (NOT_FOUND, its health NOT_SERVING), the others still are.
            as_documented("beta", "unload")
            wait_until(lambda: names() == ["alpha", "gamma"], "beta no longer served", explain=explain)
            with pytest.raises(ModelNotFoundError, match=r"the served models are alpha, gamma$"):
                client.rerank(QUERY, documents, model="beta")
            assert health_status(served.target, f"{SERVICE_NAME}/beta") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health_status(served.target, SERVICE_NAME) == SERVING  # the server is still ready
            assert len(client.rerank(QUERY, documents).results) == 5
    finally:
        triton.close()
        stop_serve_later(served)


def test_a_call_right_after_a_reload_is_answered_by_the_new_export_alone(
    pair_repository: Path, pair_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """alpha exported again and loaded through Triton's model control, and a call sent before the frontend's
    watcher looks (here once an hour): Triton refuses the request made for the old export, the frontend follows
    Triton at once and scores the whole call again on the new export, so the answer is the new model's alone,
    never the old one's cached logits beside the new one's, and the old ones are not answered after."""
    repository = tmp_path / "repository"
    shutil.copytree(pair_repository, repository)
    served = start_local(repository, f"--score-cache-bytes={CACHE_BYTES}", "--health-interval-s=3600")
    triton = triton_grpc.InferenceServerClient(served.triton_url)
    documents = mixed_documents()[:6]
    try:
        with RerankClient(served.target, timeout=120) as client:
            client.rerank(QUERY, documents[:3], model="alpha")  # the old export's logits, now in the cache
            export(pair_checkpoints["gamma"], repository, "alpha", "--overwrite")
            triton.load_model("alpha")  # returns once Triton serves the new export
            response = client.rerank(QUERY, documents, model="alpha")
            expected = eager(pair_checkpoints["gamma"]).logits(QUERY, documents)
            assert response.model == pair_checkpoints["gamma"].name
            np.testing.assert_allclose(logits_by_index(response), expected, atol=ATOL)
            again = client.rerank(QUERY, documents[:3], model="alpha")
            np.testing.assert_allclose(logits_by_index(again), expected[:3], atol=ATOL)
            assert any("reloaded in Triton" in line for line in served.output), served.output[-20:]
    finally:
        triton.close()
        stop_serve_later(served)
