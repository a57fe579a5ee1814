"""The models a benchmark run measures: the checkpoint (random unless --checkpoint) and its fp32, int8 and
`--precision auto` exports, reused from --workdir while the checkpoint and the exporter are unchanged."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RERANK, TOKENIZER_DIR, Progress
from rerank_server.testing import TINY_CONFIG, exported_parameters
from rerank_triton_model.contract import ModelParameters
from rerank_triton_model.runtimes import ONNXRUNTIME, PACKED, TORCH

# The random full-size model: transformers' ModernBertConfig() sizes (ModernBERT-base) and weight init
# (std 0.02); save_random_checkpoint widens the scoring head so that documents' logits spread (docs/performance.md,
# "Ranking agreement on random weights"). A wider range (0.1) makes a chaotic network that amplifies any
# error, so no precision would rank like fp32 on it, whatever its accuracy on a trained model.
FULL_INITIALIZER_RANGE = 0.02
# --quick: the test suite's tiny ModernBERT (4 layers, hidden 64), for the smaller QUICK workloads.
QUICK_CONFIG: dict[str, Any] = TINY_CONFIG


# In-process systems by the (runtime, precision) they compute in; a system's name is its label key.
SYSTEMS = {
    (ONNXRUNTIME.name, "fp32"): "onnxruntime",
    (ONNXRUNTIME.name, "int8"): "onnxruntime-int8",
    (TORCH.name, "fp32"): "torch",
    (TORCH.name, "bf16"): "torch-bf16",
    (PACKED.name, "fp32"): "packed",
    (PACKED.name, "bf16"): "packed-bf16",
}


@dataclass(frozen=True)
class Models:
    checkpoint: Path
    description: str
    config: dict[str, Any]
    fp32_repository: Path
    int8_repository: Path | None
    auto_repository: Path | None = None  # `rerank export --precision auto`
    name: str = "reranker"

    def model_dir(self, int8: bool = False, auto: bool = False) -> Path:
        repository = self.auto_repository if auto else self.int8_repository if int8 else self.fp32_repository
        assert repository is not None
        return repository / self.name

    def parameters(self, int8: bool = False, auto: bool = False) -> ModelParameters:
        return exported_parameters(self.model_dir(int8, auto))


def run_exports(exports: list[list[str]], progress: Progress, at_once: int | None = None) -> None:
    """`rerank export` with each argument list, at most `at_once` running at a time (None: all at once;
    most of an export is loading libraries, so a few overlap well even on 2 cores); raises RuntimeError
    with the first failure's output once all have ended."""

    def export(args: list[str]) -> subprocess.CompletedProcess[str]:
        progress.log(f"$ rerank export {' '.join(args)}")
        return subprocess.run([RERANK, "export", *args], stderr=subprocess.PIPE, text=True)

    with ThreadPoolExecutor(max_workers=at_once or max(1, len(exports))) as pool:
        done = list(pool.map(export, exports))
    for args, process in zip(exports, done, strict=True):
        for line in process.stderr.splitlines():
            if line.startswith(("Exported", "Precision")):
                progress.log(f"  {line}")
        if process.returncode != 0:
            raise RuntimeError(
                f"rerank export {' '.join(args)} failed ({process.returncode}):\n{process.stderr[-3000:]}"
            )


def prepare_models(args: argparse.Namespace, workdir: Path, progress: Progress) -> Models:
    """The checkpoint (random unless --checkpoint) and its fp32 and int8 exports; reused when unchanged."""
    if args.checkpoint is not None:
        checkpoint = args.checkpoint.resolve()
        spec: dict[str, Any] = {"checkpoint": str(checkpoint)}
        description = f"checkpoint {checkpoint.name}"
    else:
        base = QUICK_CONFIG if args.quick else {}
        init = args.initializer_range if args.initializer_range is not None else FULL_INITIALIZER_RANGE
        spec = {"random": {**base, "initializer_range": init}, "seed": args.seed}
        checkpoint = workdir / "checkpoint"
        size = "tiny ModernBERT" if args.quick else "ModernBERT-base size"
        description = f"{size}, random weights (initializer_range {init}, seed {args.seed})"
    spec["int8"] = not args.skip_int8
    spec["auto"] = not args.skip_auto
    # Exports copy the model package: reuse them only while it and the exporter are unchanged.
    import hashlib

    import rerank_triton_model
    from rerank_server import export as exporter

    sources: list[str | Path] = [
        *sorted(rerank_triton_model.PACKAGE_DIR.glob("*.py")),
        rerank_triton_model.CONFIG_TEMPLATE,
        *sorted(Path(exporter.__file__).parent.glob("*.py")),
    ]
    spec["sources"] = hashlib.sha256(b"".join(Path(p).read_bytes() for p in sources)).hexdigest()
    spec["export_args"] = args.export_args
    fp32_repository = workdir / "repository"
    int8_repository = workdir / "repository-int8" if not args.skip_int8 else None
    auto_repository = workdir / "repository-auto" if not args.skip_auto else None
    stamp = workdir / "bench-models.json"
    reusable = (
        stamp.is_file()
        and json.loads(stamp.read_text()) == spec
        and (fp32_repository / "reranker" / "config.pbtxt").is_file()
        and all(r is None or (r / "reranker" / "config.pbtxt").is_file() for r in (int8_repository, auto_repository))
    )
    if reusable:
        progress.log(f"Reusing the checkpoint and exports in {workdir}")
    else:
        stamp.unlink(missing_ok=True)
        if args.checkpoint is None:
            from rerank_server.testing import save_random_checkpoint

            progress.stage("random checkpoint")
            progress.log(f"Saving a {description} checkpoint to {checkpoint}")
            shutil.rmtree(checkpoint, ignore_errors=True)
            save_random_checkpoint(checkpoint, TOKENIZER_DIR, seed=args.seed, **spec["random"])
        common = ["--model", str(checkpoint), "--name", "reranker", "--overwrite", *args.export_args.split()]
        exports = [[*common, "--output", str(fp32_repository), "--precision", "fp32"]]
        if int8_repository is not None:
            exports.append([*common, "--output", str(int8_repository), "--precision", "int8"])
        progress.stage("export")
        run_exports(exports, progress)
        if auto_repository is not None:
            # Alone: auto times the candidates, which other exports running beside it would slow.
            run_exports([[*common, "--output", str(auto_repository), "--precision", "auto"]], progress)
        stamp.write_text(json.dumps(spec))
    config = json.loads((checkpoint / "config.json").read_text())
    return Models(checkpoint, description, config, fp32_repository, int8_repository, auto_repository)


def auto_choice(models: Models) -> dict[str, Any] | None:
    """What `--precision auto` chose on this machine, why, and the figures it chose on."""
    if models.auto_repository is None:
        return None
    parameters = models.parameters(auto=True)
    export = json.loads((models.model_dir(auto=True) / "1" / "export.json").read_text())
    runtime, precision = parameters.runtime, parameters.precision
    return {
        "precision": precision,
        "runtime": runtime,
        "system": SYSTEMS.get((runtime, precision), f"{runtime}-{precision}"),
        "reason": parameters.precision_reason,
        "cpu_flags": parameters.cpu_flags,
        "candidates": (export.get("precision_selection") or {}).get("candidates", []),
    }
