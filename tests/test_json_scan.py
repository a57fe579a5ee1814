"""The gate's pre-parse count of JSON values: exact on any JSON, linear and loop-friendly on any bytes."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from bench.attacks import json_shapes, scan_costs
from rerank_server.http_api import json_scan
from rerank_server.http_api.json_scan import more_values_than

MIB = 1 << 20


def values_in(value: Any) -> int:
    """What json.loads makes of it: one value per string (keys too), number, literal, array and object."""
    if isinstance(value, dict):
        return 1 + sum(1 + values_in(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(values_in(v) for v in value)
    return 1


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(7 if depth < 4 else 4)
    if choice == 0:
        return rng.choice([None, True, False])
    if choice == 1:
        return rng.choice([0, -12, 3.5e-3, 10**20, -0.0, 1e300])
    if choice in (2, 3):  # strings full of what a scan could trip on: quotes, backslashes, brackets
        return "".join(rng.choice('ab"\\\n\u00e9\u4e2d{}[],:- 1') for _ in range(rng.randrange(40)))
    if choice == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {"".join(rng.choice('ab"\\{') for _ in range(4)): random_json(rng, depth + 1) for _ in range(5)}


@pytest.mark.parametrize("slice_bytes", [2, 3, 7, 64, json_scan.SLICE_BYTES])
def test_the_count_is_exact_whatever_the_slices(monkeypatch: pytest.MonkeyPatch, slice_bytes: int) -> None:
    monkeypatch.setattr(json_scan, "SLICE_BYTES", slice_bytes)
    rng = random.Random(slice_bytes)
    for _ in range(150):
        body = json.dumps(random_json(rng), ensure_ascii=rng.random() < 0.5).encode()
        count = values_in(json.loads(body))
        assert not asyncio.run(more_values_than(body, count)), body
        if count:
            assert asyncio.run(more_values_than(body, count - 1)), body


# Bodies of 1 MiB that a scan needing closing quotes, or retrying at every byte, would choke on.
HOSTILE = {
    "unterminated string of escaped quotes": b'"' + b'\\"' * (MIB // 2),
    "unterminated string of backslashes": b'"' + b"\\" * MIB,
    "minus signs": b"-" * MIB,
    "spaces": b" " * MIB,
    "digits": b"1" * MIB,
    "quote-backslash pairs": b'"\\' * (MIB // 2),
    "one long string": b'"' + b"x" * MIB + b'"',
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_megabyte_costs_milliseconds_and_holds_the_loop_briefly(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(json_scan, "SLICE_BYTES", MIB // 8)
    spent, held = scan_costs(HOSTILE[name])
    # About 5-40 ms on a 2-core EPYC; the quadratic scan took 15 s for 64 KB.
    assert spent < 0.1, f"{name}: {spent * 1000:.0f} ms of CPU"
    assert held < 0.05, f"{name}: the loop was held {held * 1000:.0f} ms at once"


def test_literals_are_counted() -> None:
    """15 MiB of `true,` is three million list slots: refused by the count, as many strings are."""
    for literal in (b"true", b"false", b"null", b"NaN", b"-Infinity"):
        body = b'{"query": "q", "documents": ["a"], "x": [' + b",".join([literal] * 20_000) + b"]}"
        assert asyncio.run(more_values_than(body, 16064)), literal


# 4 MiB bodies of every shape: few values, so each is scanned whole.
SHAPES = json_shapes(4 * MIB)


def test_bytes_between_values_are_skipped_as_fast_as_a_string_is_read() -> None:
    """re skips bytes no value starts with by a table look-up only when every alternative of the pattern
    starts with a literal byte; otherwise it tries the pattern at each byte (5 times slower than a string)."""
    string = min(scan_costs(SHAPES["one long string"])[0] for _ in range(3))
    spaces = min(scan_costs(SHAPES["whitespace"])[0] for _ in range(3))
    assert spaces < 2 * string, f"spaces: {spaces * 1000:.0f} ms, a string as long: {string * 1000:.0f} ms"


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_slice_holds_the_loop_well_under_a_few_milliseconds(name: str) -> None:
    """Four 15 MiB bodies scanned at once take turns with every other call: each of a call's loop turns
    waits for one slice of each, so a slice must cost little (about 0.3 ms; a 1 MiB slice holds it 12 ms)."""
    held = min(scan_costs(SHAPES[name])[1] for _ in range(3))
    assert held < 0.004, f"{name}: the loop was held {held * 1000:.1f} ms at once"
