"""Model selection on a real Triton: each request's `model` field, GetModelInfo and ListModels, and a
model the server does not serve (NOT_FOUND over gRPC, naming the served ones)."""

from __future__ import annotations

import grpc
import pytest

from rerank_client import ModelNotFoundError, RerankClient, from_stream_error, stream_request
from tests.conftest import Stack
from tests.texts import QUERY, mixed_documents


@pytest.fixture(scope="module")
def client(stack: Stack):
    with RerankClient(stack.target, timeout=120) as c:
        yield c


def test_the_default_model_answers_an_empty_model_field_and_its_own_name(client: RerankClient) -> None:
    documents = mixed_documents()
    default = client.rerank(QUERY, documents)
    named = client.rerank(QUERY, documents, model="reranker")
    assert named == default
    assert client.score([(QUERY, documents[0])], model="reranker") == client.score([(QUERY, documents[0])])
    assert client.model_info(model="reranker") == client.model_info()


def test_list_models_describes_each_served_model_and_names_the_default(client: RerankClient) -> None:
    listed = client.list_models()
    assert listed.default_model == "reranker"
    names = [info.triton_model_name for info in listed.models]
    assert "reranker" in names and names == sorted(names)
    assert listed.models[names.index("reranker")] == client.model_info()


def test_an_unknown_model_is_not_found_naming_the_served_models(client: RerankClient) -> None:
    for call in (
        lambda: client.rerank(QUERY, ["a"], model="no-such-model"),
        lambda: client.score([(QUERY, "a")], model="no-such-model"),
        lambda: client.model_info(model="no-such-model"),
    ):
        with pytest.raises(ModelNotFoundError, match="'no-such-model' is not served here") as caught:
            call()
        assert caught.value.code is grpc.StatusCode.NOT_FOUND
        assert "'reranker'" in caught.value.details
        assert [v.field for v in caught.value.field_violations] == ["model"]
    answers = {
        a.id: a
        for a in client.rerank_stream(
            [stream_request("bad", QUERY, ["a"], model="no-such-model"), stream_request("good", QUERY, ["a"])]
        )
    }
    assert isinstance(from_stream_error(answers["bad"].error), ModelNotFoundError)
    assert answers["good"].response.results[0].index == 0
