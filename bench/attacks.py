"""Hostile payloads, and what they cost the frontend as /proc shows it: shared by `python -m bench.hostile`,
which times each attack against a real server, and by the tests that assert its bounds
(tests/test_hostile.py, tests/test_http_hostile.py, tests/test_json_scan.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rerank_server.http_api.json_scan import more_values_than

MIB = 1 << 20
# The JSON values a body may hold at the default max_documents (1,000): 16 per document, plus 64.
DEFAULT_MAX_JSON_VALUES = 16_064


def cjk(characters: int) -> str:
    """CJK text without whitespace (one pre-token for byte-level BPE, 1.3 tokens a character for ModernBERT's
    tokenizer), 3 bytes a character in UTF-8."""
    return ("北京是中国的首都上海是最大的城市" * (characters // 16 + 1))[:characters]


def empty_documents(size: int) -> bytes:
    """A RerankRequest of `size` bytes (one less for an even size) on the wire: a one-letter query, then empty
    documents of two bytes each."""
    return b"\x0a\x01q" + b"\x12\x00" * ((size - 3) // 2)


def chunked(request_line: bytes, body: bytes, chunks: int, headers: bytes = b"", piece: int = 1) -> bytes:
    """A request whose body comes in `chunks` chunks (`piece` bytes each but the last); `headers`: more
    header lines, each ending in CRLF."""
    cut = piece * (chunks - 1)
    pieces = [body[i : i + piece] for i in range(0, cut, piece)] + [body[cut:]]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in pieces)
    head = b"host: x\r\ncontent-type: application/json\r\nconnection: close\r\ntransfer-encoding: chunked\r\n"
    return request_line + b"\r\n" + head + headers + b"\r\n" + framed + b"0\r\n\r\n"


def memory(pid: int, field: str) -> int:
    """VmRSS or VmHWM (peak RSS since the last reset) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def json_shapes(size: int) -> dict[str, bytes]:
    """Bodies of about `size` bytes of every shape the value count scans whole (few values)."""
    return {
        "whitespace": b"[" + b" " * size + b"]",
        "one long string": b'"' + b"x" * size + b'"',
        "string of escapes": b'"' + b"\\u4e2d" * (size // 6) + b'"',
        "digits": b"1" * size,
        "letters": b"t" * size,
    }


def scan_costs(body: bytes, limit: int = DEFAULT_MAX_JSON_VALUES) -> tuple[float, float]:
    """CPU time of this thread (not wall time, so that a loaded machine does not inflate it) the frontend's
    count of `body`'s JSON values takes, and the longest the event loop was held at once meanwhile."""
    holds: list[float] = []

    async def scan() -> float:
        last = time.thread_time()

        async def ticker() -> None:
            nonlocal last
            while True:
                await asyncio.sleep(0)
                now = time.thread_time()
                holds.append(now - last)
                last = now

        watcher = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        started = time.thread_time()
        await more_values_than(body, limit)
        spent = time.thread_time() - started
        holds.append(time.thread_time() - last)  # since the last yield
        watcher.cancel()
        return spent

    spent = asyncio.run(scan())
    return spent, max(holds)
