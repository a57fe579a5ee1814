"""`make serve MODEL=<local folder>` and the `rerank query` that follows it, as the README shows them: the
default export (`--precision auto`, long pairs routed to the packed engine) of a checkpoint on disk, served,
answering the CLI. The model is a tiny random one; the ports are free ones rather than 50051/8080."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from rerank_server.testing import exported_parameters, wait_until_serving
from rerank_triton_model.runtimes import ONNXRUNTIME
from tests.conftest import RERANK, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]
QUERY = ("what is the capital of China?", "Beijing", "The weather is nice today")


def test_make_serve_exports_a_local_checkpoint_once_and_answers_the_cli(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    repository, port = tmp_path / "repository", free_port()
    triton_ports = " ".join(
        f"--{n}={free_port()}" for n in ("triton-grpc-port", "triton-http-port", "triton-metrics-port")
    )
    command = [
        *MAKE,
        "serve",
        f"MODEL={checkpoints['reranker_long']}",
        f"REPOSITORY={repository}",
        f"PORT={port}",
        f"HTTP_PORT={free_port()}",
        f"SERVE_ARGS={triton_ports} --metrics-port=0 --host=127.0.0.1",
    ]
    log_path = Path(tempfile.mkstemp(prefix="make-serve-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        target = f"127.0.0.1:{port}"
        assert wait_until_serving(target, process, 900), log_path.read_text(errors="replace")[-4000:]
        cli = subprocess.run(
            [*RERANK, "query", "--target", target, *QUERY], capture_output=True, text=True, timeout=120
        )
        assert cli.returncode == 0, cli.stderr
        assert all(document in cli.stdout for document in QUERY[1:]), cli.stdout
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # make and `rerank serve` under it, as Ctrl-C would
        process.wait(120)
    # Exported once: a second `make serve` serves the export as it is, until the exporter's sources are newer.
    export = [*MAKE, "-q", "export", f"MODEL={checkpoints['reranker_long']}", f"REPOSITORY={repository}"]
    assert subprocess.run(export, cwd=ROOT).returncode == 0
    config = repository / "reranker" / "config.pbtxt"
    os.utime(config, (0, 0))
    assert subprocess.run(export, cwd=ROOT).returncode == 1  # make -q: a target to make again
    # The export the Makefile made: the default precision choice, measured here, and long-pair routing.
    parameters = exported_parameters(repository / "reranker")
    assert parameters.precision_reason.startswith("auto: ")
    assert parameters.source_model == checkpoints["reranker_long"].name
    assert parameters.fp32_runtime == ONNXRUNTIME.name  # every CPU can fall back to it, so it routes long pairs
    assert parameters.long_pair_tokens > 0 and (repository / "reranker" / "1" / parameters.long_weights).is_dir()
