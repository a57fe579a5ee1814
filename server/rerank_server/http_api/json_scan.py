"""How many Python objects a JSON body would become, counted before it is parsed.

FastAPI parses a JSON body into Python objects whole, before any route sees it: 60 MiB of `"",` would be
20 million strings, gigabytes. So the gate counts first, in C (re), what becomes an object (strings, numbers,
arrays, objects), stopping at a bound no valid request reaches: a refusal costs about the body's size.

The count runs on the event loop, so it must cost little and hold the loop briefly whatever the body:
- linear: a string runs to its closing quote or to the end of the slice (possessive repeats never
  backtrack), so no byte is scanned twice. A pattern that needed the closing quote would rescan the rest
  of the body from every quote inside an unterminated string: quadratic (a 64 KB body took 15 s);
- in slices of SLICE_BYTES, yielding to the loop between them; a string or number that crosses a slice's
  end is carried on in the next slice (`_STRING_REST`, `_NUMBER_REST`) instead of being rescanned.
"""

from __future__ import annotations

import asyncio
import re

# Each alternative starts with a literal or a class, which lets re skip other bytes quickly. A string's
# group 1 is its closing quote, found within the slice; group 2 a backslash that ends the slice, whose
# escaped byte is in the next one.
_VALUE = re.compile(rb'[\[{]|"(?:[^"\\]++|\\.)*+(?:(")|(\\)?\Z)|-[0-9][0-9.eE+-]*+|[0-9][0-9.eE+-]*+', re.DOTALL)
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+(?:(")|(\\)?\Z)', re.DOTALL)
_NUMBER_REST = re.compile(rb"[0-9.eE+-]*+")
# Bytes scanned between two yields to the event loop (a few tens of ms of a core at most).
SLICE_BYTES = 1 << 20
_QUOTE = 0x22


def _carried(value: re.Match[bytes], end: int) -> tuple[re.Pattern[bytes] | None, int]:
    """What a value that reached the slice's `end` carries on with in the next slice, and from where."""
    if value.re is _NUMBER_REST or (value.re is _VALUE and value.group(0)[0] != _QUOTE):
        return (_NUMBER_REST, end) if value.group(0)[:1] not in (b"[", b"{") else (None, end)
    if value.group(1) is not None:  # the string closed exactly at the end
        return None, end
    return _STRING_REST, end - 1 if value.group(2) is not None else end


async def more_values_than(body: bytes, limit: int) -> bool:
    """Whether the JSON body holds more than `limit` values (strings, keys included, numbers, arrays and
    objects). Linear in the body, stopping once past the limit; yields to the loop every SLICE_BYTES."""
    size = len(body)
    count = 0
    pos = 0
    rest: re.Pattern[bytes] | None = None  # what carries on from the previous slice: a string or a number
    while pos < size:
        end = min(size, pos + SLICE_BYTES)
        next_pos = end
        if rest is not None:
            carried = rest.match(body, pos, end)
            assert carried is not None  # both patterns match the empty string
            pos = carried.end()
            rest = None
            if pos == end and end < size:
                rest, next_pos = _carried(carried, end)
        if rest is None:
            for value in _VALUE.finditer(body, pos, end):
                count += 1
                if count > limit:
                    return True
                if value.end() == end and end < size:
                    rest, next_pos = _carried(value, end)
        pos = next_pos
        if pos < size:
            await asyncio.sleep(0)
    return False
