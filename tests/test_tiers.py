"""`make test-fast`, as the README writes it: the fast tier runs on its own, without Triton or exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_test_fast_runs_the_fast_tier_alone() -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "test-fast"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|deselected)", summary)}
    passed, deselected = counts.get("passed", 0), counts.get("deselected", 0)
    assert passed >= 100, summary  # the core, tokenization, engines, contract, settings, deployment files
    assert deselected >= 100, summary  # the end-to-end tier stayed out
    assert "tritonserver" not in done.stdout + done.stderr
