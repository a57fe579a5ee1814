"""`rerank export` and `rerank serve`, plugged into the `rerank` command of rerank-client
through the `rerank.commands` entry-point group. Heavy imports wait until a command runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_export(subparsers)
    _add_serve(subparsers)


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    from rerank_server.export import ExportOptions

    parser = subparsers.add_parser(
        "export",
        help="turn a ModernBERT cross-encoder checkpoint into a Triton model repository",
        description="Export a single-logit ModernBertForSequenceClassification checkpoint (hub id or local "
        "folder) to ONNX and write a Triton model repository around it.",
    )
    ExportOptions.add_arguments(parser)
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from rerank_server.export import ExportError, ExportOptions, export

    try:
        options = ExportOptions.from_arguments(args)
    except ValueError as error:
        print(f"rerank export: {error}", file=sys.stderr)
        return 2
    try:
        export(options, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ExportError as error:
        print(f"rerank export: {error}", file=sys.stderr)
        return 2
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from rerank_server.settings import Settings

    parser = subparsers.add_parser(
        "serve",
        help="serve the Rerank gRPC API (starting a local Triton unless --triton-url is given)",
        description="Start tritonserver on --model-repository (or reach one at --triton-url) and the "
        "tokenizing gRPC frontend; stop both on Ctrl-C or SIGTERM.",
    )
    Settings.add_arguments(parser)
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from rerank_server.app import run
    from rerank_server.observability import configure_logging
    from rerank_server.settings import Settings
    from rerank_server.tracing import configure_tracing

    try:
        settings = Settings.load(args)
    except ValueError as error:
        print(f"rerank serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    configure_tracing(settings.otel_exporter)
    logging.getLogger(__name__).info("settings:\n%s", settings.describe())
    return asyncio.run(run(settings))
