"""Generated bad and random requests for RerankService (hypothesis), counting the statuses they get."""

from __future__ import annotations

from collections import Counter, deque

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rerank_client.pb import rerank_pb2

short_text = st.text(max_size=40)
documents = st.lists(short_text, max_size=6)
options = st.fixed_dictionaries(
    {
        "truncation": st.integers(0, 6),  # 5 and 6 are not Truncation values
        "max_length": st.one_of(st.just(0), st.integers(0, 2**32 - 1), st.integers(0, 600)),
    },
    optional={"chunk_overlap": st.integers(0, 2**32 - 1), "model": st.one_of(short_text, st.just("reranker"))},
)
rerank_requests = st.builds(
    lambda q, d, top_n, docs_back, opts: rerank_pb2.RerankRequest(
        query=q, documents=d, top_n=top_n, return_documents=docs_back, **opts
    ),
    st.one_of(short_text, st.just(""), st.just(" ")),
    documents,
    st.integers(0, 2**32 - 1),
    st.booleans(),
    options,
)
score_requests = st.builds(
    lambda pairs, opts: rerank_pb2.ScoreRequest(
        pairs=[rerank_pb2.TextPair(text_a=a, text_b=b) for a, b in pairs], **opts
    ),
    st.lists(st.tuples(short_text, short_text), max_size=5),
    options,
)
# What reaches the server: a method and the bytes of its request, well-formed or not.
calls = st.one_of(
    st.tuples(st.just("Rerank"), rerank_requests.map(lambda m: m.SerializeToString())),
    st.tuples(st.just("Score"), score_requests.map(lambda m: m.SerializeToString())),
    st.tuples(st.sampled_from(["Rerank", "Score", "GetModelInfo", "ListModels"]), st.binary(max_size=120)),
)


# Calls in flight at once: the server batches them as it batches any callers' (and the run takes a fraction
# of the time one call after another takes).
IN_FLIGHT = 8


def fuzz_rerank_service(target: str, examples: int) -> Counter[str]:
    """Send `examples` generated calls, a few at a time; returns how many got each status code."""
    codes: Counter[str] = Counter()
    pending: deque[grpc.Future] = deque()

    def settle(future: grpc.Future) -> None:
        try:
            future.result()
            codes["OK"] += 1
        except grpc.RpcError as error:
            codes[error.code().name] += 1

    with grpc.insecure_channel(target) as channel:
        methods = {
            name: channel.unary_unary(f"/rerank.v1.RerankService/{name}")
            for name in ("Rerank", "Score", "GetModelInfo", "ListModels")
        }

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(calls)
        def send(call: tuple[str, bytes]) -> None:
            method, payload = call
            pending.append(methods[method].future(payload, timeout=30))
            if len(pending) >= IN_FLIGHT:
                settle(pending.popleft())

        send()
        while pending:
            settle(pending.popleft())
    return codes
