"""The `rerank` command line.

`rerank query`, `score`, `stream` and `info` ship with the client, one per RPC. Other packages add
subcommands through the `rerank.commands` entry-point group (rerank-service adds `export` and
`serve`), so the client never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from rerank_client.client import RerankClient, stream_request, tls_credentials
from rerank_client.errors import RerankError
from rerank_client.pb import rerank_pb2

ENTRY_POINT_GROUP = "rerank.commands"
Command = Callable[[argparse.Namespace], int]


def format_table(response: rerank_pb2.RerankResponse, documents: Sequence[str], width: int = 60) -> str:
    """A ranked, human-readable table of a RerankResponse."""
    rows = [f"{'rank':>4}  {'index':>5}  {'score':>8}  {'logit':>9}  document"]
    for rank, result in enumerate(response.results, start=1):
        text = documents[result.index].replace("\n", " ")
        if len(text) > width:
            text = text[: width - 1] + "…"
        rows.append(f"{rank:>4}  {result.index:>5}  {result.score:>8.4f}  {result.logit:>9.4f}  {text}")
    rows.append(f"model: {response.model}  input tokens: {response.usage.input_tokens}")
    return "\n".join(rows)


def _print_json(message: Message) -> None:
    print(json.dumps(MessageToDict(message, always_print_fields_with_no_presence=True), ensure_ascii=False))


def _client(args: argparse.Namespace) -> RerankClient:
    credentials = None
    if args.tls or args.tls_ca or args.tls_cert:
        credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    try:
        return RerankClient(args.target, timeout=args.timeout, credentials=credentials, token=args.token)
    except ValueError as error:  # a token a header cannot carry (--token or $RERANK_TOKEN)
        raise SystemExit(f"rerank: {error}") from None


def _run_query(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.rerank(
            args.query,
            args.documents,
            top_n=args.top_n,
            truncation=args.truncation,
            max_length=args.max_length,
            chunk_overlap=args.chunk_overlap,
            model=args.model,
            priority=args.priority,
        )
    if args.json:
        _print_json(response)
    else:
        print(format_table(response, args.documents))
    return 0


def _run_score(args: argparse.Namespace) -> int:
    pairs = [(text_a, text_b) for text_a, text_b in args.pair]
    with _client(args) as client:
        response = client.score(
            pairs,
            truncation=args.truncation,
            max_length=args.max_length,
            chunk_overlap=args.chunk_overlap,
            model=args.model,
            priority=args.priority,
        )
    if args.json:
        _print_json(response)
    else:
        for (text_a, text_b), scored in zip(pairs, response.scores, strict=True):
            print(f"{scored.score:.4f}  {scored.logit:>9.4f}  {text_a[:30]!r} / {text_b[:40]!r}")
    return 0


def _run_stream(args: argparse.Namespace) -> int:
    """JSON lines in ({"id", "query", "documents", ...rerank options}), JSON lines out, as they complete;
    --model is the model of every line that names none (a line's own "model" wins)."""
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    defaults = {} if args.model is None else {"model": args.model}
    failed = 0
    with source, _client(args) as client:
        messages = (stream_request(**{**defaults, **json.loads(line)}) for line in source if line.strip())
        for response in client.rerank_stream(messages):
            failed += response.HasField("error")
            _print_json(response)
    return 1 if failed else 0


def _run_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.model_info(model=args.model))
    return 0


def _run_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.list_models())
    return 0


def _target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="HOST:PORT of the service (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("RERANK_TOKEN"), help="bearer token (default: $RERANK_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--tls-ca", default=None, help="PEM file of the CA to trust (implies --tls)")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate chain, for mTLS")
    parser.add_argument("--tls-key", default=None, help="PEM client private key, for mTLS")


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a served model's name (default: the server's default model)")


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truncation", choices=["end", "start", "none", "chunk"], default=None, help="default: end")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per pair (default: the model's limit)")
    parser.add_argument("--chunk-overlap", type=int, default=None, help="tokens windows share with --truncation chunk")
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="lower first; above 0: background work, queued behind calls at 0 (default: 0)",
    )
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    _model_option(parser)


def _add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    query = subparsers.add_parser("query", help="rerank documents against a query on a running service")
    _target_options(query)
    _scoring_options(query)
    query.add_argument("--top-n", type=int, default=None, help="return only the N best documents")
    query.add_argument("query")
    query.add_argument("documents", nargs="+", metavar="DOC")
    query.set_defaults(func=_run_query)

    score = subparsers.add_parser("score", help="score (text_a, text_b) pairs, in order")
    _target_options(score)
    _scoring_options(score)
    score.add_argument("--pair", nargs=2, action="append", required=True, metavar=("TEXT_A", "TEXT_B"))
    score.set_defaults(func=_run_score)

    stream = subparsers.add_parser("stream", help="rerank JSON-lines requests over RerankStream")
    _target_options(stream)
    _model_option(stream)
    stream.add_argument("input", help='file of JSON lines {"id": ..., "query": ..., "documents": [...]}, - for stdin')
    stream.set_defaults(func=_run_stream)

    info = subparsers.add_parser("info", help="describe a served model and the service's limits")
    _target_options(info)
    _model_option(info)
    info.set_defaults(func=_run_info)

    models = subparsers.add_parser("models", help="list the served models and the default one")
    _target_options(models)
    models.set_defaults(func=_run_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank", description="Cross-encoder reranking over gRPC.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_client_commands(subparsers)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()(subparsers)
        except ImportError as error:
            # A plug-in whose own dependencies are missing must not break the client's commands.
            print(f"rerank: commands of {entry_point.value} unavailable ({error})", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except RerankError as error:
        print(f"rerank: {error}", file=sys.stderr)
        for violation in error.field_violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
