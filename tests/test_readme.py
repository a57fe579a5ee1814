"""The README's SDK snippet, as a user copies it: run against a real stack, it prints the best result of the
same call the SDK makes, and its asyncio twin returns every document with its text."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

from rerank_client import RerankClient
from tests.conftest import Stack

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(section: str, language: str) -> str:
    body = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(rf"```{language}\n(.*?)```", body, re.S)
    return block


def test_readme_sdk_snippet_prints_the_best_result_and_its_async_twin_answers(stack: Stack) -> None:
    code = readme_block("The SDK in ten lines", "python").replace("localhost:50051", stack.target)
    namespace: dict[str, Any] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, namespace)
    index, score, logit, tokens = printed.getvalue().split()
    with RerankClient(stack.target, timeout=60) as client:
        expected = client.rerank("what is the capital of China?", ["Beijing", "The weather is nice today"], top_n=1)
    best = expected.results[0]
    assert int(index) == best.index
    assert float(score) == best.score and float(logit) == best.logit
    assert int(tokens) == expected.usage.input_tokens > 0

    asyncio.run(namespace["main"]())  # the twin's call runs to completion against the same server
