"""The two tiers: `make test` runs the fast tier (`make test-fast`, as the README's developer notes write it)
and then the end-to-end tier (two processes at once), so each test runs once; together they are the whole
suite."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST_COLLECT = (sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider")


def test_the_fast_tier_is_the_suite_without_the_end_to_end_modules() -> None:
    done = subprocess.run(
        [*PYTEST_COLLECT, "-m", "not e2e"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fast = [line for line in done.stdout.splitlines() if "::" in line]
    (summary,) = re.findall(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", done.stdout)
    selected, total, deselected = map(int, summary)
    assert selected == len(fast) and selected + deselected == total
    assert selected >= 100 and deselected >= 100  # the core, tokenization, engines, contract, settings, files
    # Modules that only run against Triton stay out (conftest refuses a fast test that needs it).
    assert not [test for test in fast if test.startswith(("tests/test_serving.py", "tests/test_operations.py"))]


def test_a_fast_test_that_needs_triton_is_a_collection_error(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_probe(stack):\n    pass\n")
    done = subprocess.run(
        [*PYTEST_COLLECT, "-p", "tests.conftest", "--rootdir", str(ROOT), str(probe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "must be marked e2e" in done.stdout + done.stderr and "test_probe (uses " in done.stderr


def collected(args: list[str]) -> set[str]:
    done = subprocess.run([*PYTEST_COLLECT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_make_test_runs_each_test_once() -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    runs = [shlex.split(line.split("-m pytest", 1)[1]) for line in done.stdout.splitlines() if "-m pytest" in line]
    assert len(runs) == 3 and ["-m", "not e2e"] in runs, runs
    # The end-to-end tier's two processes split it: the second runs the modules the first leaves out, each
    # with end-to-end tests, and the first keeps some.
    (timed,) = [run for run in runs if run[:2] == ["-m", "e2e"]]
    (untimed,) = [run for run in runs if run[:2] == ["-p", "no:cacheprovider"]]
    assert timed[:2] == ["-m", "e2e"] and untimed[:4] == ["-p", "no:cacheprovider", "-m", "e2e"], runs
    ignored = [a.removeprefix("--ignore=") for a in timed[2:]]
    assert all(a.startswith("--ignore=") for a in timed[2:]) and ignored == untimed[4:] and ignored, runs
    modules = {test.split("::")[0] for test in collected(["-m", "e2e"])}
    assert set(ignored) < modules, set(ignored) - modules
