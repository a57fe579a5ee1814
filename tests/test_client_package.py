"""The client distribution: light dependencies, and an SDK whose errors are typed."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.metadata import requires
from pathlib import Path

import grpc
import pytest

from rerank_client import (
    AsyncRerankClient,
    InvalidRequestError,
    ModelNotFoundError,
    RerankClient,
    RerankTimeoutError,
    UnavailableError,
    build_rerank_request,
    build_score_request,
    stream_request,
)
from rerank_client.cli import main
from rerank_client.pb import rerank_pb2
from tests.conftest import Stack, free_port
from tests.texts import QUERY

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "onnxruntime", "tritonclient", "transformers", "tokenizers", "numpy", "onnx")


def test_the_client_distribution_requires_none_of_the_heavy_packages() -> None:
    names = {
        r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for r in requires("rerank-client") or []
    }
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}


def test_the_sdk_and_cli_import_and_run_with_heavy_packages_blocked() -> None:
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import rerank_client
from rerank_client.cli import main
from rerank_client.pb import rerank_pb2
try:
    main(["query", "--target", "127.0.0.1:{free_port()}", "--timeout", "2", "q", "d"])
except SystemExit:
    raise
print("ok", [m for m in {HEAVY!r} if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ok []" in done.stdout
    # The query ran: it failed to connect, with a status, not with an ImportError.
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr


def test_a_dead_target_raises_unavailable_error() -> None:
    with RerankClient(f"127.0.0.1:{free_port()}", timeout=5) as client, pytest.raises(UnavailableError) as caught:
        client.rerank("q", ["d"])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_single_string_is_not_taken_for_a_list_of_documents() -> None:
    with pytest.raises(TypeError, match="sequence of strings"):
        build_rerank_request("q", "one document")
    request = build_rerank_request("q", ("a", "b"), top_n=None, return_documents=True)
    assert list(request.documents) == ["a", "b"] and request.top_n == 0 and request.return_documents


def refused_field(caught: pytest.ExceptionInfo[InvalidRequestError]) -> str:
    """The one field an InvalidRequestError the SDK raised before sending names."""
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and len(error.field_violations) == 1
    field = error.field_violations[0].field
    assert str(error) == f"INVALID_ARGUMENT: {field}: holds a lone surrogate, which UTF-8 cannot carry"
    return field


async def test_text_utf8_cannot_carry_is_an_invalid_request_naming_the_field_before_sending(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A lone surrogate (a command line's undecodable byte, a JSON escape) in any string sent: protobuf
    would raise a UnicodeEncodeError naming nothing. Nothing listens at the target: refused before sending."""
    refused = {
        "query": lambda: build_rerank_request("\ud800", ["x"]),
        "documents[1]": lambda: build_rerank_request("q", ["fine", "lone \udc00"]),
        "model": lambda: build_rerank_request("q", ["x"], model="m\udcff"),
        "pairs[0].text_b": lambda: build_score_request([("q", "\ud800")]),
        "pairs[1].text_a": lambda: build_score_request([("q", "d"), ("\ud800", "d")]),
        "id": lambda: stream_request("\ud800", "q", ["x"]),
    }
    for field, build in refused.items():
        with pytest.raises(InvalidRequestError) as caught:
            build()
        assert refused_field(caught) == field
    assert build_rerank_request("q", ["emoji \U0001f680"]).documents[0] == "emoji \U0001f680"

    target = f"127.0.0.1:{free_port()}"
    with RerankClient(target, timeout=5, retries=0) as client:
        for field, call in {
            "query": lambda: client.rerank("\ud800", ["x"]),
            "pairs[0].text_a": lambda: client.score([("\ud800", "x")]),
            "model": lambda: client.model_info(model="\udc00"),
        }.items():
            with pytest.raises(InvalidRequestError) as caught:
                call()
            assert refused_field(caught) == field
    async with AsyncRerankClient(target, timeout=5, retries=0) as aio:
        with pytest.raises(InvalidRequestError) as caught:
            await aio.rerank("q", ["\ud800"])
        assert refused_field(caught) == "documents[0]"
        with pytest.raises(InvalidRequestError) as caught:
            await aio.model_info(model="\ud800")
        assert refused_field(caught) == "model"

    # The command line: an argument with a byte that is not UTF-8 (a surrogate escape) is refused, no traceback.
    assert main(["query", "--target", target, "--timeout", "5", "q", "bad \udcff"]) == 1
    assert "documents[0]: holds a lone surrogate" in capsys.readouterr().err


async def test_a_stream_whose_requests_raise_raises_their_error(stack: Stack) -> None:
    """stream_request refusing a message inside the caller's generator: that InvalidRequestError, not the
    call's failure gRPC makes of it (UNKNOWN when blocking, a cancellation in asyncio)."""

    def requests() -> Iterator[rerank_pb2.RerankStreamRequest]:
        yield stream_request("a", "q", ["d"])
        yield stream_request("b", "\ud800", ["d"])

    with RerankClient(stack.target) as client, pytest.raises(InvalidRequestError) as caught:
        for _ in client.rerank_stream(requests()):
            pass
    assert refused_field(caught) == "query"

    async def arequests() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        for request in requests():
            yield request

    async with AsyncRerankClient(stack.target) as aio:
        for source in (requests(), arequests()):
            with pytest.raises(InvalidRequestError) as caught:
                async for _ in aio.rerank_stream(source):
                    pass
            assert refused_field(caught) == "query"
        # The client goes on.
        assert len((await aio.rerank("q", ["d"])).results) == 1


# -- priority and the token --------------------------------------------------------------------------------


async def test_a_priority_the_uint32_field_cannot_hold_is_an_invalid_request_before_sending(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Negative, fractional, boolean, too large or not a number: protobuf would raise a ValueError or a
    TypeError naming nothing. Nothing listens at the target: refused before sending."""
    assert build_rerank_request("q", ["x"]).priority == 0
    assert build_rerank_request("q", ["x"], priority=1).priority == 1
    assert build_score_request([("q", "d")], priority=2**32 - 1).priority == 2**32 - 1
    assert stream_request("s", "q", ["x"], priority=5).request.priority == 5

    def refused(caught: pytest.ExceptionInfo[InvalidRequestError]) -> None:
        error = caught.value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.field_violations] == ["priority"]
        assert str(error).startswith("INVALID_ARGUMENT: priority: must be an integer from 0 to 4294967295")

    builders: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (build_rerank_request, ("q", ["x"])),
        (build_score_request, ([("q", "d")],)),
        (stream_request, ("s", "q", ["x"])),
    ]
    for bad in (-1, 1.5, 1.0, True, 2**32, "1"):
        for build, args in builders:
            with pytest.raises(InvalidRequestError) as caught:
                build(*args, priority=bad)
            refused(caught)

    target = f"127.0.0.1:{free_port()}"
    with RerankClient(target, timeout=5, retries=0) as client:
        for call in (lambda: client.rerank("q", ["x"], priority=-1), lambda: client.score([("q", "x")], priority=-1)):
            with pytest.raises(InvalidRequestError) as caught:
                call()
            refused(caught)
    async with AsyncRerankClient(target, timeout=5, retries=0) as aio:
        with pytest.raises(InvalidRequestError) as caught:
            await aio.rerank("q", ["x"], priority=-1)
        refused(caught)
        with pytest.raises(InvalidRequestError) as caught:
            await aio.score([("q", "x")], priority=0.5)  # type: ignore[arg-type]
        refused(caught)

    assert main(["score", "--target", target, "--timeout", "5", "--priority", "-1", "--pair", "q", "d"]) == 1
    assert "priority: must be an integer from 0" in capsys.readouterr().err


async def test_a_token_a_header_cannot_carry_is_refused_when_the_client_is_made(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newline, a tab, a non-ASCII letter or a lone surrogate: gRPC would fail every call with INTERNAL
    "Invalid metadata" (or raise a UnicodeEncodeError). The message gives the position, never the token."""
    target = f"127.0.0.1:{free_port()}"
    for token, position in (("s3cret\n", 6), ("s3\tcret", 2), ("caf\u00e9-s3cret", 3), ("\ud800s3cret", 0)):
        for make in (RerankClient, AsyncRerankClient):
            with pytest.raises(ValueError, match=rf"^token: the character at position {position} cannot") as caught:
                make(target, token=token)
            assert "s3cret" not in str(caught.value)
    # Visible ASCII and spaces are what a header holds; an empty token sends no header at all.
    for token in ("s3cret", "a b~!", ""):
        RerankClient(target, token=token).close()
    # The command line (--token, or $RERANK_TOKEN with a stray newline): a message, no traceback.
    monkeypatch.setenv("RERANK_TOKEN", "s3cret\n")
    with pytest.raises(SystemExit) as exited:
        main(["query", "--target", target, "q", "d"])
    assert exited.value.code == "rerank: token: the character at position 6 cannot be sent in a gRPC header " + (
        "(only visible ASCII and spaces can)"
    )


async def test_priority_reaches_the_server_and_leaves_the_scores_as_they_are(stack: Stack) -> None:
    """Rerank, Score and RerankStream at a background priority are answered as at 0 (the ordering itself:
    tests/test_http_compat.py, with Triton's queue held)."""
    documents = ["Beijing", "The weather is nice today", "Shanghai"]
    with RerankClient(stack.target, timeout=60) as client:
        first, background = (client.rerank(QUERY, documents, priority=p) for p in (0, 1))
        assert [(r.index, r.logit) for r in background.results] == [(r.index, r.logit) for r in first.results]
        pairs = [(QUERY, d) for d in documents]
        first_scores, background_scores = (client.score(pairs, priority=p) for p in (0, 7))
        assert [s.logit for s in background_scores.scores] == [s.logit for s in first_scores.scores]
        streamed = {
            answer.id: answer
            for answer in client.rerank_stream(stream_request(f"p{p}", QUERY, documents, priority=p) for p in (0, 3))
        }
    assert [(r.index, r.logit) for r in streamed["p3"].response.results] == [(r.index, r.logit) for r in first.results]
    async with AsyncRerankClient(stack.target, timeout=60) as aio:
        answered = await aio.rerank(QUERY, documents, priority=2**32 - 1)
    assert [(r.index, r.logit) for r in answered.results] == [(r.index, r.logit) for r in first.results]


# -- the request id ----------------------------------------------------------------------------------------


async def test_a_request_id_the_server_would_not_use_as_given_is_refused_before_sending() -> None:
    """A character a header cannot carry (the server would make its own id) or more than 128 (it would cut
    it): the caller's logs would hold another id than the service's. Nothing listens at the target."""

    def refused(caught: pytest.ExceptionInfo[InvalidRequestError], why: str) -> None:
        error = caught.value
        assert [v.field for v in error.field_violations] == ["request_id"] and error.request_id is None
        assert str(error).startswith(f"INVALID_ARGUMENT: request_id: {why}")

    bad_ids = {
        "id\n": "the character at position 2 cannot",
        "caf\u00e9": "the character at position 3 cannot",
        "x" * 129: "is 129 characters long; at most 128",
        7: "must be a str, not int",
    }
    target = f"127.0.0.1:{free_port()}"
    with RerankClient(target, timeout=5, retries=0) as client:
        calls: list[tuple[Callable[..., object], tuple[object, ...]]] = [
            (client.rerank, ("q", ["x"])),
            (client.score, ([("q", "x")],)),
            (client.model_info, ()),
            (client.list_models, ()),
            (lambda **options: list(client.rerank_stream([], **options)), ()),
        ]
        for bad, why in bad_ids.items():
            for call, args in calls:
                with pytest.raises(InvalidRequestError) as caught:
                    call(*args, request_id=bad)
                refused(caught, why)
        # 128 visible ASCII characters and spaces are sent (and fail to connect: no id came back).
        with pytest.raises(UnavailableError) as unavailable:
            client.list_models(request_id="a b~" * 32)
        assert unavailable.value.request_id is None
    async with AsyncRerankClient(target, timeout=5, retries=0) as aio:
        for bad, why in bad_ids.items():
            with pytest.raises(InvalidRequestError) as caught:
                await aio.rerank("q", ["x"], request_id=bad)  # type: ignore[arg-type]
            refused(caught, why)
            with pytest.raises(InvalidRequestError) as caught:
                async for _ in aio.rerank_stream([], request_id=bad):  # type: ignore[arg-type]
                    pass
            refused(caught, why)


async def test_the_request_id_reaches_the_server_and_its_errors_carry_the_id_it_used(stack: Stack) -> None:
    """The caller's id is the one the server echoes; without one, the server's own comes back. A stream's
    id is set once, at open."""

    def slow_requests() -> Iterator[rerank_pb2.RerankStreamRequest]:
        yield stream_request("a", QUERY, ["d"])
        time.sleep(3)  # past the stream's deadline

    with RerankClient(stack.target, timeout=60) as client:
        assert len(client.rerank(QUERY, ["d"], request_id="mine-ok").results) == 1
        with pytest.raises(InvalidRequestError) as invalid:
            client.rerank("", ["d"], request_id="mine-1")
        assert invalid.value.request_id == "mine-1"
        with pytest.raises(ModelNotFoundError) as not_found:
            client.model_info(model="no-such-model", request_id="mine 2")
        assert not_found.value.request_id == "mine 2"
        with pytest.raises(ModelNotFoundError) as generated:
            client.score([(QUERY, "d")], model="no-such-model")
        assert re.fullmatch(r"[0-9a-f]{32}", generated.value.request_id or "")
        with pytest.raises(RerankTimeoutError) as timed_out:
            for _ in client.rerank_stream(slow_requests(), timeout=1, request_id="stream-1"):
                pass
        assert timed_out.value.request_id == "stream-1"

    async def slow_arequests() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        yield stream_request("a", QUERY, ["d"])
        await asyncio.sleep(3)

    async with AsyncRerankClient(stack.target, timeout=60) as aio:
        assert len((await aio.list_models(request_id="mine-ok")).models) >= 1
        with pytest.raises(InvalidRequestError) as invalid:
            await aio.rerank("", ["d"], request_id="mine-3")
        assert invalid.value.request_id == "mine-3"
        with pytest.raises(RerankTimeoutError) as timed_out:
            async for _ in aio.rerank_stream(slow_arequests(), timeout=1, request_id="stream-2"):
                pass
        assert timed_out.value.request_id == "stream-2"


# -- the distribution as a user installs it ------------------------------------------------------------------


def test_the_readmes_pip_install_gives_a_working_sdk_with_only_its_light_dependencies(
    stack: Stack, tmp_path: Path
) -> None:
    """`pip install ./client` as the README writes it, into a new venv: the package it builds holds the
    generated code (a file left out of the distribution would only show here, not in the repository's
    editable install), pulls in none of the heavy packages, and ranks like the repository's SDK."""
    repo = tmp_path / "repo"
    shutil.copytree(
        ROOT / "client",
        repo / "client",
        ignore=shutil.ignore_patterns("go", "typescript", "*.egg-info", "build", "__pycache__"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "./client"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    documents = ["Beijing", "The weather is nice today", "Shanghai"]
    script = f"""
import importlib.metadata, json
from rerank_client import RerankClient
with RerankClient({stack.target!r}, timeout=60.0) as client:
    response = client.rerank({QUERY!r}, {documents!r})
names = sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions())
print(json.dumps({{"results": [[r.index, r.logit] for r in response.results], "names": names}}))
"""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert not set(answer["names"]) & set(HEAVY), answer["names"]
    assert {"grpcio", "protobuf", "rerank-client"} <= set(answer["names"])
    with RerankClient(stack.target, timeout=60) as client:
        expected = client.rerank(QUERY, documents)
    assert answer["results"] == [[r.index, r.logit] for r in expected.results]
