"""What a large gRPC message costs other callers: the measurement behind the default --max-message-bytes.

`rerank serve` (tiny random model, local Triton, --max-message-bytes 64 MiB so every size gets through) is
sent, for each size, four concurrent messages of that size from another process, twice: refused ones
(empty documents past max_documents, refused from a wire scan) and accepted ones (one document of that
size, END truncation). Meanwhile this process makes small Rerank calls one after another; the table gives
their worst and 99th-percentile latency beside the same calls alone, and how long the big calls took.

    python -m bench.messages [--sizes 4,16,32,60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.served import ServedStack, export_random
from rerank_client import RerankClient
from rerank_server.testing import TINY_CONFIG

MIB = 1 << 20

# Four calls at once of a message of SIZE bytes, from their own process (so that building and sending
# 60 MiB does not hold the measuring process's GIL); prints the seconds the slowest took and the codes.
SENDER = """
import sys, time, grpc
from concurrent.futures import ThreadPoolExecutor
from rerank_client import message_size_options
from rerank_client.pb import METHOD_PREFIX, rerank_pb2
target, kind, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "refused":  # a one-letter query, then empty documents: refused past max_documents by a wire scan
    payload = b"\\x0a\\x01q" + b"\\x12\\x00" * ((size - 3) // 2)
else:  # one document of `size` bytes of words, cut to the model's length (END)
    payload = rerank_pb2.RerankRequest(query="q", documents=["word " * (size // 5)]).SerializeToString()
def call(_):
    with grpc.insecure_channel(target, options=message_size_options(64 << 20)) as channel:
        try:
            channel.unary_unary(METHOD_PREFIX + "Rerank")(payload, timeout=300)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name
started = time.perf_counter()
with ThreadPoolExecutor(4) as pool:
    codes = list(pool.map(call, range(4)))
print(time.perf_counter() - started, *codes, flush=True)
"""


def small_calls(client: RerankClient, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        client.rerank("what is the capital of China?", ["Beijing"])
        latencies.append(time.perf_counter() - started)


def measure(target: str, kind: str, size: int, client: RerankClient) -> tuple[list[float], float, list[str]]:
    stop = threading.Event()
    latencies: list[float] = []
    victim = threading.Thread(target=small_calls, args=(client, stop, latencies))
    victim.start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", SENDER, target, kind, str(size)], capture_output=True, text=True, timeout=900
        )
    finally:
        stop.set()
        victim.join()
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    took, *codes = done.stdout.split()
    return latencies, float(took), codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.messages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,16,32,60", help="message sizes, MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="floods of four per size and kind")
    args = parser.parse_args(argv)
    sizes = [int(float(s) * MIB) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-messages-") as folder:
        work = Path(folder)
        export_random(work, **TINY_CONFIG)
        stack = ServedStack.start(
            work / "repository", work / "serve.log", extra_args=[f"--max-message-bytes={64 * MIB}"]
        )
        try:
            with RerankClient(stack.target, timeout=300) as client:
                for _ in range(20):
                    client.rerank("warm", ["up"])
                alone: list[float] = []
                stop = threading.Event()
                threading.Timer(3.0, stop.set).start()
                small_calls(client, stop, alone)
                print(
                    f"small calls alone: p99 {np.percentile(alone, 99) * 1000:.0f} ms, worst {max(alone) * 1000:.0f} ms"
                )
                print("| message | kind | small calls' p99 | small calls' worst | four big calls took | codes |")
                print("|---|---|---|---|---|---|")
                for size in sizes:
                    for kind in ("refused", "accepted"):
                        latencies: list[float] = []
                        took: list[float] = []
                        codes: set[str] = set()
                        for _ in range(args.rounds):
                            more, seconds, answered = measure(stack.target, kind, size, client)
                            latencies += more
                            took.append(seconds)
                            codes |= set(answered)
                        print(
                            f"| {size / MIB:.0f} MiB | {kind} | {np.percentile(latencies, 99) * 1000:.0f} ms | "
                            f"{max(latencies) * 1000:.0f} ms | {max(took):.2f} s | {', '.join(sorted(codes))} |",
                            flush=True,
                        )
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
