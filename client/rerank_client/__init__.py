"""Typed SDK for the rerank.v1 gRPC service.

    from rerank_client import RerankClient

    with RerankClient("localhost:50051") as client:
        response = client.rerank("what is the capital of China?", ["Beijing", "The weather is nice today"])
        for result in response.results:
            print(result.index, result.score)

Results are the generated rerank.v1 messages (typed through their .pyi stubs), re-exported here.
"""

from rerank_client._proto.rerank.v1.rerank_pb2 import (
    FieldViolation,
    GetModelInfoResponse,
    Limits,
    ListModelsResponse,
    PairScore,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankStreamRequest,
    RerankStreamResponse,
    ScoreRequest,
    ScoreResponse,
    StreamError,
    TextPair,
    Truncation,
    Usage,
)
from rerank_client.client import (
    AsyncRerankClient,
    RerankClient,
    build_rerank_request,
    build_score_request,
    message_size_options,
    stream_request,
    tls_credentials,
)
from rerank_client.errors import (
    AuthenticationError,
    CancelledError,
    InvalidRequestError,
    ModelNotFoundError,
    RerankError,
    RerankTimeoutError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
    from_stream_error,
)

__all__ = [
    "AsyncRerankClient",
    "AuthenticationError",
    "CancelledError",
    "FieldViolation",
    "GetModelInfoResponse",
    "InvalidRequestError",
    "Limits",
    "ListModelsResponse",
    "ModelNotFoundError",
    "PairScore",
    "RerankClient",
    "RerankError",
    "RerankRequest",
    "RerankResponse",
    "RerankResult",
    "RerankStreamRequest",
    "RerankStreamResponse",
    "RerankTimeoutError",
    "ResourceExhaustedError",
    "ScoreRequest",
    "ScoreResponse",
    "ServerError",
    "StreamError",
    "TextPair",
    "Truncation",
    "UnavailableError",
    "Usage",
    "build_rerank_request",
    "build_score_request",
    "from_stream_error",
    "message_size_options",
    "stream_request",
    "tls_credentials",
]
