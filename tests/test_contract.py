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


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every language's code generated afresh by proto/buf.gen.yaml, under a root standing in for ROOT's."""
    root = tmp_path_factory.mktemp("generated")
    generate_protos.generate(root)
    return root


@pytest.mark.parametrize("out", generate_protos.output_dirs(), ids=lambda out: str(out.relative_to(ROOT)))
def test_committed_stubs_are_generated_from_the_current_proto(regenerated: Path, out: Path) -> None:
    fresh_dir = regenerated / out.relative_to(ROOT)

    def files(folder: Path) -> set[Path]:
        return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    fresh = files(fresh_dir)
    assert fresh, f"buf generate wrote nothing to {fresh_dir}"
    assert files(out) == fresh, "run: make protos"
    for rel in sorted(fresh):
        assert (out / rel).read_bytes() == (fresh_dir / rel).read_bytes(), f"{out / rel} is stale: run make protos"
