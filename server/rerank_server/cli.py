"""`rerank export` and `rerank serve`, plugged into the `rerank` command of rerank-client
through the `rerank.commands` entry-point group. Heavy imports wait until a command runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_export(subparsers)
    _add_serve(subparsers)


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    from rerank_server.export import DEFAULT_MODEL, RUNTIMES, ExportOptions

    defaults = ExportOptions()
    parser = subparsers.add_parser(
        "export",
        help="turn a ModernBERT cross-encoder checkpoint into a Triton model repository",
        description="Export a single-logit ModernBertForSequenceClassification checkpoint (hub id or local "
        "folder) to ONNX and write a Triton model repository around it.",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub id or local checkpoint folder (default: %(default)s)"
    )
    parser.add_argument("--output", type=Path, required=True, help="model repository folder to write into")
    parser.add_argument("--name", default=defaults.name, help="model name in the repository (default: %(default)s)")
    parser.add_argument(
        "--model-id", default=None, help="model name reported to callers (default: the hub id or folder name)"
    )
    parser.add_argument("--tokenizer", default=None, help="hub id or folder of the tokenizer (default: --model)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="instance kind (default: %(default)s)")
    parser.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default=defaults.runtime,
        help="what runs the model in Triton: onnxruntime (the exported ONNX graph; onnxruntime-gpu on GPUs) or "
        "torch (the checkpoint through transformers' PyTorch model) (default: onnxruntime; torch for bf16; "
        "--precision auto picks it)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "int8", "fp16"],
        default=None,
        help="cpu: auto (the default: measure the precisions this CPU runs natively and keep the fastest that "
        "ranks like fp32), fp32, bf16 (PyTorch) or int8 (ONNX Runtime dynamic quantization); gpu: fp16 (the "
        "default) or fp32. A CPU model keeps fp32 weights: a CPU without bf16 or VNNI serves those instead",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="same as --precision int8 (kept for older scripts)",
    )
    parser.add_argument("--max-length", type=int, default=None, help="tokens per pair (default: the model's limit)")
    parser.add_argument(
        "--max-batch-size", type=int, default=defaults.max_batch_size, help="requests merged per execution"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="padded tokens per model run (default: max(8192, max length))",
    )
    parser.add_argument(
        "--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, help="dynamic batcher delay"
    )
    parser.add_argument("--instance-count", type=int, default=defaults.instance_count, help="model instances")
    parser.add_argument(
        "--intra-op-threads", type=int, default=defaults.intra_op_threads, help="ONNX Runtime threads (0: all cores)"
    )
    parser.add_argument("--opset", type=int, default=defaults.opset, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model of that name")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from rerank_server.export import ExportError, ExportOptions, export

    options = ExportOptions(**{k: v for k, v in vars(args).items() if k not in ("func", "command")})
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
