"""First contact, as the README shows it: `make serve` where the model hub is unreachable ends within
seconds saying what to do, and `make demo` serves a random-weight ModernBERT, named as such, that gRPC,
HTTP, the SDK and the CLI can all be tried on."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from rerank_client import RerankClient
from rerank_server.first_contact import DEMO_MODEL_ID
from rerank_server.testing import wait_until_serving
from tests.conftest import RERANK, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
# The suite runs inside the installed venv (`make test` installs first); -o keeps a stamp older than a
# just-edited pyproject.toml from reinstalling in the middle of a test.
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]


def test_make_serve_without_the_hub_ends_within_seconds_saying_what_to_do(tmp_path: Path) -> None:
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [*MAKE, "serve", f"REPOSITORY={tmp_path / 'repository'}", "MODEL=some-org/some-reranker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 30
    assert "make serve MODEL=/path/to/" in done.stderr and "make demo" in done.stderr, done.stderr
    assert not (tmp_path / "repository").exists()


def test_make_demo_serves_a_named_random_model_on_grpc_http_sdk_and_cli(tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    serve_args = " ".join(
        f"--{name}={free_port()}" for name in ("triton-grpc-port", "triton-http-port", "triton-metrics-port")
    )
    log_path = Path(tempfile.mkstemp(prefix="make-demo-", suffix=".log")[1])
    command = [
        *MAKE,
        "demo",
        f"DEMO_DIR={tmp_path / 'demo'}",
        f"PORT={port}",
        f"HTTP_PORT={http_port}",
        f"SERVE_ARGS={serve_args} --metrics-port=0 --host=127.0.0.1",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        target = f"127.0.0.1:{port}"
        assert wait_until_serving(target, process, 600), log_path.read_text(errors="replace")
        with RerankClient(target, timeout=60) as client:
            grpc_answer = client.rerank("what is the capital of China?", ["Beijing", "rain"])
            assert grpc_answer.model == DEMO_MODEL_ID
        http_answer = httpx.post(
            f"http://127.0.0.1:{http_port}/v1/rerank",
            json={"query": "what is the capital of China?", "documents": ["Beijing", "rain"]},
            timeout=60,
        ).json()
        assert http_answer["model"] == DEMO_MODEL_ID
        assert [r["index"] for r in http_answer["results"]] == [r.index for r in grpc_answer.results]
        cli = subprocess.run(
            [*RERANK, "query", "--target", target, "what is the capital of China?", "Beijing", "rain"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0 and "Beijing" in cli.stdout, cli.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):  # make already ended (it failed to start)
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(120)
