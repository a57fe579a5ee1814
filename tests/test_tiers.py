"""The two tiers: `make test` runs the fast tier (`make test-fast`, as the README's developer notes write it)
and then the end-to-end tier (two processes at once), so each test runs once; together they are the whole
suite."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiers import COLLECTED_TIERS, LIST_TIERS_ENV

ROOT = Path(__file__).resolve().parents[1]
PYTEST_COLLECT = (sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider")


def collected_the_whole_suite(config: pytest.Config) -> bool:
    """The session was given no paths (pytest collected its testpaths) and ignores none."""
    ignored = (config.getoption("ignore") or []) + (config.getoption("ignore_glob") or [])
    return config.args_source is pytest.Config.ArgsSource.TESTPATHS and not ignored


@pytest.fixture(scope="module")
def tiers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The whole suite's tests by tier ("e2e", "fast"): the tier each test declares, as tests/conftest.py
    lists them from a collection of the whole suite; this session's own when it collected the whole suite,
    else one in a process of its own, checked against what pytest lists there."""
    if collected_the_whole_suite(request.config):
        lines = request.config.stash[COLLECTED_TIERS]
    else:
        listing = tmp_path_factory.mktemp("tiers") / "tiers.txt"
        done = subprocess.run(
            PYTEST_COLLECT, cwd=ROOT, env={**os.environ, LIST_TIERS_ENV: str(listing)}, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = listing.read_text().splitlines()
        assert {line.split(" ", 1)[1] for line in lines} == {line for line in done.stdout.splitlines() if "::" in line}
    by_tier: dict[str, set[str]] = {"e2e": set(), "fast": set()}
    for line in lines:
        tier, test = line.split(" ", 1)
        by_tier[tier].add(test)
    return by_tier


def test_the_fast_tier_is_the_suite_without_the_end_to_end_modules(tiers: dict[str, set[str]]) -> None:
    assert not tiers["e2e"] & tiers["fast"]
    # The core, tokenization, engines, contract, settings, files; and the servers.
    assert len(tiers["fast"]) >= 100 and len(tiers["e2e"]) >= 100
    # Modules that only run against Triton stay out (conftest refuses a fast test that needs it).
    assert not [
        test for test in tiers["fast"] if test.startswith(("tests/test_serving.py", "tests/test_operations.py"))
    ]


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


def pytest_runs(target: str) -> list[list[str]]:
    """The pytest arguments of each pytest command `make <target>` runs (make -n, the install taken as done)."""
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [shlex.split(line.split("-m pytest", 1)[1]) for line in done.stdout.splitlines() if "-m pytest" in line]


def test_make_test_runs_each_test_once(tiers: dict[str, set[str]]) -> None:
    runs = pytest_runs("test")
    assert len(runs) == 3 and ["-m", "not e2e"] in runs, runs
    # The end-to-end tier's two processes split it: the second runs the modules the first leaves out, each
    # with end-to-end tests, and the first keeps some.
    (timed,) = [run for run in runs if run[:2] == ["-m", "e2e"]]
    (untimed,) = [run for run in runs if run[:2] == ["-p", "no:cacheprovider"]]
    assert timed[:2] == ["-m", "e2e"] and untimed[:4] == ["-p", "no:cacheprovider", "-m", "e2e"], runs
    ignored = [a.removeprefix("--ignore=") for a in timed[2:]]
    assert all(a.startswith("--ignore=") for a in timed[2:]) and ignored == untimed[4:] and ignored, runs
    modules = {test.split("::")[0] for test in tiers["e2e"]}
    assert set(ignored) < modules, set(ignored) - modules
    # `make test-e2e` (docs/architecture.md) runs the same two processes, without the fast tier.
    assert sorted(pytest_runs("test-e2e")) == sorted([timed, untimed])
