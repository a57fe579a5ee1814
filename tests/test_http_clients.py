"""The vendors' own clients, installed from PyPI, pointed at `rerank serve` through their base-URL options.

Each asserts the ranking the gRPC Rerank call gives on the same input, with scores within 1e-6 of it:
the HTTP APIs are translations over the same core, so they must not change a single score.
"""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

from rerank_client import RerankClient
from tests.conftest import Stack
from tests.texts import QUERY, text

# Lengths from a few tokens to past the tiny model's 512 (END truncation cuts the last one).
DOCUMENTS = [text(n, seed=100 + i) for i, n in enumerate((40, 3, 7, 300, 12, 25, 90, 700))]
TOP_N = 3
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def base_url(stack: Stack) -> str:
    assert stack.http_url is not None
    return stack.http_url


@pytest.fixture(scope="module")
def reference(stack: Stack) -> list[Any]:
    """The gRPC answer: every document, best first."""
    with RerankClient(stack.target, timeout=60) as client:
        results = list(client.rerank(QUERY, DOCUMENTS).results)
    assert len({round(r.score, 6) for r in results}) == len(DOCUMENTS), "ties would make rankings ambiguous"
    return results


def assert_same(ranked: list[tuple[Any, Any]], reference: list[Any], *, logits: bool = False) -> None:
    """`ranked` (index, score) pairs, best first, equal the reference's first len(ranked) results."""
    assert len(ranked) > 0
    expected = [(r.index, r.logit if logits else r.score) for r in reference[: len(ranked)]]
    assert [i for i, _ in ranked] == [i for i, _ in expected]
    for (_, got), (_, want) in zip(ranked, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_cohere_sdk_v1_client(base_url: str, reference: list[Any]) -> None:
    import cohere

    client = cohere.Client(api_key="unused", base_url=base_url)
    response = client.rerank(query=QUERY, documents=DOCUMENTS, top_n=TOP_N, return_documents=True)
    assert_same([(r.index, r.relevance_score) for r in response.results], reference)
    assert [r.document.text if r.document else None for r in response.results] == [
        DOCUMENTS[r.index] for r in response.results
    ]
    assert response.meta is not None and response.meta.api_version is not None
    assert response.meta.api_version.version == "1"
    # Object documents are ranked on their `text`: the same answer.
    objects = client.rerank(query=QUERY, documents=[{"text": d, "id": str(i)} for i, d in enumerate(DOCUMENTS)])
    assert_same([(r.index, r.relevance_score) for r in objects.results], reference)


def test_cohere_sdk_v2_client(base_url: str, reference: list[Any]) -> None:
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=base_url)
    response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, top_n=TOP_N)
    assert_same([(r.index, r.relevance_score) for r in response.results], reference)
    assert response.id  # the request id
    everything = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    assert_same([(r.index, r.relevance_score) for r in everything.results], reference)
    assert len(everything.results) == len(DOCUMENTS)


def test_langchain_cohere_rerank_compress_documents(base_url: str, reference: list[Any]) -> None:
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document
    from pydantic import SecretStr

    ranker = CohereRerank(cohere_api_key=SecretStr("unused"), base_url=base_url, model="rerank-v3.5", top_n=TOP_N)
    documents = [Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCUMENTS)]
    compressed = ranker.compress_documents(documents, QUERY)
    assert_same([(d.metadata["i"], d.metadata["relevance_score"]) for d in compressed], reference)


def nodes() -> list[Any]:
    from llama_index.core.schema import NodeWithScore, TextNode

    return [NodeWithScore(node=TextNode(text=d, id_=str(i)), score=0.0) for i, d in enumerate(DOCUMENTS)]


def test_llamaindex_cohere_rerank(base_url: str, reference: list[Any]) -> None:
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    ranker = CohereRerank(api_key="unused", base_url=base_url, model="rerank-v3.5", top_n=TOP_N)
    ranked = ranker.postprocess_nodes(nodes(), query_str=QUERY)
    assert_same([(int(n.node.node_id), n.score) for n in ranked], reference)


def test_llamaindex_tei_rerank(base_url: str, reference: list[Any]) -> None:
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    ranker = TextEmbeddingInference(base_url=base_url, top_n=TOP_N)
    ranked = ranker.postprocess_nodes(nodes(), query_str=QUERY)
    assert_same([(int(n.node.node_id), n.score) for n in ranked], reference)


def test_haystack_tei_ranker(base_url: str, reference: list[Any]) -> None:
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=base_url, top_k=TOP_N, token=None)
    documents = [Document(content=d, meta={"i": i}) for i, d in enumerate(DOCUMENTS)]
    ranked = ranker.run(query=QUERY, documents=documents)["documents"]
    assert_same([(d.meta["i"], d.score) for d in ranked], reference)
    # raw_scores: the logits.
    raw = HuggingFaceTEIRanker(url=base_url, top_k=TOP_N, token=None, raw_scores=True)
    ranked = raw.run(query=QUERY, documents=documents)["documents"]
    assert_same([(d.meta["i"], d.score) for d in ranked], reference, logits=True)


def test_langchain_nvidia_rerank(base_url: str, reference: list[Any]) -> None:
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "model unknown": it is not in NVIDIA's catalogue
        ranker = NVIDIARerank(base_url=f"{base_url}/v1", top_n=TOP_N, truncate="END")
    assert ranker.model  # taken from /v1/models
    documents = [Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCUMENTS)]
    ranked = ranker.compress_documents(documents, QUERY)
    assert_same([(d.metadata["i"], d.metadata["relevance_score"]) for d in ranked], reference, logits=True)


def test_llamaindex_nvidia_rerank(base_url: str, reference: list[Any]) -> None:
    from llama_index.postprocessor.nvidia_rerank import NVIDIARerank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranker = NVIDIARerank(base_url=f"{base_url}/v1", top_n=TOP_N, truncate="END")
    ranked = ranker.postprocess_nodes(nodes(), query_str=QUERY)
    assert_same([(int(n.node.node_id), n.score) for n in ranked], reference, logits=True)


def readme_blocks(language: str) -> list[str]:
    section = README.read_text().split("## The HTTP APIs", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_readme_curl_commands(base_url: str) -> None:
    (block,) = readme_blocks("sh")
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("curl")]
    assert len(commands) == 4
    for command in commands:
        command = command.replace("localhost:8080", base_url.removeprefix("http://"))
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        results = answer if isinstance(answer, list) else answer.get("results", answer.get("rankings"))
        assert isinstance(results, list) and results, answer


def test_readme_framework_snippets(base_url: str) -> None:
    (block,) = readme_blocks("python")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(block.replace("http://localhost:8080", base_url), {"q": QUERY, "docs": DOCUMENTS})
