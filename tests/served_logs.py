"""State the tests' `rerank serve` helpers share across the two copies of tests/conftest.py that a session
holds (pytest loads it as `conftest`; test modules import it as `tests.conftest`): one folder of server logs
and one list of stacks whose exit the session checks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

_folder: list[Path] = []
# Stacks told to stop (conftest.stop_serve_later) whose exit the session checks at its end.
STOPPING: list[Any] = []


def log_dir() -> Path:
    """The session's log folder, made on first use (a process that only imports the helpers makes none)."""
    if not _folder:
        _folder.append(Path(tempfile.mkdtemp(prefix="rerank-tests-")))
    return _folder[0]


def made() -> Path | None:
    return _folder[0] if _folder else None
