"""Settings: flags over RERANK_* environment variables over defaults, checked values."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rerank_server.settings import Settings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"RERANK_PORT": "6000", "RERANK_MAX_DOCUMENTS": "7", "RERANK_TRITON_URL": "triton:8001"}
    settings = Settings.load(parse("--port", "7000"), env)
    assert settings.port == 7000
    assert settings.max_documents == 7
    assert settings.triton_url == "triton:8001"
    assert settings.max_query_tokens == Settings.max_query_tokens  # default
    assert Settings.load(parse("--model-repository", "repo"), {}).model_repository == Path("repo")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "x"], {}, "port: 'x' is not a valid int"),
        (["--max-documents", "0"], {"RERANK_TRITON_URL": "t:1"}, "max_documents must be positive"),
        ([], {}, "give --model-repository"),
    ],
)
def test_bad_values_are_named(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load(parse(*argv), env)


def test_every_setting_is_described() -> None:
    text = Settings.load(parse("--triton-url", "t:1"), {}).describe()
    for name in ("port", "triton_url", "max_documents", "tokenizer_threads"):
        assert f"{name} = " in text
