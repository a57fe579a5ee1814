"""The service contract: Buf's style guide, and committed stubs that match proto/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
