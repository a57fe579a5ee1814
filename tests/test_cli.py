"""The `rerank` command line's options, without a server (fast tier): what each command sends."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rerank_client import cli
from rerank_client.pb import rerank_pb2


class _Client:
    """Stands in for RerankClient: records the stream's messages and answers each with its id."""

    def __init__(self) -> None:
        self.sent: list[rerank_pb2.RerankStreamRequest] = []

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def rerank_stream(
        self, requests: Iterable[rerank_pb2.RerankStreamRequest], **_: Any
    ) -> Iterator[rerank_pb2.RerankStreamResponse]:
        for request in requests:
            self.sent.append(request)
            yield rerank_pb2.RerankStreamResponse(id=request.id)


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> _Client:
    fake = _Client()

    def made(args: argparse.Namespace) -> _Client:
        return fake

    monkeypatch.setattr(cli, "_client", made)
    return fake


@pytest.mark.parametrize("flag", [[], ["--model", "beta"]], ids=["default", "model"])
def test_stream_takes_model_like_query_and_score_and_a_lines_own_model_wins(
    client: _Client, tmp_path: Path, flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "requests.jsonl"
    lines.write_text(
        "\n".join(
            json.dumps(line)
            for line in (
                {"id": "a", "query": "q", "documents": ["d"]},
                {"id": "b", "query": "q", "documents": ["d"], "model": "gamma"},
            )
        )
    )
    assert cli.main(["stream", *flag, str(lines)]) == 0
    assert {m.id: m.request.model for m in client.sent} == {"a": flag[1] if flag else "", "b": "gamma"}
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == ["a", "b"]
