"""The served path end to end: SDK -> frontend -> real Triton -> ONNX Runtime, PyTorch or the packed engine,
checked against eager."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rerank_client import AsyncRerankClient, InvalidRequestError, RerankClient
from tests.conftest import Stack, frontend, run_rerank
from tests.reference import eager
from tests.texts import QUERY, mixed_documents, text

pytestmark = pytest.mark.e2e

ATOL = 1e-4


@pytest.fixture(scope="module")
def client(stack: Stack):
    with RerankClient(stack.target, timeout=60) as c:
        yield c


def served_logits(response, n: int) -> np.ndarray:
    logits = np.full(n, np.nan)
    for result in response.results:
        logits[result.index] = result.logit
    return logits


STACKS = {
    "reranker": "stack",
    "reranker_mean": "mean_stack",
    "reranker_torch": "torch_stack",
    "reranker_packed": "packed_stack",
}


@pytest.mark.parametrize("model", sorted(STACKS))
def test_logits_match_transformers_eager_for_mixed_lengths(request, model: str, checkpoints) -> None:
    stack = request.getfixturevalue(STACKS[model])
    documents = mixed_documents()
    reference = eager(checkpoints[model])
    with RerankClient(stack.target, timeout=60) as c:
        response = c.rerank(QUERY, documents)
    assert len(response.results) == len(documents)
    np.testing.assert_allclose(served_logits(response, len(documents)), reference.logits(QUERY, documents), atol=ATOL)
    expected_tokens = sum(len(reference.encode(QUERY, d)) for d in documents)
    assert response.usage.input_tokens == expected_tokens
    # Only the 700-word document passes the 512 / 384 token limit of the tiny models.
    assert response.usage.truncated_documents == 1
    assert response.model == str(checkpoints[model].name)


def test_score_is_sigmoid_of_logit_and_results_are_ranked(client: RerankClient) -> None:
    documents = mixed_documents()
    response = client.rerank(QUERY, documents)
    logits = np.array([r.logit for r in response.results], dtype=np.float64)
    scores = np.array([r.score for r in response.results], dtype=np.float64)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.all(np.diff(scores) <= 0), "results are not sorted by score"
    assert sorted(r.index for r in response.results) == list(range(len(documents)))


def test_equal_scores_are_ordered_by_index(client: RerankClient) -> None:
    same = text(20, seed=5)
    documents = [text(9, seed=1), same, text(30, seed=2), same, same]
    response = client.rerank(QUERY, documents)
    tied = [r.index for r in response.results if r.index in (1, 3, 4)]
    assert tied == [1, 3, 4]
    assert len({r.score for r in response.results if r.index in (1, 3, 4)}) == 1


def test_top_n_and_return_documents(client: RerankClient) -> None:
    documents = mixed_documents()
    full = client.rerank(QUERY, documents)
    top = client.rerank(QUERY, documents, top_n=3, return_documents=True)
    assert [r.index for r in top.results] == [r.index for r in full.results[:3]]
    assert [r.document for r in top.results] == [documents[r.index] for r in top.results]
    assert all(r.HasField("document") for r in top.results)
    assert not any(r.HasField("document") for r in full.results)
    # top_n past the number of documents returns them all; usage still counts every pair.
    assert len(client.rerank(QUERY, documents, top_n=100).results) == len(documents)
    assert top.usage.input_tokens == full.usage.input_tokens


def triton_counts(triton_url: str, model: str) -> tuple[int, int]:
    """(inferences, executions) of a model, once Triton has recorded the requests already answered."""
    client = triton_grpc.InferenceServerClient(triton_url)

    def read() -> tuple[int, int]:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    # Triton updates statistics just after it sends a response; wait until two reads agree.
    previous, current = None, read()
    while current != previous:
        time.sleep(0.3)
        previous, current = current, read()
    return current


async def test_concurrent_clients_get_correct_results_and_triton_batches(stack: Stack, checkpoints) -> None:
    reference = eager(checkpoints["reranker"])
    queries = [f"{QUERY} {text(i % 5, seed=i)}" for i in range(16)]
    documents = [[text(n, seed=10 * i + n) for n in (3, 40, 11, 120)] for i in range(16)]
    before = triton_counts(stack.triton_url, "reranker")
    async with AsyncRerankClient(stack.target, timeout=120) as c:
        for _ in range(3):
            responses = await asyncio.gather(*(c.rerank(q, d) for q, d in zip(queries, documents, strict=True)))
    after = triton_counts(stack.triton_url, "reranker")
    for q, d, response in zip(queries, documents, responses, strict=True):
        np.testing.assert_allclose(served_logits(response, len(d)), reference.logits(q, d), atol=ATOL)
    requests, executions = after[0] - before[0], after[1] - before[1]
    assert requests >= 48  # one Triton request per call at least (others may share the server)
    assert executions < requests, f"Triton ran {executions} executions for {requests} requests: nothing was batched"


@pytest.mark.parametrize(
    ("query", "documents", "message"),
    [
        ("", ["a document"], "query: must not be empty"),
        ("   \n", ["a document"], "query: must not be empty"),
        ("a query", [], "at least one document"),
    ],
)
def test_invalid_requests_are_refused_and_the_server_keeps_serving(
    client: RerankClient, query: str, documents: list[str], message: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        client.rerank(query, documents)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details
    assert len(client.rerank(QUERY, ["still serving"]).results) == 1


def test_empty_documents_among_others_are_scored(client: RerankClient, checkpoints) -> None:
    documents = ["", text(5), ""]
    response = client.rerank(QUERY, documents)
    np.testing.assert_allclose(
        served_logits(response, 3), eager(checkpoints["reranker"]).logits(QUERY, documents), atol=ATOL
    )


def test_health_is_serving_for_the_server_and_the_service(stack: Stack) -> None:
    with grpc.insecure_channel(stack.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rerank.v1.RerankService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(stack: Stack) -> None:
    with grpc.insecure_channel(stack.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
    assert {"rerank.v1.RerankService", "grpc.health.v1.Health"} <= names


def test_cli_query_prints_a_ranked_table(stack: Stack) -> None:
    done = run_rerank(
        "query", "--target", stack.target, "what is the capital of China?", "Beijing", "weather", timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["rank", "index", "score", "logit", "document"]
    ranks = [line.split() for line in lines[1:3]]
    assert [r[0] for r in ranks] == ["1", "2"]
    assert {r[1] for r in ranks} == {"0", "1"}
    assert float(ranks[0][2]) >= float(ranks[1][2])


def test_cli_query_reports_errors_with_a_status(stack: Stack) -> None:
    done = run_rerank("query", "--target", stack.target, "", "doc", timeout=60)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "query: must not be empty" in done.stderr


def test_serve_printed_where_it_listens(stack: Stack, model_repository: Path) -> None:
    line = stack.printed("rerank: serving")
    assert stack.target.split(":")[1] in line and "Triton at" in line
    metrics_port = str(stack.metrics_url).rsplit(":", 1)[1].split("/")[0]
    assert f"metrics on 127.0.0.1:{metrics_port}" in line, line


def equal_length_documents(reference, count: int, tokens: int) -> list[str]:
    """`count` different documents whose (QUERY, document) pairs all tokenize to the same length."""
    found: list[str] = []
    for seed in range(2000):
        document = text(tokens // 2, seed=seed)
        if len(reference.encode(QUERY, document)) == len(reference.encode(QUERY, found[0] if found else document)):
            found.append(document)
        if len(found) == count:
            return found
    raise AssertionError("no documents of equal length found")


@pytest.mark.parametrize("model", ["reranker", "reranker_torch", "reranker_packed"])
def test_numpy_2_in_triton_serves_every_runtime_like_eager(
    numpy2_stack: Stack, numpy2_repository: Path, model: str, checkpoints
) -> None:
    # Triton 2.51's stub reads numpy 2 arrays wrongly through as_numpy() (each element as the first) and
    # writes numpy 2 outputs with a byte size of 0; the model reads and writes through DLPack instead.
    assert numpy2_stack.triton_log is not None
    log = numpy2_stack.triton_log.read_text(errors="replace")
    versions = re.findall(rf'"{model}: \w+ runtime, numpy (\S+)"', log)  # model.py logs it at load
    assert versions and versions[0].startswith("2."), f"the stub did not import numpy 2: {versions}"
    reference = eager(checkpoints[model])
    same = equal_length_documents(reference, 4, 40)
    requests = [mixed_documents(), same, [same[0]]]
    with (
        frontend(numpy2_stack, numpy2_repository, f"--model-name={model}") as served,
        RerankClient(served.target, timeout=60) as c,
    ):
        for documents in requests:
            got = served_logits(c.rerank(QUERY, documents), len(documents))
            np.testing.assert_allclose(got, reference.logits(QUERY, documents), atol=ATOL)
    assert len(set(np.round(reference.logits(QUERY, same), 4))) > 1, "equal-length pairs must score differently"
    assert "PyCapsule" not in numpy2_stack.triton_log.read_text(errors="replace")


def model_stub(stack: Stack, model: str) -> psutil.Process:
    """The Python-backend stub process that runs `model` in the stack's Triton."""
    frontend = psutil.Process(stack.process.pid)
    for process in frontend.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.name() == "triton_python_backend_stub" and f"/{model}/" in " ".join(process.cmdline()):
                return process
    raise AssertionError(f"no backend stub runs {model}")


def test_8192_token_documents_in_the_packed_engine_match_eager_and_memory_returns(
    stack: Stack, model_repository: Path, checkpoints
) -> None:
    reference = eager(checkpoints["reranker_long_packed"], "sdpa")
    documents = [text(9000, seed=1), text(30, seed=2), text(9000, seed=3)]
    stub = model_stub(stack, "reranker_long_packed")
    with (
        frontend(stack, model_repository, "--model-name=reranker_long_packed") as served,
        RerankClient(served.target, timeout=300) as c,
    ):
        c.rerank(QUERY, ["warm up"])  # the weights' pages and thread pools: the idle level of a serving model
        idle = stub.memory_info().rss
        response = c.rerank(QUERY, documents)
        after = stub.memory_info().rss
    np.testing.assert_allclose(served_logits(response, 3), reference.logits(QUERY, documents), atol=ATOL)
    # Generous: ONNX Runtime's arena kept ~6 GiB after one such pair on a model of this size; the packed
    # engine has no T x T buffer and returns its freed heap (malloc_trim) after long runs.
    assert after - idle < 512 * 2**20, f"the stub kept {(after - idle) / 2**20:.0f} MiB after two 8192-token pairs"
