"""The tier each collected test declares, as tests/conftest.py records it and tests/test_tiers.py reads it.
Both import this module as `tests.tiers` (pytest imports conftest.py under another name, so a key defined
there would be two keys)."""

from __future__ import annotations

import pytest

# A file that tests/conftest.py's pytest_collection_finish writes each collected test into, with its tier.
LIST_TIERS_ENV = "RERANK_LIST_TIERS"

# Every test the session collected, as "<tier> <node id>", before `-m` deselected any: tests/test_tiers.py
# reads it when the session collected the whole suite (`make test-fast` does), instead of collecting again.
COLLECTED_TIERS = pytest.StashKey[list[str]]()


def tier_lines(items: list[pytest.Item]) -> list[str]:
    return [f"{'e2e' if item.get_closest_marker('e2e') else 'fast'} {item.nodeid}" for item in items]
