"""The service contract: Buf's style guide, and committed stubs that match proto/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import generate_protos  # noqa: E402


def buf() -> str:
    path = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    assert Path(path).exists(), "buf (the buf-bin package) is not installed"
    return path


def test_buf_lint_passes() -> None:
    done = subprocess.run([buf(), "lint"], cwd=ROOT / "proto", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _breaking(against: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf(), "breaking", "--against", against], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_contract_is_backward_compatible_with_the_previous_commit() -> None:
    # The common git dir and a commit id, so that a linked worktree (whose own git dir buf cannot read) works too.
    git_dir = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=ROOT, capture_output=True, text=True
    )
    parent = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "HEAD~1"], cwd=ROOT, capture_output=True, text=True
    )
    if git_dir.returncode != 0 or parent.returncode != 0:
        pytest.skip("not a git checkout with a previous commit (a shallow clone): nothing to compare with")
    done = _breaking(f"{git_dir.stdout.strip()}#subdir=proto,ref={parent.stdout.strip()}", ROOT / "proto")
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_breaking_catches_a_removed_field(tmp_path: Path) -> None:
    # The check above can fail: a contract without RerankRequest.return_documents breaks this one.
    changed = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", changed)
    source = changed / "rerank" / "v1" / "rerank.proto"
    lines = source.read_text().splitlines(keepends=True)
    kept = [line for line in lines if "bool return_documents = " not in line]
    assert len(kept) == len(lines) - 1
    source.write_text("".join(kept))
    done = _breaking(str(ROOT / "proto"), changed)
    assert done.returncode != 0 and "return_documents" in done.stdout + done.stderr


def test_committed_stubs_are_generated_from_the_current_proto(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path) for p in generate_protos.generate(tmp_path)}
    committed_dir = generate_protos.DEFAULT_OUT
    committed = {
        p.relative_to(committed_dir) for p in committed_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert committed == fresh, "run: python tools/generate_protos.py"
    for rel in sorted(fresh):
        assert (committed_dir / rel).read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run python tools/generate_protos.py"
        )
