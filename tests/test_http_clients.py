"""The vendors' own clients, installed from PyPI, pointed at `rerank serve` through their base-URL options.

Each asserts the ranking the gRPC Rerank call gives on the same input, with scores within 1e-6 of it:
the HTTP APIs are translations over the same core, so they must not change a single score.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rerank_client import RerankClient
from tests.conftest import Stack, frontend
from tests.texts import QUERY, text

pytestmark = pytest.mark.e2e

# Lengths from a few tokens to past the tiny model's 512 (END truncation cuts the last one).
DOCUMENTS = [text(n, seed=100 + i) for i, n in enumerate((40, 3, 7, 300, 12, 25, 90, 700))]
TOP_N = 3
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def base_url(stack: Stack, model_repository: Path) -> Iterator[str]:
    """A frontend serving `reranker` alone: the clients send their own vendor's model names (Cohere's
    "rerank-v3.5", the docs' "rerank"), which a server of one model answers with it."""
    with frontend(stack, model_repository, "--model-name=reranker") as served:
        assert served.http_url is not None
        yield served.http_url


@pytest.fixture(scope="module")
def reference(stack: Stack) -> list[Any]:
    """The gRPC answer: every document, best first."""
    with RerankClient(stack.target, timeout=60) as client:
        results = list(client.rerank(QUERY, DOCUMENTS).results)
    assert len({round(r.score, 6) for r in results}) == len(DOCUMENTS), "ties would make rankings ambiguous"
    return results


@pytest.fixture(scope="module")
def chunked_reference(stack: Stack) -> list[Any]:
    """The gRPC answer with CHUNK truncation: Cohere v1's default (the long document has fewer than 10 windows)."""
    with RerankClient(stack.target, timeout=60) as client:
        return list(client.rerank(QUERY, DOCUMENTS, truncation="chunk").results)


def assert_same(ranked: list[tuple[Any, Any]], reference: list[Any], *, logits: bool = False) -> None:
    """`ranked` (index, score) pairs, best first, equal the reference's first len(ranked) results."""
    assert len(ranked) > 0
    expected = [(r.index, r.logit if logits else r.score) for r in reference[: len(ranked)]]
    assert [i for i, _ in ranked] == [i for i, _ in expected]
    for (_, got), (_, want) in zip(ranked, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_cohere_sdk_v1_client(base_url: str, chunked_reference: list[Any]) -> None:
    """The SDK's call is told from Jina's by its header: Cohere's defaults (long documents chunked, no
    documents returned unless asked)."""
    import cohere

    client = cohere.Client(api_key="unused", base_url=base_url)
    response = client.rerank(query=QUERY, documents=DOCUMENTS, top_n=TOP_N, return_documents=True)
    assert_same([(r.index, r.relevance_score) for r in response.results], chunked_reference)
    assert [r.document.text if r.document else None for r in response.results] == [
        DOCUMENTS[r.index] for r in response.results
    ]
    assert response.meta is not None and response.meta.api_version is not None
    assert response.meta.api_version.version == "1"
    # Object documents are ranked on their `text`: the same answer; no documents unless asked.
    sent = [{"text": d, "id": str(i)} for i, d in enumerate(DOCUMENTS)]
    objects = client.rerank(query=QUERY, documents=sent)
    assert_same([(r.index, r.relevance_score) for r in objects.results], chunked_reference)
    assert all(r.document is None for r in objects.results)
    # Asked: each comes back as it was sent, every field kept.
    echoed = client.rerank(query=QUERY, documents=sent, top_n=TOP_N, return_documents=True)
    for result in echoed.results:
        assert result.document is not None and result.document.dict() == sent[result.index]


def test_cohere_sdk_v2_client(base_url: str, reference: list[Any]) -> None:
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=base_url)
    response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, top_n=TOP_N)
    assert_same([(r.index, r.relevance_score) for r in response.results], reference)
    assert response.id  # the request id
    everything = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    assert_same([(r.index, r.relevance_score) for r in everything.results], reference)
    assert len(everything.results) == len(DOCUMENTS)


def test_a_vendor_model_name_is_a_404_naming_the_served_models_when_several_are_served(stack: Stack) -> None:
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=stack.http_url)
    with pytest.raises(cohere.errors.NotFoundError) as raised:
        client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    assert "'rerank-v3.5' is not served here" in str(raised.value.body) and "reranker_mean" in str(raised.value.body)
    answer = client.rerank(model="reranker_mean", query=QUERY, documents=DOCUMENTS[:2])
    assert len(answer.results) == 2


def ranking(ranker: Any) -> tuple[list[tuple[Any, Any]], bool]:
    """Rank DOCUMENTS for QUERY with a framework's ranker object (or take a Cohere SDK answer's ranking):
    the (index, score) pairs best first, and whether the scores are logits (NIM's)."""
    kind = f"{type(ranker).__module__}.{type(ranker).__name__}"
    if kind.startswith("cohere.") and hasattr(ranker, "results"):  # an answer of the Cohere SDK
        return [(r.index, r.relevance_score) for r in ranker.results], False
    if kind.startswith("litellm."):  # an answer of litellm.rerank
        return litellm_ranked(ranker), False
    if kind.startswith(("langchain_cohere.", "langchain_nvidia_ai_endpoints.")):
        from langchain_core.documents import Document

        documents = [Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCUMENTS)]
        compressed = ranker.compress_documents(documents, QUERY)
        return [(d.metadata["i"], d.metadata["relevance_score"]) for d in compressed], "nvidia" in kind
    if kind.startswith("llama_index."):
        ranked = ranker.postprocess_nodes(nodes(), query_str=QUERY)
        return [(int(n.node.node_id), n.score) for n in ranked], "nvidia" in kind
    if kind.startswith("haystack_integrations."):
        import haystack

        stored = [haystack.Document(content=d, meta={"i": i}) for i, d in enumerate(DOCUMENTS)]
        ranked = ranker.run(query=QUERY, documents=stored)["documents"]
        return [(d.meta["i"], d.score) for d in ranked], bool(getattr(ranker, "raw_scores", False))
    raise AssertionError(f"no way to rank with a {kind}")


def test_langchain_cohere_rerank_compress_documents(base_url: str, reference: list[Any]) -> None:
    from langchain_cohere import CohereRerank
    from pydantic import SecretStr

    ranker = CohereRerank(cohere_api_key=SecretStr("unused"), base_url=base_url, model="rerank-v3.5", top_n=TOP_N)
    assert_same(ranking(ranker)[0], reference)


def nodes() -> list[Any]:
    from llama_index.core.schema import NodeWithScore, TextNode

    return [NodeWithScore(node=TextNode(text=d, id_=str(i)), score=0.0) for i, d in enumerate(DOCUMENTS)]


def test_llamaindex_cohere_rerank(base_url: str, reference: list[Any]) -> None:
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    ranker = CohereRerank(api_key="unused", base_url=base_url, model="rerank-v3.5", top_n=TOP_N)
    assert_same(ranking(ranker)[0], reference)


def test_llamaindex_tei_rerank(base_url: str, reference: list[Any]) -> None:
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    ranker = TextEmbeddingInference(base_url=base_url, top_n=TOP_N)
    assert_same(ranking(ranker)[0], reference)


def test_haystack_tei_ranker(base_url: str, reference: list[Any]) -> None:
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    assert_same(ranking(HuggingFaceTEIRanker(url=base_url, top_k=TOP_N, token=None))[0], reference)
    # raw_scores: the logits.
    raw = HuggingFaceTEIRanker(url=base_url, top_k=TOP_N, token=None, raw_scores=True)
    ranked, logits = ranking(raw)
    assert logits
    assert_same(ranked, reference, logits=True)


def test_llamaindex_jina_rerank(base_url: str, reference: list[Any]) -> None:
    """Jina's clients on the shared /v1/rerank route: Jina's defaults (END truncation, documents returned)."""
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    ranker = JinaRerank(
        base_url=f"{base_url}/v1", api_key="unused", model="jina-reranker-v2-base-multilingual", top_n=3
    )
    assert_same(ranking(ranker)[0], reference)


def test_haystack_jina_ranker(base_url: str, reference: list[Any]) -> None:
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.jina import JinaRanker

    ranker = JinaRanker(api_key=Secret.from_token("unused"), top_k=TOP_N, base_url=f"{base_url}/v1/rerank")
    assert_same(ranking(ranker)[0], reference)


def test_langchain_nvidia_rerank(base_url: str, reference: list[Any]) -> None:
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "model unknown": it is not in NVIDIA's catalogue
        ranker = NVIDIARerank(base_url=f"{base_url}/v1", top_n=TOP_N, truncate="END")
    assert ranker.model  # taken from /v1/models
    assert_same(ranking(ranker)[0], reference, logits=True)


def test_llamaindex_nvidia_rerank(base_url: str, reference: list[Any]) -> None:
    from llama_index.postprocessor.nvidia_rerank import NVIDIARerank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranker = NVIDIARerank(base_url=f"{base_url}/v1", top_n=TOP_N, truncate="END")
    assert_same(ranking(ranker)[0], reference, logits=True)


# LiteLLM's rerank(): each of its providers that takes a self-hosted base URL. Left out: nvidia_nim/ without
# ranking/ (NVIDIA's hosted /v1/retrieval/<model>/reranking, which a NIM container does not serve), azure_ai/
# and litellm_proxy/ (Azure's and LiteLLM's own servers), and the hosted services' own shapes (deepinfra/,
# voyage/, together_ai/, fireworks_ai/, bedrock/, vertex_ai/, watsonx/).
# Its import fetches a price list from GitHub, retrying for seconds where there is no network, unless told
# to read the copy it ships.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def litellm_rerank(model: str, api_base: str, documents: list[str] = DOCUMENTS, **options: Any) -> Any:
    import litellm

    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" on stdout with each error
    return litellm.rerank(model=model, api_base=api_base, api_key="unused", query=QUERY, documents=documents, **options)


def litellm_ranked(response: Any) -> list[tuple[Any, Any]]:
    return [(r["index"], r["relevance_score"]) for r in response.results]


def assert_documents_echoed(response: Any, documents: list[str] = DOCUMENTS) -> None:
    assert [r["document"] for r in response.results] == [{"text": documents[r["index"]]} for r in response.results]


def test_litellm_cohere(base_url: str, reference: list[Any], chunked_reference: list[Any]) -> None:
    """cohere/ calls /v2/rerank with v2's first fields (return_documents: LiteLLM's default is true)."""
    response = litellm_rerank("cohere/rerank-v3.5", base_url, top_n=TOP_N)
    assert_same(litellm_ranked(response), reference)
    assert len(response.results) == TOP_N
    assert_documents_echoed(response)
    bare = litellm_rerank("cohere/rerank-v3.5", base_url, return_documents=False)
    assert_same(litellm_ranked(bare), reference)
    assert len(bare.results) == len(DOCUMENTS) and all("document" not in r for r in bare.results)
    # An api_base ending in /v1/rerank, or max_chunks_per_doc, makes it Cohere v1's body, without the SDK's
    # header: Jina's defaults (END) unless max_chunks_per_doc says Cohere (chunked).
    v1 = litellm_rerank("cohere/rerank-v3.5", f"{base_url}/v1/rerank", top_n=TOP_N)
    assert_same(litellm_ranked(v1), reference)
    assert_documents_echoed(v1)
    chunked = litellm_rerank("cohere/rerank-v3.5", base_url, top_n=TOP_N, max_chunks_per_doc=10)
    assert_same(litellm_ranked(chunked), chunked_reference)


def test_litellm_jina(base_url: str, reference: list[Any]) -> None:
    """jina_ai/ calls /v1/rerank on the base URL's host (any path of it dropped)."""
    response = litellm_rerank("jina_ai/jina-reranker-v2-base-multilingual", base_url, top_n=TOP_N)
    assert_same(litellm_ranked(response), reference)
    assert len(response.results) == TOP_N
    assert_documents_echoed(response)


# vLLM's, Infinity's and TEI's bodies as LiteLLM sends them do not ask to truncate, and it has no way to add a
# field to them: the documents that fit are ranked, and the one past the model's 512 tokens is refused, as
# vLLM and TEI (with truncate false) refuse it. LiteLLM reports a refusal as an APIConnectionError.
FITTING = DOCUMENTS[:-1]


def fitting(reference: list[Any]) -> list[Any]:
    return [r for r in reference if r.index < len(FITTING)]


def test_litellm_hosted_vllm(base_url: str, reference: list[Any]) -> None:
    """hosted_vllm/ calls /rerank with vLLM's rerank body: vLLM's answer."""
    import litellm

    response = litellm_rerank("hosted_vllm/rerank", base_url, documents=FITTING, top_n=TOP_N)
    assert_same(litellm_ranked(response), fitting(reference))
    assert len(response.results) == TOP_N
    assert_documents_echoed(response, FITTING)
    with pytest.raises(litellm.APIConnectionError, match="does not fit: with the query it is"):
        litellm_rerank("hosted_vllm/rerank", base_url, top_n=TOP_N)


def test_litellm_infinity(base_url: str, reference: list[Any]) -> None:
    """infinity/ sends hosted_vllm/'s body to /rerank, and gets vLLM's answer. Only without documents:
    Infinity answers each document as a string, vLLM (and so this server: the two bodies are the same) as
    {"text": ...}, which LiteLLM's Infinity parser refuses. return_documents is LiteLLM's default."""
    import litellm

    response = litellm_rerank("infinity/rerank", base_url, documents=FITTING, top_n=TOP_N, return_documents=False)
    assert_same(litellm_ranked(response), fitting(reference))
    assert len(response.results) == TOP_N
    assert all("document" not in r for r in response.results)
    with pytest.raises(litellm.APIConnectionError, match=r"document\.text\s+Input should be a valid string"):
        litellm_rerank("infinity/rerank", base_url, documents=FITTING, top_n=TOP_N)


def test_litellm_huggingface_tei(base_url: str, reference: list[Any]) -> None:
    """huggingface/ calls TEI's /rerank with truncate false. It sends top_n, which TEI does not have, and does
    not cut the answer itself: every text, best first."""
    import litellm

    response = litellm_rerank("huggingface/rerank", base_url, documents=FITTING, top_n=TOP_N)
    assert_same(litellm_ranked(response), fitting(reference))
    assert len(response.results) == len(FITTING)
    assert_documents_echoed(response, FITTING)  # TEI's return_text
    with pytest.raises(litellm.APIConnectionError, match="does not fit: with the query it is"):
        litellm_rerank("huggingface/rerank", base_url, top_n=TOP_N)


def test_litellm_nvidia_nim(base_url: str, reference: list[Any]) -> None:
    """nvidia_nim/ranking/<model> calls a NIM's /v1/ranking: logits. truncate is passed on ("END"; NIM's
    default, "NONE", refuses the long document); top_n is sent as a top_k that NIM does not have, and LiteLLM
    does not cut the answer itself: every passage, best first."""
    import litellm

    response = litellm_rerank("nvidia_nim/ranking/rerank", f"{base_url}/v1", top_n=TOP_N, truncate="END")
    assert_same(litellm_ranked(response), reference, logits=True)
    assert len(response.results) == len(DOCUMENTS)
    assert_documents_echoed(response)  # LiteLLM's, from the request
    with pytest.raises(litellm.APIConnectionError, match="does not fit: with the query it is"):
        litellm_rerank("nvidia_nim/ranking/rerank", f"{base_url}/v1", top_n=TOP_N)


DOCS_HTTP = README.parent / "docs" / "http.md"


def blocks(page: Path, language: str) -> list[str]:
    """The fenced `language` blocks of the page's HTTP API section (the README's) or of the whole page."""
    text = page.read_text()
    if page == README:
        text = text.split("## The HTTP APIs", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.mark.parametrize("page", [README, DOCS_HTTP], ids=["README", "docs/http.md"])
def test_curl_commands_of_the_docs(base_url: str, page: Path) -> None:
    (block,) = blocks(page, "sh")
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("curl")]
    assert len(commands) >= 4
    for command in commands:
        command = command.replace("localhost:8080", base_url.removeprefix("http://"))
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        results = (
            answer if isinstance(answer, list) else answer.get("results", answer.get("rankings", answer.get("data")))
        )
        assert isinstance(results, list) and results, answer


def snippet_values(block: str, base_url: str) -> list[Any]:
    """Run a Python snippet as written (q, docs: the query and documents it leaves to the reader), and
    return the value of each of its top-level expressions: the answers and rankers it makes."""
    namespace: dict[str, Any] = {"q": QUERY, "docs": DOCUMENTS}
    values = []
    for statement in ast.parse(block.replace("http://localhost:8080", base_url)).body:
        if isinstance(statement, ast.Expr):
            values.append(eval(compile(ast.Expression(statement.value), "<snippet>", "eval"), namespace))
        else:
            exec(compile(ast.Module([statement], []), "<snippet>", "exec"), namespace)
    return values


@pytest.mark.parametrize("page", [README, DOCS_HTTP], ids=["README", "docs/http.md"])
def test_framework_snippets_of_the_docs_rank_like_grpc(
    base_url: str, reference: list[Any], chunked_reference: list[Any], page: Path
) -> None:
    (block,) = blocks(page, "python")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = snippet_values(block, base_url)
        rankings = [ranking(value) for value in values]
    # Cohere v2 and v1 answers, LangChain's and LlamaIndex's Cohere rankers, LlamaIndex's TEI, Haystack, NIM, and
    # on docs/http.md Jina's rankers and LiteLLM's answers.
    assert len(rankings) >= 7, values
    for value, (ranked, logits) in zip(values, rankings, strict=True):
        assert len(ranked) == TOP_N
        # The Cohere v1 SDK's call gets Cohere v1's default: long documents chunked.
        cohere_v1 = type(value).__module__ == "cohere.types.rerank_response"
        assert_same(ranked, chunked_reference if cohere_v1 else reference, logits=logits)
