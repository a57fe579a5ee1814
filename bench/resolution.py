"""Full-resolution scores, served: on close candidates, how many distinct logits each CPU export returns and how
far they are from fp32 eager's.

    python -m bench.resolution           # ModernBERT-base size, random weights (about 10 minutes on 2 cores)
    python -m bench.resolution --quick   # the tests' tiny model (a smoke test)

One random checkpoint, its classifier rescaled (`rerank_server.testing.narrow_logits`) so that the fp32 logits
of 200 documents of 20-119 tokens against one query lie within about ±1 of 2.5, where a bf16 value moves in
steps of 1/64: rounded to bf16 they would take a fraction as many values, and request order would rank the
ties. The checkpoint is exported as each system a user can name (ONNX Runtime fp32 and int8, transformers'
model in bf16, the packed engine in bf16) and as the default export (`--precision auto`) into one repository,
served by one `rerank serve`, and each served model ranks the 200 documents in one call. Its logits are held
to transformers' fp32 model on the same checkpoint (eager, batches of 32): distinct logits over the
reference's, max |Δlogit|, top-10 overlap and Spearman. The reference's own logits rounded to bf16 show what a
bf16 head would return. Writes <output>/resolution.json and prints a Markdown table.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TOKENIZER_DIR, Progress, quick_parser, write_report
from bench.models import run_exports
from bench.served import ServedStack, served_logits
from bench.workloads import Request, TextMaker
from rerank_server.export.agreement import agreement
from rerank_server.testing import TINY_CONFIG, exported_parameters, narrow_logits, save_random_checkpoint
from rerank_triton_model.runtimes import PACKED, TORCH

DEFAULT = "default export (--precision auto)"
# name, export arguments; each is a model of the one repository.
SYSTEMS = (
    ("onnxruntime fp32", ("--precision", "fp32")),
    (DEFAULT, ()),
    ("onnxruntime int8", ("--precision", "int8")),
    ("torch bf16", ("--precision", "bf16", "--runtime", TORCH.name)),
    ("packed bf16", ("--precision", "bf16", "--runtime", PACKED.name)),
)
# --quick: auto's measurement stops after its minimum rounds (the tiny model's timings decide nothing).
QUICK_AUTO = ("--auto-seconds", "0")
DOCUMENTS = 200
QUERY_TOKENS = 10


def candidates(maker: TextMaker, seed: int) -> Request:
    """One query and DOCUMENTS documents of 20-119 tokens (every length a different mix of words)."""
    return maker.request(QUERY_TOKENS, [20 + (i * 37) % 100 for i in range(DOCUMENTS)], random.Random(seed))


def fp32_eager(checkpoint: Path, request: Request) -> np.ndarray:
    """transformers' fp32 model on `checkpoint`, the reference every export is verified against."""
    import torch

    from bench.gpu import HandRolledEager

    return HandRolledEager(checkpoint, "cpu", torch.float32).logits(request.query, request.documents).astype(np.float64)


def model_of(index: int) -> str:
    return f"system-{index}"


def bf16_rounded(values: np.ndarray) -> np.ndarray:
    import torch

    return torch.tensor(values, dtype=torch.float32).bfloat16().float().numpy().astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    args = quick_parser("resolution", __doc__, "the tests' tiny model").parse_args(argv)
    request = candidates(TextMaker(TOKENIZER_DIR), args.seed)
    systems: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-resolution-") as folder:
        work = Path(folder)
        config = TINY_CONFIG if args.quick else {"initializer_range": 0.02}
        source = save_random_checkpoint(work / "source", TOKENIZER_DIR, seed=args.seed, **config)
        checkpoint = narrow_logits(source, work / "checkpoint", fp32_eager(source, request))
        reference = fp32_eager(checkpoint, request)
        print("checkpoint narrowed; exporting each system", file=sys.stderr, flush=True)
        repository = work / "repository"
        exports = [
            [
                "--model",
                str(checkpoint),
                "--output",
                str(repository),
                "--name",
                model_of(index),
                *export_args,
                *(QUICK_AUTO if args.quick and name == DEFAULT else ()),
            ]
            for index, (name, export_args) in enumerate(SYSTEMS)
        ]
        try:
            # Auto times its candidates: alone at full size.
            run_exports(exports, Progress(0, enabled=False), at_once=3 if args.quick else 1)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        stack = ServedStack.start(repository, work / "serve.log")
        try:
            for index, (name, _) in enumerate(SYSTEMS):
                parameters = exported_parameters(repository / model_of(index))
                logits, served_precision = asyncio.run(served_logits(stack.target, request, model=model_of(index)))
                systems[name] = {
                    "runtime": parameters.runtime,
                    "precision": parameters.precision,
                    "served_precision": served_precision,
                    **agreement(reference, logits).as_dict(),
                }
                print(f"{name}: {systems[name]}", file=sys.stderr, flush=True)
        finally:
            stack.stop()
    rounded = agreement(reference, bf16_rounded(reference))
    write_report(
        args.output,
        "resolution",
        argv,
        table(systems, rounded.as_dict()),
        quick=args.quick,
        documents=DOCUMENTS,
        reference_std=float(reference.std()),
        systems=systems,
        reference_rounded_to_bf16=rounded.as_dict(),
    )
    return 0


def table(systems: dict[str, dict[str, Any]], rounded: dict[str, Any]) -> str:
    lines = [
        f"| served, {DOCUMENTS} close candidates | exported as | distinct logits | / fp32 eager's "
        "| max \\|Δlogit\\| | top-10 overlap | Spearman |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for name, figures in systems.items():
        lines.append(
            f"| {name} | {figures['precision']} ({figures['runtime']}) | {figures['distinct']} "
            f"| {figures['distinct_ratio']:.3f} | {figures['max_abs_diff']:.4f} | {figures['top10_overlap']:.2f} "
            f"| {figures['spearman']:.4f} |"
        )
    lines.append(
        f"| fp32 eager's logits rounded to bf16 (a bf16 head) | — | {rounded['distinct']} "
        f"| {rounded['distinct_ratio']:.3f} | {rounded['max_abs_diff']:.4f} | {rounded['top10_overlap']:.2f} "
        f"| {rounded['spearman']:.4f} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
