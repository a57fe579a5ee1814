"""bench/http.py runs end to end (tiny model, QUICK workloads): both protocols measured on (b) and (c),
the same scores through both (checked inside), a ratio per round. The 0.95 target itself is the
benchmark's to report (README), not this test's: two shared cores are too noisy to time in a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_http_benchmark_runs_and_reports_both_protocols(tmp_path: Path) -> None:
    output = tmp_path / "http.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.http", "--quick", "--rounds", "2", "--repeats", "2", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a target missed on a busy machine
    result = json.loads(output.read_text())
    assert set(result["workloads"]) == {"b", "c"}
    for item in result["workloads"].values():
        assert item["grpc_pairs_per_s"] > 0 and item["http_pairs_per_s"] > 0
        assert len(item["http_over_grpc_per_round"]) == 2
    assert "| HTTP / gRPC |" in done.stdout
