"""The `rerank` command line.

`rerank query` ships with the client. Other packages add subcommands through the `rerank.commands`
entry-point group (rerank-service adds `export` and `serve`), so the client never imports them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from google.protobuf.json_format import MessageToDict

from rerank_client._proto.rerank.v1 import rerank_pb2
from rerank_client.client import RerankClient
from rerank_client.errors import RerankError

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


def _run_query(args: argparse.Namespace) -> int:
    with RerankClient(args.target, timeout=args.timeout) as client:
        response = client.rerank(args.query, args.documents, top_n=args.top_n)
    if args.json:
        print(json.dumps(MessageToDict(response, always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_table(response, args.documents))
    return 0


def _add_query_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("query", help="rerank documents against a query on a running service")
    parser.add_argument("--target", default="localhost:50051", help="HOST:PORT of the service (default: %(default)s)")
    parser.add_argument("--top-n", type=int, default=None, help="return only the N best documents")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("query")
    parser.add_argument("documents", nargs="+", metavar="DOC")
    parser.set_defaults(func=_run_query)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank", description="Cross-encoder reranking over gRPC.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_query_command(subparsers)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()(subparsers)
        except ImportError as error:
            # A plug-in whose own dependencies are missing must not break `rerank query`.
            print(f"rerank: commands of {entry_point.value} unavailable ({error})", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except RerankError as error:
        print(f"rerank: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
