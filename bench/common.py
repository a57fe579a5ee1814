"""What every benchmark shares: the project's paths and console script, the machine a run happened on,
and the progress bar."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "modernbert-tokenizer"
RERANK = str(Path(sys.executable).parent / "rerank")


class Progress:
    """A tqdm bar over every pair the run will score, plus log lines that do not break it."""

    def __init__(self, total_pairs: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_pairs, unit="pair", disable=not enabled, dynamic_ncols=True, file=sys.stderr)

    def log(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def stage(self, title: str) -> None:
        self.bar.set_description(title)

    def advance(self, pairs: int) -> None:
        self.bar.update(pairs)

    def close(self) -> None:
        self.bar.close()


class Quiet(Progress):
    """A warm-up's progress: counted nowhere."""

    def __init__(self, parent: Progress) -> None:
        self.parent = parent

    def log(self, line: str) -> None:
        self.parent.log(line)

    def stage(self, title: str) -> None:
        self.parent.stage(f"{title} (warm-up)")

    def advance(self, pairs: int) -> None:
        pass


def cpu_pressure() -> float | None:
    """Share of time some runnable task waited for a CPU over the last minute (Linux PSI), in %."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    match = re.search(r"some avg10=[0-9.]+ avg60=([0-9.]+)", text)
    return float(match.group(1)) if match else None


def machine_info() -> dict[str, Any]:
    import importlib.metadata

    import psutil

    from rerank_triton_model.cpu_features import cpu_flags, native_precisions

    cpu, family = platform.processor() or platform.machine(), None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu family") and family is None:
                family = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version()}
    for name in ("onnxruntime", "torch", "transformers", "sentence-transformers", "tritonclient", "nvidia-pytriton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "cpu": cpu,
        "cpu_family": family,  # /proc/cpuinfo's: 25 is AMD Zen 3 and 4, 26 Zen 5
        "cpu_flags": sorted(cpu_flags()),
        "native_precisions": native_precisions(cpu_flags()),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "os": platform.platform(),
        "versions": versions,
        "load_average_start": os.getloadavg()[0],
        "cpu_pressure_start": cpu_pressure(),
    }


def quick_parser(module: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
    """`python -m bench.<module>`'s parser: the first paragraph of `doc` as its description, `--quick`
    (`quick_help`), `--output` (a folder, bench/results by default) and `--seed`."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def write_report(output: Path, module: str, argv: list[str] | None, table: str, **fields: Any) -> None:
    """<output>/<module>.json: the command as run (`python -m bench.<module>` and its arguments), the machine,
    `fields` and the Markdown table, which is printed too."""
    command = " ".join([f"python -m bench.{module}", *(argv if argv is not None else sys.argv[1:])])
    report = {"command": command, "machine": machine_info(), **fields, "table": table}
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{module}.json").write_text(json.dumps(report, indent=2))
    print(table)
