"""The client distribution: light dependencies, and an SDK whose errors are typed."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires

import grpc
import pytest

from rerank_client import RerankClient, UnavailableError, build_rerank_request
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

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
