"""bench/cache.py runs end to end (tiny model, smaller requests): the repeated calls are answered from the
cache with the first call's logits, the no-repeat workload gets no hits, the cache stays under its bound.
The speed-up itself is the benchmark's to report (docs/performance.md): two shared cores are too noisy to
time in a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bench import run_quick

pytestmark = pytest.mark.e2e


def test_cache_benchmark_runs_and_reports_hits_and_memory(tmp_path: Path) -> None:
    done = run_quick("cache", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "cache.json").read_text())
    first, retry, page, reformulated, half = result["repeated"]
    assert (first["hits"], first["misses"]) == (0, 300)
    assert (retry["hits"], page["hits"]) == (300, 300) and retry["logits_equal_first_call"]
    assert reformulated["hits"] == 0 and (half["hits"], half["misses"]) == (150, 150)
    assert result["no_repeats"]["hits"] == 0 and result["no_repeats"]["seconds_on"] > 0
    memory = result["memory"]
    assert 0 < memory["cache_bytes"] <= result["cache_bytes"] and memory["cache_entries"] > 0
    assert "| the same call again (a retry) | 300 |" in done.stdout
