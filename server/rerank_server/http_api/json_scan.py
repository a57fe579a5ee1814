"""How many Python objects a JSON body would become, counted before it is parsed.

FastAPI parses a JSON body into Python objects whole, before any route sees it: 60 MiB of `"",` would be
20 million strings, gigabytes, and 15 MiB of `true,` three million list slots. So the gate counts first, in
C (re), every value (strings, numbers, true, false, null, arrays, objects; NaN and Infinity too, which the
parse then refuses), stopping at a bound no valid request reaches: a refusal costs about the body's size.

The count runs on the event loop, so it must cost little and hold the loop briefly whatever the body:
- linear: a string runs to its closing quote or to the end of the slice (possessive repeats never
  backtrack), so no byte is scanned twice. A pattern that needed the closing quote would rescan the rest
  of the body from every quote inside an unterminated string: quadratic (a 64 KB body took 15 s);
- fast between values: every alternative of _VALUE starts with a literal byte, which lets re skip the
  bytes no value starts with (whitespace, commas) by a table look-up; an alternative starting with a class
  would make re try the whole pattern at every byte (16 MiB of spaces: 270 ms of a core against 50 ms);
- in slices of SLICE_BYTES, yielding to the loop between them; a string or a bare value (number or
  literal) that crosses a slice's end is carried on in the next slice (`_STRING_REST`, `_BARE_REST`)
  instead of being rescanned.
"""

from __future__ import annotations

import asyncio
import re

# A string's rest after its opening quote: group 1 is its closing quote, found within the slice; group 2 a
# backslash that ends the slice, whose escaped byte is in the next one.
_STRING = rb'[^"\\]*+(?:\\.[^"\\]*+)*+(?:(")|(\\)?\Z)'
# A number's or a literal's rest. In valid JSON, outside strings, only these hold letters, digits, signs
# and dots, so a run of them is one value.
_BARE = rb"[0-9A-Za-z.+-]*+"
# What a value starts with, each alternative its own literal byte (see the module's note on speed).
_VALUE = re.compile(
    b"|".join([rb"\[", rb"\{", b'"' + _STRING, *(re.escape(bytes([c])) + _BARE for c in b"-0123456789tfnNI")]),
    re.DOTALL,
)
_STRING_REST = re.compile(_STRING, re.DOTALL)
_BARE_REST = re.compile(_BARE)
# Bytes scanned between two yields to the event loop: well under a millisecond of a core for any bytes
# (5 ns a byte at worst, in strings of escapes), so that bodies scanned at once barely delay other calls.
SLICE_BYTES = 1 << 16
_QUOTE = 0x22


def _carried(value: re.Match[bytes], end: int) -> tuple[re.Pattern[bytes] | None, int]:
    """What a value that reached the slice's `end` carries on with in the next slice, and from where."""
    if value.re is _BARE_REST or (value.re is _VALUE and value.group(0)[0] != _QUOTE):
        return (_BARE_REST, end) if value.group(0)[:1] not in (b"[", b"{") else (None, end)
    if value.group(1) is not None:  # the string closed exactly at the end
        return None, end
    return _STRING_REST, end - 1 if value.group(2) is not None else end


async def more_values_than(body: bytes, limit: int) -> bool:
    """Whether the JSON body holds more than `limit` values (strings, keys included, numbers, literals,
    arrays and objects). Linear in the body, stopping once past the limit; yields to the loop every
    SLICE_BYTES."""
    size = len(body)
    count = 0
    pos = 0
    rest: re.Pattern[bytes] | None = None  # what carries on from the previous slice: a string or a bare value
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
