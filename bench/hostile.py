"""What each defence of docs/security.md costs the server: its attacks sent to a real `rerank serve`.

One `rerank serve` (the tests' tiny model, exported fp32, local Triton) at the default limits, with
--http-port and --auth-token, is sent each attack in turn, over loopback. The costs are the frontend's
(reading, counting, refusing): a refused call never reaches the model, so the model's size does not change
them; the accepted bodies' rows include the tiny model's scoring of one short document.

Each row gives the answer (HTTP status or gRPC code) and, averaged over --rounds repeats:
- the time to the answer: from the first byte sent to the first byte of the answer (the slowest of a flood);
- the frontend's CPU time (psutil: user + system of the `rerank serve` process, every thread, gRPC's and the
  tokenizers' included; in 10 ms ticks, hence the repeats) and its event loop's (the main thread's, from
  /proc schedstat, in nanoseconds);
- its peak RSS growth (VmHWM after a reset, over VmRSS before the attack; the largest of the repeats): what
  the attack adds to what the process holds, since memory it freed and kept is used first;
- for floods, the latency small gRPC Rerank calls made one after another beside the attack add to the same
  calls' median on the idle server: their median's, 90th percentile's and worst's.
A second table times what the server does in slices, in this process: the JSON value count over bodies of
each shape, and one tokenization segment.

    python -m bench.hostile            # 15 MiB attacks, 5 repeats each, about a minute on 2 cores
    python -m bench.hostile --quick    # 2 MiB attacks, one each (a smoke test)

Exits 1 if any answer is not the one docs/security.md promises (a defence that did not hold).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from tokenizers import Tokenizer

from bench.attacks import MIB, chunked, cjk, empty_documents, json_shapes, memory, reset_peak, scan_costs
from bench.common import ROOT, TOKENIZER_DIR, cpu_pressure, machine_info
from bench.served import ServedStack, export_random
from rerank_client import RerankClient, message_size_options
from rerank_client.pb import METHOD_PREFIX, SERVICE_NAME, rerank_pb2
from rerank_server.http_api.connection import MAX_BODY_CHUNKS
from rerank_server.testing import TINY_CONFIG, wait_for_health
from rerank_server.tokenization import _SEGMENT_CHARS as SEGMENT_CHARS

TOKEN = "bench-hostile-token"
LIMIT = 16 * MIB  # the default --max-message-bytes
QUERY = "what is the capital of China?"
OPTIONS = message_size_options(64 * MIB)  # the client sends what the server refuses


@dataclass(frozen=True)
class Plan:
    size: int  # bytes of a large body or message under the limit
    cjk_characters: int  # of the document tokenized past --max-total-tokens (1.3 tokens a character)
    rounds: int
    idle_s: float  # small calls timed on the idle server
    shape_bytes: int  # of the bodies the value count is timed on in this process


FULL = Plan(size=15 * MIB, cjk_characters=5_000_000, rounds=5, idle_s=3.0, shape_bytes=16 * MIB)
QUICK = Plan(size=2 * MIB, cjk_characters=600_000, rounds=1, idle_s=0.5, shape_bytes=2 * MIB)

Answer = tuple[str, float]  # HTTP status or gRPC code, seconds to it


@dataclass
class Row:
    key: str
    attack: str
    expected: str
    answers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: float = 0.0
    loop_s: float = 0.0
    peak_rss_bytes: int = 0
    added_median_s: float | None = None
    added_p90_s: float | None = None
    added_worst_s: float | None = None
    small_calls_beside_s: list[float] = field(default_factory=list)
    note: str = ""


class Frontend:
    """The `rerank serve` process: its CPU time, its event loop's, its memory."""

    def __init__(self, stack: ServedStack) -> None:
        self.process: psutil.Process = stack.frontend
        self.pid = stack.frontend.pid

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def loop_cpu(self) -> float:
        """CPU seconds of the main thread, which runs the event loop (schedstat's first field: nanoseconds)."""
        return int(Path(f"/proc/{self.pid}/task/{self.pid}/schedstat").read_text().split()[0]) / 1e9


# -- the attacks ------------------------------------------------------------------------------------------


def http(address: tuple[str, int], raw: bytes, timeout_s: float = 120) -> Answer:
    """Send `raw` on a new connection (from a thread, so that an answer before the body's end is read as it
    comes) and read the answer: its status and the seconds from the first byte sent to its first byte."""
    with socket.create_connection(address, timeout=timeout_s) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # answered and closed before the body's end
                sock.sendall(raw)

        sender = threading.Thread(target=send)
        started = time.perf_counter()
        sender.start()
        received, first = b"", 0.0
        try:
            while chunk := sock.recv(65536):
                first = first or time.perf_counter() - started
                received += chunk
        except OSError:
            pass
        sender.join()
    if not received.startswith(b"HTTP/1.1 "):
        return "no answer", time.perf_counter() - started
    return f"HTTP {int(received.split(b' ', 2)[1])}", first


def post(path: str, body: bytes, token: str | None = TOKEN, length: int | None = None) -> bytes:
    """A POST of `body` with its Content-Length (or `length`), the token, and `connection: close`."""
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n{auth}"
        f"content-length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


def rpc(target: str, payload: bytes, token: str | None = TOKEN, timeout_s: float = 120) -> Answer:
    """One Rerank call of these bytes on a connected channel: its code and seconds."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        call = channel.unary_unary(METHOD_PREFIX + "Rerank")
        started = time.perf_counter()
        try:
            call(payload, metadata=metadata, timeout=timeout_s)
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        return code, time.perf_counter() - started


def four(send: Callable[[], Answer]) -> Callable[[], list[Answer]]:
    def flood() -> list[Answer]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: send(), range(4)))

    return flood


def one(send: Callable[[], Answer]) -> Callable[[], list[Answer]]:
    return lambda: [send()]


@dataclass(frozen=True)
class Attack:
    key: str
    attack: str
    expected: str
    send: Callable[[], list[Answer]]
    flood: bool = False  # also sent beside small calls, whose added latency the row gives
    note: Callable[[Row], str] = lambda row: ""


def attacks(stack: ServedStack, plan: Plan) -> list[Attack]:
    host, port = stack.http_url.removeprefix("http://").rsplit(":", 1)
    address, target = (host, int(port)), stack.target
    mib, over = f"{plan.size / MIB:.0f} MiB", LIMIT + MIB
    bearer = f"authorization: Bearer {TOKEN}\r\n".encode()

    def posted(body: bytes, path: str = "/v2/rerank", token: str | None = TOKEN) -> Callable[[], Answer]:
        raw = post(path, body, token)
        return lambda: http(address, raw)

    def in_chunks(body: bytes, chunks: int, piece: int = 1) -> Callable[[], Answer]:
        raw = chunked(b"POST /v2/rerank HTTP/1.1", body, chunks, bearer, piece)
        return lambda: http(address, raw)

    def called(payload: bytes, token: str | None = TOKEN, timeout_s: float = 120) -> Callable[[], Answer]:
        return lambda: rpc(target, payload, token, timeout_s)

    small = b'{"query": "q", "documents": ["a"]'
    whitespace = small + b" " * (plan.size - len(small) - 1) + b"}"
    accepted = {
        "whitespace": ("whitespace between values", whitespace),
        "string": (
            "a string in a field no API reads",
            small + b', "pad": "' + b"x" * (plan.size - len(small) - 12) + b'"}',
        ),
        "document": (
            "one document of words (END truncation)",
            b'{"query": "q", "documents": ["' + b"word " * ((plan.size - 40) // 5) + b'"]}',
        ),
    }
    pad = b'{"query": "q", "documents": ["a"], "pad": "' + b" " * MAX_BODY_CHUNKS + b'"}'
    megabyte = b'{"query": "q", "documents": ["a"], "pad": "' + b" " * MIB + b'"}'
    chunks = {
        "most": (
            f"a body in {MAX_BODY_CHUNKS:,} chunks (the most allowed; 1 byte each)",
            "HTTP 200",
            pad,
            MAX_BODY_CHUNKS,
        ),
        "over": (f"a body in {MAX_BODY_CHUNKS + 1:,} chunks", "HTTP 413", pad, MAX_BODY_CHUNKS + 1),
        "megabyte": ("1 MiB in 1-byte chunks", "HTTP 413", megabyte, len(megabyte)),
    }
    rank_fields = json.dumps(
        {"query": "q", "documents": [{"text": "x " * 25_000}], "rank_fields": ["text"] * 15_000}
    ).encode()
    text = cjk(plan.cjk_characters)
    long = {
        truncation: rerank_pb2.RerankRequest(query=QUERY, documents=[text], truncation=truncation).SerializeToString()
        for truncation in (rerank_pb2.TRUNCATION_CHUNK, rerank_pb2.TRUNCATION_NONE)
    }
    empty = empty_documents(plan.size)

    def per_chunk(row: Row) -> str:
        return f"{row.loop_s / MAX_BODY_CHUNKS * 1e6:.1f} µs of the loop a chunk"

    return [
        Attack(
            "content-length",
            f"HTTP: headers declaring a {over / MIB:.0f} MiB body (no body sent)",
            "HTTP 413",
            one(lambda: http(address, post("/v2/rerank", b"", length=over))),
        ),
        Attack(
            "chunked-size",
            f"HTTP: a {over / MIB:.0f} MiB chunked body in 64 KiB chunks",
            "HTTP 413",
            one(in_chunks(b" " * over, over >> 16, 1 << 16)),
        ),
        Attack(
            "grpc-size",
            f"gRPC: a {over / MIB:.0f} MiB message",
            "RESOURCE_EXHAUSTED",
            one(called(empty_documents(over))),
        ),
        Attack(
            "auth-grpc",
            f"gRPC: four {mib} messages at once, no token",
            "UNAUTHENTICATED",
            four(called(empty, token=None)),
            flood=True,
        ),
        Attack("auth-http", f"HTTP: a {mib} body, no token", "HTTP 401", one(posted(whitespace, token=None))),
        Attack(
            "max-documents",
            f"gRPC: {mib} of empty documents ({(len(empty) - 3) // 2:,})",
            "INVALID_ARGUMENT",
            one(called(empty)),
            note=lambda row: f"peak RSS growth {row.peak_rss_bytes / len(empty):.1f}x the message",
        ),
        Attack(
            "json-strings",
            f'HTTP: {mib} of `"",` (documents)',
            "HTTP 413",
            one(posted(small[:-1] + b'"", ' * ((plan.size - len(small)) // 4) + b'""]}')),
        ),
        Attack(
            "json-literals",
            f"HTTP: {mib} of `true,` (a field no API reads)",
            "HTTP 413",
            one(posted(small + b', "x": [' + b"true, " * ((plan.size - len(small)) // 6) + b"true]}")),
        ),
        *(
            Attack(
                f"accepted-{key}",
                f"HTTP: four accepted {mib} bodies at once: {what}",
                "HTTP 200",
                four(posted(body)),
                flood=True,
            )
            for key, (what, body) in accepted.items()
        ),
        *(
            Attack(f"chunks-{key}", f"HTTP: {what}", answer, one(in_chunks(body, count)), note=per_chunk)
            for key, (what, answer, body, count) in chunks.items()
        ),
        Attack(
            "rank-fields",
            f'HTTP (Cohere v1): a {len(rank_fields) / 1000:.0f} KB body, one 50 KB document, rank_fields "text" '
            "15,000 times",
            "HTTP 400",
            one(posted(rank_fields, "/v1/rerank")),
        ),
        Attack(
            "total-tokens",
            f"gRPC: a {len(text.encode()) / 1e6:.0f} MB CJK document, CHUNK truncation (past --max-total-tokens)",
            "RESOURCE_EXHAUSTED",
            one(called(long[rerank_pb2.TRUNCATION_CHUNK])),
        ),
        Attack(
            "none-prefix",
            "gRPC: the same document, NONE truncation (longer than max_length)",
            "INVALID_ARGUMENT",
            one(called(long[rerank_pb2.TRUNCATION_NONE])),
        ),
        Attack(
            "deadline",
            "gRPC: the CHUNK call with a 0.1 s deadline",
            "DEADLINE_EXCEEDED",
            one(called(long[rerank_pb2.TRUNCATION_CHUNK], timeout_s=0.1)),
        ),
    ]


# -- measuring ------------------------------------------------------------------------------------------


class Victim:
    """Small Rerank calls, one after another: on the idle server, and beside an attack."""

    def __init__(self, target: str) -> None:
        self.client = RerankClient(target, token=TOKEN, timeout=60, retries=0)

    def call(self) -> float:
        started = time.perf_counter()
        self.client.rerank(QUERY, ["Beijing"])
        return time.perf_counter() - started

    def idle(self, seconds: float) -> list[float]:
        for _ in range(10):
            self.call()
        deadline = time.perf_counter() + seconds
        latencies = []
        while time.perf_counter() < deadline:
            latencies.append(self.call())
        return latencies

    def beside(self, send: Callable[[], list[Answer]]) -> tuple[list[Answer], list[float]]:
        stop = threading.Event()
        latencies: list[float] = []

        def loop() -> None:  # one call at least, however short the attack
            latencies.append(self.call())
            while not stop.is_set():
                latencies.append(self.call())

        caller = threading.Thread(target=loop)
        caller.start()
        try:
            answers = send()
        finally:
            stop.set()
            caller.join()
        return answers, latencies


def measure(frontend: Frontend, victim: Victim, attack: Attack, rounds: int, idle: list[float]) -> Row:
    row = Row(attack.key, attack.attack, attack.expected)
    answers: list[Answer] = []
    cpu = loop = 0.0
    for _ in range(rounds):
        reset_peak(frontend.pid)
        rss, cpu_before, loop_before = memory(frontend.pid, "VmRSS"), frontend.cpu(), frontend.loop_cpu()
        got = attack.send()
        cpu += frontend.cpu() - cpu_before
        loop += frontend.loop_cpu() - loop_before
        row.peak_rss_bytes = max(row.peak_rss_bytes, memory(frontend.pid, "VmHWM") - rss)
        answers += got
        row.seconds += max(seconds for _, seconds in got) / rounds
    row.cpu_s, row.loop_s = cpu / rounds, loop / rounds
    if attack.flood:
        during: list[float] = []
        for _ in range(rounds):
            got, latencies = victim.beside(attack.send)
            answers += got
            during += latencies
        typical = statistics.median(idle)
        row.added_median_s = statistics.median(during) - typical
        row.added_p90_s = (statistics.quantiles(during, n=10)[-1] if len(during) > 1 else during[0]) - typical
        row.added_worst_s = max(during) - typical
        row.small_calls_beside_s = during
    row.answers = sorted({code for code, _ in answers})
    row.note = attack.note(row)
    return row


def after_the_deadline(frontend: Frontend, victim: Victim, row: Row, idle_cpu_per_s: float) -> None:
    """The deadline row's note: the frontend's CPU in the second after the caller's deadline passed, over
    its idle CPU, and a small call right after it."""
    cpu = frontend.cpu()
    time.sleep(1.0)
    after = frontend.cpu() - cpu - idle_cpu_per_s
    row.note = f"{max(after, 0) * 1000:.0f} ms of CPU in the second after the deadline; a small call then " + (
        f"{victim.call() * 1000:.0f} ms"
    )


def triton_killed(stack: ServedStack, frontend: Frontend) -> Row:
    """Kill the local Triton: a call meanwhile, and the time until the frontend's health is SERVING again."""
    row = Row("triton-killed", "the local Triton killed (SIGKILL); a small call meanwhile", "UNAVAILABLE")
    triton = next(p for p in frontend.process.children() if p.name() == "tritonserver")
    payload = rerank_pb2.RerankRequest(query=QUERY, documents=["a"]).SerializeToString()
    killed = time.perf_counter()
    triton.kill()
    triton.wait(30)
    code, row.seconds = rpc(stack.target, payload, timeout_s=30)
    row.answers = [code]
    noticed = wait_for_health(stack.target, 30, serving=False, service=SERVICE_NAME)
    back = wait_for_health(stack.target, 120, service=SERVICE_NAME)
    row.note = (
        f"SERVING again {time.perf_counter() - killed:.1f} s after the kill"
        if noticed and back
        else "health never went down and up again"
    )
    return row


def in_process(plan: Plan) -> list[dict[str, Any]]:
    """What the server does in slices, timed in this process: the JSON value count on each shape of body
    (CPU, and the longest it holds the loop at once), and one tokenization segment."""
    rows = []
    repeats = 1 if plan.rounds == 1 else 3
    for name, body in json_shapes(plan.shape_bytes).items():
        costs = [scan_costs(body) for _ in range(repeats)]
        rows.append(
            {
                "what": f"JSON value count, {plan.shape_bytes / MIB:.0f} MiB of {name}",
                "cpu_s": min(c[0] for c in costs),
                "longest_hold_s": min(c[1] for c in costs),
            }
        )
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    for name, segment in (
        ("CJK", cjk(SEGMENT_CHARS)),
        ("words", ("the quick brown fox jumps over the lazy dog " * SEGMENT_CHARS)[:SEGMENT_CHARS]),
    ):
        spent = []
        for _ in range(5):
            started = time.thread_time()
            tokens = len(tokenizer.encode(segment, add_special_tokens=False).ids)
            spent.append(time.thread_time() - started)
        what = f"one tokenization segment, {SEGMENT_CHARS:,} characters of {name} ({tokens:,} tokens)"
        rows.append({"what": what, "cpu_s": min(spent), "tokens": tokens})
    return rows


def run(plan: Plan, work: Path) -> dict[str, Any]:
    repository = export_random(work, **TINY_CONFIG)
    stack = ServedStack.start(repository, work / "serve.log", extra_args=[f"--auth-token={TOKEN}"])
    try:
        frontend, victim = Frontend(stack), Victim(stack.target)
        idle = victim.idle(plan.idle_s)
        cpu = frontend.cpu()
        time.sleep(plan.idle_s)
        idle_cpu_per_s = (frontend.cpu() - cpu) / plan.idle_s
        rows = []
        for attack in attacks(stack, plan):
            rows.append(measure(frontend, victim, attack, plan.rounds, idle))
            if attack.key == "deadline":
                after_the_deadline(frontend, victim, rows[-1], idle_cpu_per_s)
            print(f"  {rows[-1].key}: {', '.join(rows[-1].answers)}", file=sys.stderr, flush=True)
        rows.append(triton_killed(stack, frontend))
        victim.client.close()
    finally:
        stack.stop()
    return {
        "idle": {
            "small_call_median_s": statistics.median(idle),
            "small_call_worst_s": max(idle),
            "small_calls": len(idle),
            "small_calls_s": idle,
            "frontend_cpu_per_s": idle_cpu_per_s,
        },
        "rows": [asdict(row) for row in rows],
    }


def markdown(results: dict[str, Any]) -> str:
    machine, idle = results["machine"], results["idle"]
    lines = [
        f"`python -m bench.hostile{' --quick' if results['quick'] else ''}`, {results['elapsed_s']:.0f} s; "
        f"{machine['cpu']}, `cpu family {machine['cpu_family']}`, {machine['cores']} cores; "
        f"CPU pressure (PSI some avg60) {machine['cpu_pressure_start']}% "
        f"at start, {results['cpu_pressure_end']}% at end.",
        "The tests' tiny model (local Triton) at the default limits: these costs are the frontend's, not the model's.",
        f"Small calls on the idle server: median {idle['small_call_median_s'] * 1000:.1f} ms, worst "
        f"{idle['small_call_worst_s'] * 1000:.1f} ms ({idle['small_calls']} calls); the idle frontend used "
        f"{idle['frontend_cpu_per_s'] * 1000:.0f} ms of CPU a second. Each row but the restart: the mean of "
        f"{results['rounds']} repeats (peak RSS: the largest).",
        "",
        "| attack | answer | time to answer | frontend CPU | event loop CPU | peak RSS growth "
        "| small calls beside it: median / p90 / worst, over the idle median | |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for row in results["rows"]:
        answer = ", ".join(row["answers"]) + ("" if row["answers"] == [row["expected"]] else " (**not as documented**)")
        added = (
            "—"
            if row["added_median_s"] is None
            else " / ".join(f"{row[f'added_{at}_s'] * 1000:+.0f}" for at in ("median", "p90", "worst")) + " ms"
        )
        lines.append(
            f"| {row['attack']} | {answer} | {seconds(row['seconds'])} | {seconds(row['cpu_s'])} "
            f"| {seconds(row['loop_s'])} | {row['peak_rss_bytes'] / MIB:.1f} MiB | {added} | {row['note']} |"
        )
    lines += ["", "| in this process | CPU | longest hold of the loop |", "|---|--:|--:|"]
    for item in results["in_process"]:
        hold = item.get("longest_hold_s")
        lines.append(f"| {item['what']} | {seconds(item['cpu_s'])} | {'—' if hold is None else seconds(hold)} |")
    return "\n".join(lines)


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 MiB attacks, one each (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="repeats of each attack (default 5; quick 1)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "hostile.json")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(plan.size, plan.cjk_characters, args.rounds, plan.idle_s, plan.shape_bytes)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "rounds": plan.rounds}
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as folder:
        results |= run(plan, Path(folder))
    results["in_process"] = in_process(plan)
    results["cpu_pressure_end"] = cpu_pressure()
    results["elapsed_s"] = time.perf_counter() - started
    table = markdown(results)
    results["table"] = table
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(table)
    failed = [row["key"] for row in results["rows"] if row["answers"] != [row["expected"]]]
    if failed:
        print(f"answered otherwise than documented: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
