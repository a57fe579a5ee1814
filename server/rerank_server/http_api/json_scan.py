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

The count also bounds the items other than strings of the arrays at the body's top two levels (the body, and
its fields: every list a route reads). Pydantic writes one error, a dict, per item that fails a list's type (two
for `str | dict`), on the event loop: 15,000 numbers in `documents` (40 KB) would be 30,000 errors. Strings are
what those lists hold, and a list of too many strings is refused by its route at once (`rank_fields` by its
length, before its items); in a list of objects (NIM's passages) each string counts too. Deeper arrays (inside
an object document) are kept as sent and fail whole, so the value count alone bounds them.

The bytes are read as UTF-8, as RFC 8259 has JSON sent. `json.loads` also decodes UTF-16 and UTF-32 (told by
their zero bytes), whose code units can hold a quote byte (U+0122 is `22 01` in UTF-16-LE): the count would
see a string end there and read the rest of the body as one string, hiding every value in it. Such bodies are
refused before the count (`not_utf8`).
"""

from __future__ import annotations

import asyncio
import enum
import json
import re

# A string's rest after its opening quote: group 1 is its closing quote, found within the slice; group 2 a
# backslash that ends the slice, whose escaped byte is in the next one.
_STRING = rb'[^"\\]*+(?:\\.[^"\\]*+)*+(?:(")|(\\)?\Z)'
# A number's or a literal's rest. In valid JSON, outside strings, only these hold letters, digits, signs
# and dots, so a run of them is one value.
_BARE = rb"[0-9A-Za-z.+-]*+"
# What a value starts with, each alternative its own literal byte (see the module's note on speed), and the
# closing brackets, which track how deep the scan is.
_VALUE = re.compile(
    b"|".join(
        [rb"\[", rb"\{", rb"\]", rb"\}", b'"' + _STRING, *(re.escape(bytes([c])) + _BARE for c in b"-0123456789tfnNI")]
    ),
    re.DOTALL,
)
_STRING_REST = re.compile(_STRING, re.DOTALL)
_BARE_REST = re.compile(_BARE)
# Bytes scanned between two yields to the event loop: well under a millisecond of a core for any bytes
# (5 ns a byte at worst, in strings of escapes), so that bodies scanned at once barely delay other calls.
SLICE_BYTES = 1 << 16
_QUOTE = 0x22
_OPENERS = b"[{"
_CLOSERS = b"]}"
_ARRAY = 0x5B
# Which items of an array are counted: none (an object, or an array deeper than the body's fields), those
# other than strings, or all (a list of objects named in object_lists).
_NONE, _NOT_STRINGS, _ALL = 0, 1, 2
# The longest field name (as JSON, escapes included) looked up in object_lists.
_NAME_BYTES = 256


class Excess(enum.Enum):
    """What a body holds too many of."""

    VALUES = "values"
    ITEMS = "items"


def not_utf8(body: bytes) -> str | None:
    """The encoding `json.loads` would read a body in, when it is not UTF-8 (UTF-16 or UTF-32), else None."""
    encoding = json.detect_encoding(body) if body else "utf-8"
    return None if encoding.startswith("utf-8") else encoding


def _carried(value: re.Match[bytes], end: int) -> tuple[re.Pattern[bytes] | None, int]:
    """What a value that reached the slice's `end` carries on with in the next slice, and from where."""
    if value.re is _BARE_REST or (value.re is _VALUE and value.group(0)[0] != _QUOTE):
        return (None, end) if value.group(0)[:1] in (b"[", b"{", b"]", b"}") else (_BARE_REST, end)
    if value.group(1) is not None:  # the string closed exactly at the end
        return None, end
    return _STRING_REST, end - 1 if value.group(2) is not None else end


async def more_values_than(body: bytes, limit: int) -> bool:
    """Whether the JSON body holds more than `limit` values (strings, keys included, numbers, literals,
    arrays and objects). Linear in the body, stopping once past the limit; yields to the loop every
    SLICE_BYTES."""
    return await excess(body, limit) is not None


async def excess(
    body: bytes, limit: int, item_limit: int | None = None, object_lists: frozenset[str] = frozenset()
) -> Excess | None:
    """What the JSON body holds too many of: more than `limit` values (see more_values_than), or more than
    `item_limit` items other than strings in all in the arrays of its top two levels (None: not counted);
    strings count too in the lists of the body's fields named in `object_lists` (lists of objects, where each
    string is an error). Linear in the body, stopping once past a limit; yields to the loop every SLICE_BYTES."""
    size = len(body)
    count = 0
    items = 0
    # One entry per array or object the scan is in: which of its items are counted (_NONE, _NOT_STRINGS, _ALL).
    open_: list[int] = []
    in_object = False  # the body is an object: its strings are its fields' names (and string values)
    name: bytes | None = None  # the last string directly in the body's object: the name of a list that opens
    name_start: int | None = None  # where such a string began, while it carries on into the next slice
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
            if rest is None and name_start is not None:
                name, name_start = body[name_start:pos], None
        if rest is None:
            for value in _VALUE.finditer(body, pos, end):
                first = value.group(0)[0]
                if first in _CLOSERS and open_:
                    open_.pop()
                    continue
                # A value (or a closing bracket with nothing open, which costs a value: the parse refuses it).
                count += 1
                if count > limit:
                    return Excess.VALUES
                counted = open_[-1] if open_ else _NONE
                if counted and item_limit is not None and (first != _QUOTE or counted == _ALL):
                    items += 1
                    if items > item_limit:
                        return Excess.ITEMS
                if first in _OPENERS:
                    if not open_:
                        in_object = first != _ARRAY
                        open_.append(_NONE if in_object else _NOT_STRINGS)
                    elif first == _ARRAY and len(open_) == 1:
                        listed = in_object and _field_name(name) in object_lists
                        open_.append(_ALL if listed else _NOT_STRINGS)
                    else:
                        open_.append(_NONE)
                if value.end() == end and end < size:
                    rest, next_pos = _carried(value, end)
                if first == _QUOTE and in_object and len(open_) == 1:
                    if rest is _STRING_REST:  # carried on: read whole once it ends
                        name_start = value.start()
                    else:
                        name = value.group(0)
        pos = next_pos
        if pos < size:
            await asyncio.sleep(0)
    return None


def _field_name(quoted: bytes | None) -> str | None:
    """A field's name from its JSON string (escapes decoded), or None when it is too long to be one listed."""
    if quoted is None or len(quoted) > _NAME_BYTES:
        return None
    try:
        name = json.loads(quoted)
    except ValueError:
        return None
    return name if isinstance(name, str) else None
