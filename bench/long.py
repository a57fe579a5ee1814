"""One long document on the CPU, served: the time and memory of a single 8,192-token (query, document) pair
through `rerank serve`, per runtime, side by side on the machine it runs on.

    python -m bench.long                 # ModernBERT-base size, random weights (a few minutes; ORT needs ~17 GiB)
    python -m bench.long --quick         # the tests' tiny long model and a ~2,000-token pair (a smoke test)

For each system — the baseline, ONNX Runtime fp32 with routing off (`--long-pair-tokens 0`: the padded graph,
dense T x T attention in every layer); the default export (`--precision auto`, whatever it picks on this CPU);
and each CPU choice a user can name (ONNX Runtime fp32 and int8, transformers' padded model in bf16, the packed
engine in bf16), all of which run pairs over their long-pair threshold on the packed engine — it exports
the same checkpoint, serves each system on its own stack in turn (with --quick: all six models exported three
at a time and served by one stack), warms it up with a short call, and times one call of one 8,192-token pair
(about 2,000 with --quick) while sampling the Triton side's RSS (tritonserver and the system's Python-backend
stub). It reports the time, the peak RSS, the RSS 2 s after the call (0.5 s with --quick) against the idle level,
each logit against the baseline's (the export checks that graph against eager) and the pairs the model counted
on its packed engine (rerank_model_long_pairs_total). Writes <output>/long.json and prints a Markdown table
with the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, TOKENIZER_DIR, Progress
from bench.models import run_exports
from bench.served import Sampler, ServedStack, process_rss, scrape
from rerank_client import AsyncRerankClient
from rerank_server.testing import TINY_CONFIG, exported_parameters, save_random_checkpoint
from rerank_triton_model.runtimes import PACKED, TORCH

# name, export arguments; the first is the baseline the others are compared with. Every CPU choice serves
# its long pairs on the packed engine (runtimes.long_pairs): in bf16 for bf16, else fp32.
BASELINE = "onnxruntime fp32, routing off"
DEFAULT = "default export (--precision auto)"
ROUTED = "onnxruntime fp32, long pairs packed"
SYSTEMS = (
    (BASELINE, ("--precision", "fp32", "--long-pair-tokens", "0")),
    (DEFAULT, ()),
    (ROUTED, ("--precision", "fp32")),
    ("onnxruntime int8", ("--precision", "int8")),
    ("torch bf16", ("--precision", "bf16", "--runtime", TORCH.name)),
    ("packed bf16", ("--precision", "bf16", "--runtime", PACKED.name)),
)
# --quick: auto's measurement stops after its minimum rounds (the tiny model's timings decide nothing).
QUICK_AUTO = ("--auto-seconds", "0")
LONG_PAIRS = "rerank_model_long_pairs_total"
QUICK_CONFIG = {**TINY_CONFIG, "max_position_embeddings": 8192, "local_attention": 64}
GIB = 2**30


def long_document(words: int = 9000) -> str:
    """More words than 8,192 tokens hold: END truncation cuts the pair to the model's limit."""
    vocabulary = "quick sort divides an array around a pivot then sorts each side recursively in place".split()
    return " ".join(vocabulary[(7 * i) % len(vocabulary)] for i in range(words))


async def one_call(target: str, query: str, document: str, model: str) -> tuple[float, float, int]:
    """Seconds of one Rerank call of one pair, its logit and its tokens."""
    async with AsyncRerankClient(target, timeout=3600) as client:
        started = time.perf_counter()
        response = await client.rerank(query, [document], model=model)
        seconds = time.perf_counter() - started
        return seconds, float(response.results[0].logit), int(response.usage.input_tokens)


def measure(stack: ServedStack, model: str, query: str, document: str, settle_s: float) -> dict[str, Any]:
    """One long call of `model` on a running stack; `settle_s`: the wait before the idle RSS and after
    the call. The Triton side's RSS: tritonserver and this model's stub."""
    triton = [*stack.servers(), *stack.stubs(model)]
    asyncio.run(one_call(stack.target, query, "a short warm-up document", model))
    time.sleep(settle_s)
    idle = process_rss(triton)
    sampler = Sampler(stack.frontend, triton, interval_s=0.1)
    sampler.start()
    long_before = long_pairs(stack, model)
    seconds, logit, tokens = asyncio.run(one_call(stack.target, query, document, model))
    time.sleep(2 * settle_s)
    after = process_rss(triton)
    sampler.stop()
    return {
        "seconds": seconds,
        "logit": logit,
        "tokens": tokens,
        "long_pairs_packed": long_pairs(stack, model) - long_before,
        "idle_rss_gib": idle / GIB,
        "peak_rss_gib": sampler.peak_triton / GIB,
        "after_rss_gib": after / GIB,
    }


def long_pairs(stack: ServedStack, model: str) -> float:
    return scrape(stack.metrics_url, {"model": model}).get(LONG_PAIRS, 0.0)


def repository_of(work: Path, index: int, shared: bool) -> Path:
    return work / ("repository" if shared else f"repository-{index}")


def model_of(index: int) -> str:
    return f"system-{index}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tests' tiny 8192-token model")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    from bench.common import machine_info

    query = "how to implement quick sort in python?"
    # --quick: a pair of about 2,000 tokens, over the routing threshold but 16x cheaper for the dense baseline.
    document = long_document(2000 if args.quick else 9000)
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "systems": {}}
    with tempfile.TemporaryDirectory(prefix="bench-long-") as folder:
        work = Path(folder)
        config = QUICK_CONFIG if args.quick else {"initializer_range": 0.02}
        save_random_checkpoint(work / "checkpoint", TOKENIZER_DIR, seed=0, **config)
        # Full size: one repository and one stack per system, exported one at a time (auto times its
        # candidates) and served alone (memory is measured); --quick: one repository of all six, exported
        # three at a time and served by one stack (the tiny model's timings and memory decide nothing).
        exports = []
        for index, (name, export_args) in enumerate(SYSTEMS):
            extra = QUICK_AUTO if args.quick and name == DEFAULT else ()
            output = ["--output", str(repository_of(work, index, args.quick)), "--name", model_of(index)]
            exports.append(["--model", str(work / "checkpoint"), *output, *export_args, *extra])
        progress = Progress(0, enabled=False)
        try:
            run_exports(exports, progress, at_once=3 if args.quick else 1)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        settle_s = 0.25 if args.quick else 1.0
        shared = ServedStack.start(repository_of(work, 0, True), work / "serve.log") if args.quick else None
        try:
            for index, (name, _) in enumerate(SYSTEMS):
                print(f"{name}: exported; serving one long pair", file=sys.stderr, flush=True)
                repository = repository_of(work, index, args.quick)
                parameters = exported_parameters(repository / model_of(index))
                stack = shared or ServedStack.start(repository, work / f"serve-{index}.log")
                try:
                    figures = measure(stack, model_of(index), query, document, settle_s)
                finally:
                    if stack is not shared:
                        stack.stop()
                results["systems"][name] = {
                    "runtime": parameters.runtime,
                    "precision": parameters.precision,
                    "long_pair_tokens": parameters.long_pair_tokens,
                    **figures,
                }
                print(f"{name}: {results['systems'][name]}", file=sys.stderr, flush=True)
        finally:
            if shared is not None:
                shared.stop()
    reference = results["systems"][BASELINE]
    lines = [
        f"| served, one {reference['tokens']:,}-token pair | exported as | seconds | x baseline time "
        "| Triton peak RSS GiB | after - idle GiB | logit - baseline's | pairs routed to the packed engine |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, figures in results["systems"].items():
        lines.append(
            f"| {name} | {figures['precision']} ({figures['runtime']}) "
            f"| {figures['seconds']:.1f} | {figures['seconds'] / reference['seconds']:.2f} "
            f"| {figures['peak_rss_gib']:.2f} | {figures['after_rss_gib'] - figures['idle_rss_gib']:+.2f} "
            f"| {figures['logit'] - reference['logit']:+.1e} | {figures['long_pairs_packed']:.0f} |"
        )
    table = "\n".join(lines)
    results["table"] = table
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "long.json").write_text(json.dumps(results, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
