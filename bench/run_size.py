"""How many tokens the packed engine should run at once on a CPU: the measurement behind
reranker_engine.PACKED_CPU_RUN_TOKENS.

The packed engine (bf16, in this process, tokenizing untimed) scores the benchmark's workloads with its
runs capped at each size in turn, in rounds (sizes in turn within a round, so a change in the machine's
load falls on all of them): (a) its two requests of 16 pairs of 256 tokens as one batch, (b) the
64-document rerank, and (c) the 16 clients' pairs merged into one batch, as Triton's dynamic batcher hands
them to the model. Prints pairs/s per round, size and workload.

    python -m bench.run_size [--sizes 1024,2048,4096,8192] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bench import workloads
from bench.common import TOKENIZER_DIR, machine_info
from bench.measure import pair_inputs
from bench.models import QUICK_CONFIG
from rerank_server.testing import save_random_checkpoint
from rerank_triton_model.runtimes import PACKED


def merged(tokenizer: Tokenizer, workload: workloads.Workload) -> tuple[np.ndarray, np.ndarray]:
    """Every request of the workload as one ragged batch (ids end to end, pair lengths)."""
    inputs = [pair_inputs(tokenizer, request) for request in workload.requests]
    return np.concatenate([ids for ids, _ in inputs]), np.concatenate([lengths for _, lengths in inputs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048,4096,8192", help="run sizes, tokens, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all sizes")
    parser.add_argument("--quick", action="store_true", help="the tests' tiny model and the quick workloads")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    shape = workloads.QUICK if args.quick else workloads.FULL
    built = workloads.build(TOKENIZER_DIR, seed=0, shape=shape)
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    batches = {kind: merged(tokenizer, built[name]) for kind, name in (("a", "a1"), ("b", "b"), ("c", "c"))}
    machine = machine_info()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, flags {', '.join(machine['cpu_flags'])}; "
        f"CPU pressure {machine['cpu_pressure_start']}%",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-run-size-") as folder:
        checkpoint = Path(folder) / "checkpoint"
        config = QUICK_CONFIG if args.quick else {"initializer_range": 0.02}
        save_random_checkpoint(checkpoint, TOKENIZER_DIR, seed=0, **config)
        engine = PACKED.build(str(checkpoint), device="cpu", precision="bf16", pad_token_id=0, max_batch_tokens=1)
        engine.score(*batches["a"])  # first-call costs out of the timings
        print("| round | run size | " + " | ".join(f"({kind}) pairs/s" for kind in batches) + " |")
        print("|--:|--:|" + "--:|" * len(batches))
        for round_ in range(1, args.rounds + 1):
            for size in sizes:
                engine.max_batch_tokens = size  # past the CPU cap: this measures the cap itself
                rates = []
                for ids, lengths in batches.values():
                    started = time.perf_counter()
                    engine.score(ids, lengths)
                    rates.append(lengths.size / (time.perf_counter() - started))
                print(f"| {round_} | {size} | " + " | ".join(f"{rate:.2f}" for rate in rates) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
