"""The GPU check: the served path on the GPU variant against PyTorch fp16 eager, in one run on one card.

    python -m bench.gpu --output DIR                  # a machine with a CUDA GPU (README, Performance)
    python -m bench.gpu --quick --device cpu          # the same steps on a tiny model, on the CPU (dry run)

The GPU variant is `rerank export --device gpu --runtime torch`: fp16 weights run by PyTorch (SDPA
attention) inside Triton's Python backend, one KIND_GPU instance, behind the same frontend. Side by
side, in this order, on the same card and workloads as bench.run (a, b, c):

    torch-eager   a hand-rolled loop: transformers' model in fp16, the tokenizer, batches of 32 pairs in
                  request order padded to their longest (what a team writes instead of a service)
    torch-engine  the served model's engine in-process: length-sorted sub-batches under the same token
                  budget, no tokenizing, no gRPC, no Triton (the limit for the served path)
    served        rerank serve (frontend + local Triton), at concurrency 1, 4 and 16

Each measurement repeats its workload for at least --seconds (calibrated on a second warm-up pass: the
first carries CUDA's first-run costs). Writes
<output>/gpu-results.json and gpu-results.md and prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import workloads
from bench.run import (
    QUICK_CONFIG,
    RERANK,
    TOKENIZER_DIR,
    Progress,
    machine_info,
    run_batched,
    run_inprocess,
    run_served,
)
from bench.workloads import Workload

EAGER_BATCH = 32  # sentence-transformers' default batch size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("bench/results-gpu"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the steps")
    parser.add_argument("--quick", action="store_true", help="a tiny model and the small workloads")
    parser.add_argument("--seconds", type=float, default=5.0, help="least time per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-args", default="", help="extra `rerank export` arguments")
    return parser.parse_args(argv)


def repeats_for(seconds: float, one_pass_s: float) -> int:
    return max(1, min(1000, math.ceil(seconds / max(one_pass_s, 1e-6))))


class HandRolledEager:
    """transformers' model and tokenizer in a plain loop: batches of 32 pairs in request order."""

    def __init__(self, checkpoint: Path, device: str, dtype: Any) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch, self.device = torch, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        model = AutoModelForSequenceClassification.from_pretrained(
            str(checkpoint), dtype=dtype, attn_implementation="sdpa"
        )
        self.model = model.to(device).eval()

    def logits(self, query: str, documents: tuple[str, ...]) -> np.ndarray:
        out = []
        with self.torch.inference_mode():
            for start in range(0, len(documents), EAGER_BATCH):
                batch = documents[start : start + EAGER_BATCH]
                inputs = self.tokenizer([query] * len(batch), list(batch), padding=True, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                out.append(self.model(**inputs).logits[:, 0].float().cpu().numpy())
        return np.concatenate(out)


def run_eager(eager: HandRolledEager, workload: Workload, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    return run_batched(
        "torch-eager",
        workload,
        repeats,
        lambda request: eager.logits(request.query, request.documents),
        Progress(0, enabled=False),
        batch=EAGER_BATCH,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.served import Sampler, ServedStack
    from rerank_client import RerankClient
    from rerank_model_repository.reranker_engine import PackedReranker
    from rerank_server.testing import save_random_checkpoint

    started = time.perf_counter()
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    machine = machine_info()
    if on_gpu:
        properties = torch.cuda.get_device_properties(0)
        machine["gpu"] = {"name": properties.name, "memory_gib": properties.total_memory / 2**30}
    precision = "fp16" if on_gpu else "fp32"
    dtype = torch.float16 if on_gpu else torch.float32
    built = workloads.build(TOKENIZER_DIR, seed=args.seed, shape=workloads.QUICK if args.quick else workloads.FULL)
    fixed = sorted((w for w in built.values() if w.kind == "a"), key=lambda w: w.concurrency)
    a1, b, c = fixed[0], built["b"], built["c"]
    progress = Progress(0, enabled=False)
    args.output.mkdir(parents=True, exist_ok=True)
    measurements: list[dict[str, Any]] = []
    agreement: dict[str, Any] = {}

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="rerank-bench-gpu-") as temporary:
        workdir = Path(temporary)
        checkpoint = workdir / "checkpoint"
        config = {**(QUICK_CONFIG if args.quick else {}), "initializer_range": 0.02}
        save_random_checkpoint(checkpoint, TOKENIZER_DIR, seed=args.seed, **config)
        log(f"saved a random {'tiny' if args.quick else 'ModernBERT-base size'} checkpoint")
        repository = workdir / "repository"
        export = [RERANK, "export", "--model", str(checkpoint), "--output", str(repository), "--runtime", "torch"]
        export += ["--device", "gpu" if on_gpu else "cpu", *args.export_args.split()]
        done = subprocess.run(export, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        version = repository / "reranker" / "1"
        verification = json.loads((version / "export.json").read_text())["verification"]
        log(f"exported: {verification}")
        config_text = (repository / "reranker" / "config.pbtxt").read_text()
        parameters = dict(re.findall(r'key: "([^"]+)" value: \{ string_value: "([^"]*)" \}', config_text))
        budget = int(parameters["max_batch_tokens"])
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(version / "tokenizer" / "tokenizer.json"))

        # In-process first, each warmed up and calibrated on its own pass, then freed for Triton.
        engine = PackedReranker.from_pretrained(
            str(version / "model"),
            pad_token_id=int(parameters["pad_token_id"]),
            max_batch_tokens=budget,
            device=args.device,
            precision=precision,
        )
        for workload in (a1, b):
            run_inprocess("torch-engine", engine, tokenizer, workload, 1, progress)  # first-run costs
            warm, _ = run_inprocess("torch-engine", engine, tokenizer, workload, 1, progress)
            result, engine_b = run_inprocess(
                "torch-engine", engine, tokenizer, workload, repeats_for(args.seconds, warm["wall_s"]), progress
            )
            measurements.append(result)
            log(f"torch-engine {workload.name}: {result['pairs_per_s']:.1f} pairs/s")
        del engine
        eager = HandRolledEager(checkpoint, args.device, dtype)
        for workload in (a1, b):
            run_eager(eager, workload, 1)  # first-run costs
            warm, _ = run_eager(eager, workload, 1)
            result, eager_b = run_eager(eager, workload, repeats_for(args.seconds, warm["wall_s"]))
            measurements.append(result)
            log(f"torch-eager {workload.name}: {result['pairs_per_s']:.1f} pairs/s")
        # fp32 eager on the last (b) request: the reference both fp16 paths are held to.
        eager.model.float()
        reference = eager.logits(b.requests[-1].query, b.requests[-1].documents)
        del eager
        if on_gpu:
            torch.cuda.empty_cache()

        instance_kind = "KIND_GPU" if on_gpu else "KIND_CPU"
        stack = ServedStack.start(repository, args.output / "gpu-serve.log")
        log(f"serving with {instance_kind}")
        sampler = Sampler(stack.frontend, stack.triton)
        sampler.start()
        try:
            with RerankClient(stack.target, timeout=120) as client:
                response = client.rerank(b.requests[-1].query, list(b.requests[-1].documents))
            served_b = np.full(b.requests[-1].pairs, np.nan)
            for r in response.results:
                served_b[r.index] = r.logit
            for name, got in (("served", served_b), ("torch-engine", engine_b), ("torch-eager", eager_b)):
                agreement[f"{name}_vs_fp32_eager_max_abs_diff"] = float(np.max(np.abs(got - reference)))
            log(f"agreement with fp32 eager on one (b) request: {agreement}")
            for workload in [*sorted((w for w in built.values() if w.kind == "a"), key=lambda w: w.concurrency), b, c]:
                run_served(stack, workload, 1, sampler, progress)  # first-run costs
                warm = run_served(stack, workload, 1, sampler, progress)
                repeats = repeats_for(args.seconds, warm["wall_s"])
                result = run_served(stack, workload, repeats, sampler, progress)
                measurements.append(result)
                log(f"served {workload.name} c{workload.concurrency}: {result['pairs_per_s']:.1f} pairs/s")
        finally:
            sampler.stop()
            code = stack.stop()
            if code != 0:
                log(f"rerank serve exited with {code}")

    def rate(system: str, kind: str, concurrency: int = 1, per_token: bool = False) -> float:
        found = [
            m
            for m in measurements
            if m["system"] == system and m["workload"] == kind and m["concurrency"] == concurrency
        ]
        return found[0]["tokens_per_s" if per_token else "pairs_per_s"] if found else float("nan")

    top = max(w.concurrency for w in built.values() if w.kind == "a")
    ratios = {
        "served/torch-engine (a) c1": rate("served", "a") / rate("torch-engine", "a"),
        f"served/torch-engine (a) c{top}": rate("served", "a", top) / rate("torch-engine", "a"),
        "served/torch-eager (a) c1": rate("served", "a") / rate("torch-eager", "a"),
        "served/torch-eager (b)": rate("served", "b") / rate("torch-eager", "b"),
        "served/torch-engine (b)": rate("served", "b") / rate("torch-engine", "b"),
        "served (c) / served (a) c1, per token": rate("served", "c", c.concurrency, True)
        / rate("served", "a", 1, True),
    }
    results = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.gpu", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "precision": precision,
        "max_batch_tokens": budget,
        "instance_kind": instance_kind,
        "export_verification": verification,
        "agreement": agreement,
        "measurements": measurements,
        "ratios": ratios,
        "elapsed_s": time.perf_counter() - started,
    }
    (args.output / "gpu-results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"{machine.get('gpu', {}).get('name', machine['cpu'])}, {precision}, token budget {budget}, {instance_kind}",
        "",
        "| system | workload | clients | pairs/s | tokens/s | p50 ms | p99 ms | padding waste |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in measurements:
        waste = m.get("padding_waste")
        lines.append(
            f"| {m['system']} | {m['workload']} | {m['concurrency']} | {m['pairs_per_s']:.1f} | "
            f"{m['tokens_per_s']:.0f} | {m['latency_ms']['p50']:.1f} | {m['latency_ms']['p99']:.1f} | "
            f"{'' if waste is None else f'{waste:.2f}'} |"
        )
    lines += ["", *(f"- {name}: {value:.2f}" for name, value in ratios.items())]
    (args.output / "gpu-results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
