"""CPU precisions: the CPU probe, the choice at export (--precision auto) and at load (a model served on
a CPU without native support falls back to its fp32 weights), and each served precision against eager.

Tolerances against transformers eager (fp32, one pair at a time):
- fp32 (ONNX Runtime): 1e-4, as the other served tests: the same arithmetic up to summation order.
- int8 and bf16: 5% of the largest |logit| (at least 1), export.INT8_RELATIVE_TOLERANCE and
  export.BF16_RELATIVE_TOLERANCE. bf16 keeps 8 significant bits (2^-9 relative rounding per
  operation); measured on these tiny models its error is 1-2.3% of the largest logit (0.086 of 3.8,
  0.22 of 23), so 5% holds with a 2x margin while wrong weights, masks or precisions (errors of the
  logits' own size) fail it. Emulated bf16 (oneDNN limited to AVX512_CORE) rounds the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rerank_client import RerankClient
from rerank_server.export import BF16_RELATIVE_TOLERANCE, INT8_RELATIVE_TOLERANCE, RUNTIMES
from rerank_server.testing import exported_parameters
from rerank_triton_model import cpu_features
from rerank_triton_model.contract import ModelParameters
from rerank_triton_model.cpu_features import cpu_flags, native_precisions, resolve_precision, served_choice
from tests.conftest import RERANK, free_port, run_rerank, start_serve, stop_serve
from tests.reference import eager
from tests.texts import QUERY, mixed_documents

# Each CPU export, by name: its `rerank export` arguments (bf16 through transformers' model and the packed engine).
VARIANTS = {
    "fp32": ("--precision", "fp32"),
    "int8": ("--precision", "int8"),
    "bf16": ("--precision", "bf16"),
    "bf16-packed": ("--precision", "bf16", "--runtime", "packed"),
}
# A CPU of the AVX2/AVX-512 generation before VNNI and bf16 (e.g. Skylake-SP, Zen 1-3).
PLAIN_CPU = "avx2,avx512f"
RUNTIMES_BF16 = [(runtime, "bf16") for runtime in RUNTIMES if runtime != "onnxruntime"]


# ------------------------------------------------------------------------------------------- probe


def test_native_precisions_follow_the_flags() -> None:
    assert native_precisions(set()) == ["fp32"]
    assert native_precisions({"avx2", "avx512f"}) == ["fp32"]
    assert native_precisions({"avx_vnni"}) == ["int8", "fp32"]
    assert native_precisions({"avx512_vnni", "avx512_bf16"}) == ["bf16", "int8", "fp32"]
    assert native_precisions({"amx_bf16", "amx_int8", "amx_tile"}) == ["bf16", "int8", "fp32"]


def test_resolve_keeps_a_native_precision_and_never_emulates_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_features.FORCE_ENV, raising=False)
    assert resolve_precision("bf16", {"avx512_bf16"})[0] == "bf16"
    precision, reason = resolve_precision("bf16", {"avx2", "avx512_vnni"})
    assert precision == "fp32" and "avx512_bf16" in reason and "exported as bf16" in reason
    assert resolve_precision("int8", {"avx512_vnni"})[0] == "int8"
    assert resolve_precision("int8", {"avx2"})[0] == "fp32"
    assert resolve_precision("fp32", {"avx512_bf16"}) == ("fp32", "as exported")
    # A repository without fp32 weights (exported before fallbacks) keeps what it holds, and says so.
    precision, reason = resolve_precision("int8", {"avx2"}, ["int8"])
    assert precision == "int8" and "no fp32 weights" in reason
    assert resolve_precision("fp16", set())[0] == "fp16"  # not a CPU precision: untouched


def test_the_force_override_emulates_on_purpose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_features.FORCE_ENV, "bf16")
    precision, reason = resolve_precision("bf16", {"avx2"})
    assert precision == "bf16" and "forced" in reason and "emulated" in reason
    with pytest.raises(ValueError, match="holds weights for"):
        resolve_precision("fp32", {"avx2"})


def test_flags_come_from_cpuinfo_or_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_features.FLAGS_ENV, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile\n")
    assert cpu_flags(cpuinfo) == {"avx2", "avx512f", "avx512_vnni", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    monkeypatch.setenv(cpu_features.FLAGS_ENV, " avx2, avx512_bf16 ")
    assert cpu_flags(cpuinfo) == {"avx2", "avx512_bf16"}
    monkeypatch.setenv(cpu_features.FLAGS_ENV, "")
    assert cpu_flags(cpuinfo) == frozenset()


def test_served_choice_loads_the_fp32_weights_named_in_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_features.FORCE_ENV, raising=False)
    bf16 = ModelParameters.from_strings(
        {
            **{key: "1" for key in ("max_length", "vocab_size", "pad_token_id", "max_batch_tokens")},
            "source_model": "m",
            "precision": "bf16",
            "runtime": "torch",
            "weights": "model",
            "fp32_runtime": "onnxruntime",
            "fp32_weights": "model.onnx",
        }
    )
    choice = served_choice(bf16, {"avx2"})
    assert (choice.precision, choice.runtime, choice.weights, choice.requested) == (
        "fp32",
        "onnxruntime",
        "model.onnx",
        "bf16",
    )
    assert served_choice(bf16, {"avx512_bf16"}).runtime == "torch"
    assert served_choice(bf16, {"avx2"}, on_gpu=True).precision == "bf16"  # GPUs run as exported


# ------------------------------------------------------------------------------------------ export


def test_auto_on_a_cpu_without_bf16_or_vnni_keeps_fp32_without_measuring(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_features.FLAGS_ENV, PLAIN_CPU)
    done = run_rerank("export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Measuring" not in done.stderr and "Quantizing" not in done.stderr
    model_dir = tmp_path / "reranker"
    parameters = exported_parameters(model_dir)
    assert parameters.precision == "fp32" and parameters.runtime == "onnxruntime"
    assert parameters.cpu_flags == "avx2,avx512f" and "only native precision" in parameters.precision_reason
    assert sorted(p.name for p in (model_dir / "1").glob("model*")) == ["model.onnx", "model.py"]
    provenance = json.loads((model_dir / "1" / "export.json").read_text())
    assert provenance["cpu_flags"] == ["avx2", "avx512f"] and provenance["precision_selection"] is None


def test_auto_measures_each_native_precision_and_keeps_one_that_ranks_like_fp32(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend to have both, so the measurement runs on any CPU (emulated bf16 is only slower).
    monkeypatch.setenv(cpu_features.FLAGS_ENV, "avx2,avx512_vnni,avx512_bf16")
    done = run_rerank("export", "--model", str(checkpoints["reranker_mean"]), "--output", str(tmp_path))
    assert done.returncode == 0, done.stderr
    model_dir = tmp_path / "reranker"
    provenance = json.loads((model_dir / "1" / "export.json").read_text())
    selection = provenance["precision_selection"]
    rows = {(row["runtime"], row["precision"]): row for row in selection["candidates"]}
    bf16 = {("torch", "bf16"), ("packed", "bf16")} & set(RUNTIMES_BF16)
    assert set(rows) == {("onnxruntime", "fp32"), ("onnxruntime", "int8"), *bf16}
    assert f"Measuring {len(rows)} candidates on this CPU" in done.stderr
    reference = rows[("onnxruntime", "fp32")]
    assert reference["speedup"] == 1.0 and reference["max_abs_diff"] == 0.0
    assert all(row["pairs_per_s"] > 0 and 0 <= row["top10_overlap"] <= 1 for row in rows.values())
    assert selection["pairs"] == 32 and selection["tokens"] > 32 * 16
    chosen = rows[(selection["runtime"], selection["precision"])]
    # The fastest of those that rank like fp32 and beat it clearly; fp32 otherwise.
    eligible = [r for r in rows.values() if r is reference or (r["agrees"] and r["speedup"] >= 1.05)]
    assert chosen == max(eligible, key=lambda r: r["pairs_per_s"])
    for row in rows.values():
        assert row["agrees"] == (row["top10_overlap"] >= 0.95 and row["spearman"] >= 0.99)
    parameters = exported_parameters(model_dir)
    assert parameters.precision == selection["precision"] == provenance["precision"]
    assert parameters.runtime == selection["runtime"]
    assert parameters.precision_reason.startswith(f"auto: {selection['precision']} ")
    assert parameters.cpu_flags == "avx2,avx512_bf16,avx512_vnni"
    # What the choice and its fallback need is there, nothing else.
    version = model_dir / "1"
    assert (version / parameters.weights).exists() and (version / parameters.fp32_weights).is_file()
    assert parameters.fp32_runtime == "onnxruntime"
    assert (version / "model").is_dir() == (selection["precision"] == "bf16")
    assert provenance["verification"]["verified"] is True
    assert not (version / "model.int8.onnx").exists()


def test_refuses_combinations_no_runtime_computes(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    model = str(checkpoints["reranker"])
    done = run_rerank(
        "export", "--model", model, "--output", str(tmp_path), "--precision", "bf16", "--runtime", "onnxruntime"
    )
    assert done.returncode == 2 and "bf16 runs in PyTorch" in done.stderr
    done = run_rerank(
        "export", "--model", model, "--output", str(tmp_path), "--precision", "auto", "--runtime", "torch"
    )
    assert done.returncode == 2 and "chooses the runtime itself" in done.stderr
    done = run_rerank(
        "export", "--model", model, "--output", str(tmp_path), "--precision", "int8", "--runtime", "torch"
    )
    assert done.returncode == 2 and "int8 quantizes the ONNX graph" in done.stderr
    assert not (tmp_path / "reranker").exists()


# ------------------------------------------------------------------------------------------ served


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> dict[str, Path]:
    """reranker_mean's checkpoint (logits spread widely) exported once per precision, all at once, each
    in its own repository: a frontend reports the precision of the model its local Triton loaded."""
    root = tmp_path_factory.mktemp("precisions")
    running = [
        subprocess.Popen(
            [
                *RERANK,
                "export",
                "--model",
                str(checkpoints["reranker_mean"]),
                "--output",
                str(root / variant),
                *args,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for variant, args in VARIANTS.items()
    ]
    for process in running:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    return {variant: root / variant for variant in VARIANTS}


@dataclass
class Served:
    precision: str  # GetModelInfo's
    logits: np.ndarray
    expected: np.ndarray  # eager fp32's
    triton_log: str


def _serve_and_score(repository: Path, checkpoint: Path, **env: str) -> Served:
    """`rerank serve` (local Triton) on the repository with these environment variables, asked for
    its model's precision and for the logits of mixed-length documents."""
    triton_log = repository.parent / f"{repository.name}-{len(os.listdir(repository.parent))}-triton.log"
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        stack = start_serve(
            [
                f"--model-repository={repository}",
                f"--triton-grpc-port={free_port()}",
                f"--triton-http-port={free_port()}",
                f"--triton-metrics-port={free_port()}",
                f"--triton-log={triton_log}",
            ]
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    documents = mixed_documents()
    try:
        with RerankClient(stack.target, timeout=120) as c:
            info = c.model_info()
            response = c.rerank(QUERY, documents)
    finally:
        assert stop_serve(stack) == 0, "".join(stack.output[-30:])
    logits = np.full(len(documents), np.nan)
    for result in response.results:
        logits[result.index] = result.logit
    expected = eager(checkpoint).logits(QUERY, documents)
    return Served(info.precision, logits, expected, triton_log.read_text(errors="replace"))


def _tolerance(precision: str, expected: np.ndarray) -> float:
    if precision == "fp32":
        return 1e-4
    relative = BF16_RELATIVE_TOLERANCE if precision == "bf16" else INT8_RELATIVE_TOLERANCE
    return relative * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_precision_served_matches_eager(
    repositories: dict[str, Path], checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    monkeypatch.delenv(cpu_features.FLAGS_ENV, raising=False)
    monkeypatch.delenv(cpu_features.FORCE_ENV, raising=False)
    # This machine's CPU: the exported precision where it is native, else its fp32 fallback.
    in_use = resolve_precision(variant.split("-")[0], cpu_flags())[0]
    served = _serve_and_score(repositories[variant], checkpoints["reranker_mean"])
    assert served.precision == in_use
    np.testing.assert_allclose(served.logits, served.expected, atol=_tolerance(in_use, served.expected))
    if in_use != "fp32":
        assert not np.allclose(served.logits, served.expected, atol=1e-5), "reduced precision, other logits"
    assert f"reranker: precision {in_use} (" in served.triton_log, served.triton_log[-3000:]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_cpu_without_native_support_serves_the_fp32_weights_and_says_so(
    repositories: dict[str, Path], checkpoints: dict[str, Path], precision: str
) -> None:
    served = _serve_and_score(
        repositories[precision], checkpoints["reranker_mean"], **{cpu_features.FLAGS_ENV: PLAIN_CPU}
    )
    assert served.precision == "fp32"
    np.testing.assert_allclose(served.logits, served.expected, atol=1e-4)  # ONNX Runtime fp32: exact
    assert "reranker: precision fp32 (onnxruntime, model" in served.triton_log, served.triton_log[-3000:]
    assert f"exported as {precision}, but the CPU has none of" in served.triton_log


def test_forced_bf16_runs_emulated_and_matches_eager_within_bf16_tolerance(
    repositories: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    # A CPU without bf16, bf16 forced anyway, and oneDNN kept off its bf16 instructions: emulated.
    env = {cpu_features.FLAGS_ENV: PLAIN_CPU, cpu_features.FORCE_ENV: "bf16", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    served = _serve_and_score(repositories["bf16"], checkpoints["reranker_mean"], **env)
    assert served.precision == "bf16"
    np.testing.assert_allclose(served.logits, served.expected, atol=_tolerance("bf16", served.expected))
    assert not np.allclose(served.logits, served.expected, atol=1e-5)
    assert "forced by RERANK_FORCE_PRECISION" in served.triton_log and "emulated" in served.triton_log
