"""Settings: flags over RERANK_* environment variables over defaults, checked values."""

from __future__ import annotations

import argparse
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from rerank_server import flags
from rerank_server.flags import option
from rerank_server.settings import Settings
from tests.conftest import RERANK


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


@dataclass(frozen=True)
class _Options:
    """A dataclass of every field type flags converts."""

    switch: bool = option(False, "a bool")
    count: int = option(3, "an int")
    ratio: float | None = option(None, "a float or nothing")
    folder: Path | None = option(None, "a path")
    name: str = option("x", "a string", choices=("x", "y"))


def parse_options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_arguments(_Options, parser, "T_")
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("text", "value"), [("false", False), ("0", False), ("No", False), ("true", True), ("1", True)]
)
def test_a_bool_from_the_environment_is_a_bool(text: str, value: bool) -> None:
    options = _Options(**flags.values(_Options, parse_options(), {"T_SWITCH": text}, "T_"))
    assert options.switch is value


def test_bool_flags_win_over_the_environment_and_bad_values_are_named() -> None:
    assert flags.values(_Options, parse_options("--switch"), {"T_SWITCH": "false"}, "T_")["switch"] is True
    assert flags.values(_Options, parse_options("--no-switch"), {"T_SWITCH": "true"}, "T_")["switch"] is False
    with pytest.raises(ValueError, match="switch: 'maybe' is not a valid bool"):
        flags.values(_Options, parse_options(), {"T_SWITCH": "maybe"}, "T_")
    with pytest.raises(ValueError, match=r"count: '2\.5' is not a valid int"):
        flags.values(_Options, parse_options("--count", "2.5"), {}, "T_")


def test_values_are_typed_and_unset_fields_keep_their_defaults() -> None:
    given = flags.values(_Options, parse_options("--count", "7", "--ratio", "0.5", "--folder", "a/b"), {}, "T_")
    assert given == {"count": 7, "ratio": 0.5, "folder": Path("a/b")}
    assert _Options(**given).switch is False and _Options(**given).name == "x"
    with pytest.raises(SystemExit):  # choices are argparse's
        parse_options("--name", "z")


def test_help_names_the_variable_and_the_default() -> None:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    text = parser.format_help()
    assert "RERANK_MAX_DOCUMENTS" in text and "default 1000" in text


def test_export_options_use_the_same_conversion() -> None:
    from rerank_server.export import ExportOptions

    parser = argparse.ArgumentParser()
    ExportOptions.add_arguments(parser)
    options = ExportOptions.from_arguments(parser.parse_args(["--output", "out", "--max-length", "128", "--overwrite"]))
    assert options.output == Path("out") and options.max_length == 128 and options.overwrite is True
    assert options.max_batch_size == ExportOptions.max_batch_size  # not given: the default
    plain = ExportOptions.from_arguments(parser.parse_args(["--output", "out"]))
    assert plain.overwrite is False and plain.max_length is None
    with pytest.raises(SystemExit):  # --output is required
        parser.parse_args([])


def test_exported_config_has_triton_priority_levels_only_when_asked() -> None:
    """The default config.pbtxt gives Triton's batcher no priority levels and no queue policy (either would turn
    off its prefetching); --triton-priority adds the two levels. Both parse as Triton's ModelConfig."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from rerank_server.export import ExportOptions
    from rerank_server.export.write import render_config
    from rerank_triton_model.contract import ModelParameters

    parser = argparse.ArgumentParser()
    ExportOptions.add_arguments(parser)
    parameters = ModelParameters(
        source_model="m", precision="fp32", max_length=512, vocab_size=100, pad_token_id=0, max_batch_tokens=8192
    )
    configs = []
    for argv in (["--output", "out"], ["--output", "out", "--triton-priority"]):
        rendered = render_config(ExportOptions.from_arguments(parser.parse_args(argv)), parameters)
        configs.append(text_format.Parse(rendered, model_config_pb2.ModelConfig()).dynamic_batching)
    default, asked = configs
    assert default.max_queue_delay_microseconds == asked.max_queue_delay_microseconds == 2000
    assert (default.priority_levels, default.HasField("default_queue_policy")) == (0, False)
    assert (asked.priority_levels, asked.default_priority_level) == (2, 1)


def test_serve_refuses_to_start_a_triton_on_ports_in_use(tmp_path: Path) -> None:
    """Another server on Triton's gRPC port: the Triton this server starts would exit, and the frontend would
    serve through the other one at localhost. It stops at once, naming the port and the way out."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*RERANK, "serve", "--model-repository", str(tmp_path), f"--triton-grpc-port={port}", "--metrics-port=0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"--triton-grpc-port {port}" in done.stderr and "--triton-url" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
        (["--max-batch-tokens", "0"], "--max-batch-tokens must be at least 1, got 0"),
        (["--max-queue-delay-us", "-1"], "--max-queue-delay-us must be at least 0, got -1"),
        (["--instance-count", "0"], "--instance-count must be at least 1, got 0"),
        (["--intra-op-threads", "-2"], "--intra-op-threads must be at least 0, got -2"),
    ],
)
def test_export_refuses_numbers_triton_could_not_load_before_any_work(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    """Refused by name before the checkpoint is read (the model folder here does not even exist)."""
    from rerank_server.export import ExportError, ExportOptions, export

    parser = argparse.ArgumentParser()
    ExportOptions.add_arguments(parser)
    options = ExportOptions.from_arguments(
        parser.parse_args(
            ["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path), "--precision", "fp32", *argv]
        )
    )
    with pytest.raises(ExportError, match=message):
        export(options)
    assert list(tmp_path.iterdir()) == []
