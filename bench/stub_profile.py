"""Where the served path's time goes: py-spy samples of Triton's Python-backend stub (the model's execute,
the engine inside it) and of the frontend while a served run goes on, summarized as shares of samples.

The stub is recorded with --idle: its one Python thread shows an empty stack while it waits for Triton to
hand it work. The frontend is recorded without it, so its samples are the busy ones: their count against
duration x rate is its busy share (several busy threads at once, the tokenizer's, can take it over 1).
"""

from __future__ import annotations

import contextlib
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE = 100  # samples per second
# Files of the engine's forward pass (the packed engine, its sub-batch loop, the runners and ONNX Runtime),
# and of the Triton model around it (execute: decoding, the cancellation check, metrics, the answer).
ENGINE_FILES = (
    "rerank_triton_model/reranker_engine.py",
    "rerank_triton_model/modernbert_packed.py",
    "rerank_triton_model/torch_runner.py",
)
MODEL_FILE = "rerank_triton_model/model.py"


def _frame_file(frame: str) -> str:
    """The file of a raw frame "Qual.name (path/file.py:12)"."""
    return frame.partition(" (")[2].rsplit(":", 1)[0]


def _kind(frames: list[str]) -> str:
    """A sample's kind by its innermost frame of the engine or of the model: the model's own code called
    from inside the engine (the cancellation check between sub-batches) counts as `execute_other`;
    a stack with neither is `idle`."""
    for frame in reversed(frames):
        file = _frame_file(frame)
        if file.endswith(ENGINE_FILES) or "onnxruntime" in file:
            return "engine"
        if file.endswith(MODEL_FILE):
            return "execute_other"
    return "idle"


def parse_raw(raw: str) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed-stack) output, "frame;frame;... count" per line, as (frames, count);
    an idle sample's stack is empty."""
    stacks: list[tuple[list[str], int]] = []
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if count.isdigit():
            stacks.append(([f for f in stack.split(";") if f.strip()], int(count)))
    return stacks


def stub_shares(raw: str) -> tuple[dict[str, float], int]:
    """The stub's samples as shares: `engine` (the forward pass), `execute_other` (the rest of the model's
    execute: pooling, splitting, responses), `idle` (no execute on the stack: waiting for work); and the
    number of samples. Shares are 0 when there are no samples."""
    counts = {"engine": 0, "execute_other": 0, "idle": 0}
    for frames, count in parse_raw(raw):
        counts[_kind(frames)] += count
    total = sum(counts.values())
    return {k: v / total if total else 0.0 for k, v in counts.items()}, total


def summarize(stub_raw: str, frontend_raw: str, duration_s: float, rate: float = RATE) -> dict[str, Any]:
    """One served run's profile: the stub's shares, the frontend's busy share (its samples, all busy,
    against duration x rate) and the stub's sample count."""
    shares, samples = stub_shares(stub_raw)
    frontend = sum(count for _, count in parse_raw(frontend_raw))
    expected = duration_s * rate
    return {
        "stub": shares,
        "frontend_busy": frontend / expected if expected > 0 else 0.0,
        "samples": samples,
        "frontend_samples": frontend,
        "duration_s": duration_s,
    }


def py_spy() -> str | None:
    """The py-spy beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _launch(pid: int, path: Path, idle: bool, rate: int) -> subprocess.Popen[str]:
    """A `py-spy record` of the process (raw output to `path`), not yet known to be sampling."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy not found (pip install py-spy)")
    command = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--nonblocking"]
    command += [*(["--idle"] if idle else []), "-o", str(path)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _until_sampling(process: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """Returns once py-spy says on stdout that it samples; raises with what it said if it exits first
    (no such process, no ptrace permission) or stays silent."""
    assert process.stdout is not None
    said: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = process.stdout.readline() if ready else ""
        said.append(line)
        if "Sampling process" in line:
            return
        if ready and not line:
            break
    raise RuntimeError(f"py-spy did not start: {''.join(said).strip()[:300]}")


def _collect(process: subprocess.Popen[str], path: Path, timeout_s: float = 30.0) -> str:
    """The raw output of a recording already sent SIGINT, once py-spy has written it."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"py-spy did not write {path} within {timeout_s:.0f}s") from None
    if process.returncode != 0 or not path.exists():
        raise RuntimeError(f"py-spy exited with {process.returncode}: {output.strip()[:300]}")
    return path.read_text()


@dataclass
class Sampling:
    """What `sampled` leaves once its block is done: the summary, or why there is none."""

    summary: dict[str, Any] | None = None
    error: str | None = None
    files: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def sampled(stub_pid: int, frontend_pid: int, stem: Path, rate: int = RATE) -> Iterator[Sampling]:
    """Samples the stub (with --idle) and the frontend (without) while the block runs; their raw output
    goes to <stem>-stub.txt and <stem>-frontend.txt. Never raises for py-spy's failures (missing, no
    ptrace permission): the block runs anyway and the Sampling's `error` says what went wrong."""
    sampling = Sampling(files=[stem.with_name(f"{stem.name}-{who}.txt") for who in ("stub", "frontend")])
    recordings: list[subprocess.Popen[str]] = []
    started = time.perf_counter()
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        # Both launched before either is waited for, so that each recording spans the block and little more.
        for pid, path, idle in ((stub_pid, sampling.files[0], True), (frontend_pid, sampling.files[1], False)):
            recordings.append(_launch(pid, path, idle, rate))
        for process in recordings:
            _until_sampling(process)
        started = time.perf_counter()
    except Exception as error:  # noqa: BLE001 - no profile, but the run still goes on
        sampling.error = str(error)
    try:
        yield sampling
    finally:
        duration = time.perf_counter() - started
        for process in recordings:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        raws: list[str] = []
        for process, path in zip(recordings, sampling.files, strict=False):
            try:
                raws.append(_collect(process, path))
            except Exception as error:  # noqa: BLE001 - as above
                sampling.error = sampling.error or str(error)
        if sampling.error is None:
            sampling.summary = summarize(raws[0], raws[1], duration, rate)
