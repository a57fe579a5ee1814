"""CPU precisions: the CPU probe, the choice at export (--precision auto) and at load (a model served on
a CPU without native support falls back to its fp32 weights), and each served precision against eager.

Tolerances against transformers eager (fp32, one pair at a time):
- fp32 (ONNX Runtime): 1e-4, as the other served tests: the same arithmetic up to summation order.
- int8 and bf16: 5% of the largest |logit| (at least 1), export.verify.RELATIVE_TOLERANCE. bf16 keeps 8
  significant bits (2^-9 relative rounding per operation); its error on these tiny models stays a few % of
  the largest logit at most, while wrong weights, masks or precisions (errors of the logits' own size) fail
  the bound. Emulated bf16 (oneDNN limited to AVX512_CORE) rounds the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rerank_client import RerankClient
from rerank_server.export.agreement import SPEARMAN_BOUND, TOP10_OVERLAP_BOUND
from rerank_server.export.auto import SEPARATION
from rerank_server.export.verify import tolerance
from rerank_server.testing import exported_parameters
from rerank_triton_model import cpu_features
from rerank_triton_model.contract import ModelParameters
from rerank_triton_model.cpu_features import cpu_flags, native_precisions, resolve_precision, served_choice
from rerank_triton_model.runtimes import LONG_PAIR_TOKENS, ONNXRUNTIME, PACKED, TORCH
from tests.conftest import RERANK, Stack, free_port, provenance, run_rerank, start_serve, stop_serve_later
from tests.reference import close_candidates, distinct, eager
from tests.texts import QUERY, mixed_documents

# Each CPU export, by name: its `rerank export` arguments (bf16 on the packed engine, its default, and through
# transformers' model).
VARIANTS = {
    "fp32": ("--precision", "fp32"),
    "int8": ("--precision", "int8"),
    "bf16": ("--precision", "bf16"),
    "bf16-torch": ("--precision", "bf16", "--runtime", TORCH.name),
}
# A CPU of the AVX2/AVX-512 generation before VNNI and bf16 (e.g. Skylake-SP, Zen 1-3).
PLAIN_CPU = "avx2,avx512f"


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
            "runtime": TORCH.name,
            "weights": "model",
            "fp32_runtime": ONNXRUNTIME.name,
            "fp32_weights": "model.onnx",
            "long_pair_tokens": "1024",
            "long_weights": "model",
        }
    )
    choice = served_choice(bf16, {"avx2"})
    assert (choice.precision, choice.runtime, choice.weights, choice.requested) == (
        "fp32",
        ONNXRUNTIME.name,
        "model.onnx",
        "bf16",
    )
    assert choice.long_precision == "fp32"  # the fallback's long pairs: the packed engine in fp32
    native = served_choice(bf16, {"avx512_bf16"})
    assert native.runtime == TORCH.name and native.long_precision == "bf16"  # bf16's: in bf16
    on_gpu = served_choice(bf16, {"avx2"}, on_gpu=True)
    assert on_gpu.precision == "bf16" and on_gpu.long_precision is None  # GPUs run as exported, unrouted
    packed = dataclasses.replace(bf16, runtime=PACKED.name)
    assert served_choice(packed, {"avx512_bf16"}).long_precision is None  # the packed engine serves them itself
    with pytest.raises(ValueError, match="unknown runtime"):
        served_choice(dataclasses.replace(bf16, runtime="tensorrt"), {"avx2"})


# ------------------------------------------------------------------------------------------ export


@pytest.mark.e2e
def test_auto_on_a_cpu_without_bf16_or_vnni_keeps_fp32_and_measures_only_the_threshold(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_features.FLAGS_ENV, PLAIN_CPU)
    done = run_rerank("export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Measuring the long-pair threshold on this CPU" in done.stderr
    assert "candidates" not in done.stderr and "Quantizing" not in done.stderr
    model_dir = tmp_path / "reranker"
    parameters = exported_parameters(model_dir)
    assert parameters.precision == "fp32" and parameters.runtime == ONNXRUNTIME.name
    assert parameters.cpu_flags == "avx2,avx512f" and "only native precision" in parameters.precision_reason
    written = provenance(model_dir)
    assert written["cpu_flags"] == ["avx2", "avx512f"]
    # reranker's pairs reach 512 tokens: the ladder tries 256, the one length below that.
    threshold = written["precision_selection"]["threshold"]
    assert [step["tokens"] for step in threshold["ladder"]] == [256] == [parameters.long_pair_tokens]
    assert threshold["ladder"][0]["faster"] in ("short", "packed", "tie")
    assert written["long_pairs"]["threshold"] == "measured" and parameters.long_weights == "model"
    assert sorted(p.name for p in (model_dir / "1").glob("model*")) == ["model", "model.onnx", "model.py"]


@pytest.mark.e2e
def test_auto_measures_each_native_precision_and_keeps_one_that_ranks_like_fp32(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend to have both, so the measurement runs on any CPU (emulated bf16 is only slower).
    monkeypatch.setenv(cpu_features.FLAGS_ENV, "avx2,avx512_vnni,avx512_bf16")
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker_mean"]), "--output", str(tmp_path), "--auto-seconds", "3"
    )
    assert done.returncode == 0, done.stderr
    model_dir = tmp_path / "reranker"
    written = provenance(model_dir)
    selection = written["precision_selection"]
    rows = {(row["runtime"], row["precision"]): row for row in selection["candidates"]}
    assert list(rows) == [(ONNXRUNTIME.name, "fp32"), (ONNXRUNTIME.name, "int8"), (PACKED.name, "bf16")]
    assert "Measuring 3 candidates and the long-pair threshold on this CPU" in done.stderr
    reference = rows[(ONNXRUNTIME.name, "fp32")]
    assert reference["speedup"] == 1.0 and reference["max_abs_diff"] == 0.0
    assert [shape["name"] for shape in selection["shapes"]] == ["short", "mixed", "long"]
    assert selection["agreement_documents"] == 32
    for row in rows.values():
        assert len(row["rounds"]) >= 3 and row["speedup"] == pytest.approx(np.mean(row["rounds"]))
        assert row["spread"] == pytest.approx(np.std(row["rounds"], ddof=1))
        assert set(row["per_shape"]) == {"short", "mixed", "long"}
        assert row["agrees"] == (row["top10_overlap"] >= TOP10_OVERLAP_BOUND and row["spearman"] >= SPEARMAN_BOUND)
    # The rule, applied to the figures written: the fastest that ranks like fp32, or among those tied with
    # it within the spread, the packed engine, else fp32.
    eligible = [r for r in rows.values() if r is reference or r["agrees"]]
    leader = max(eligible, key=lambda r: r["speedup"])
    tied = [r for r in eligible if leader["speedup"] - r["speedup"] <= SEPARATION * (leader["spread"] + r["spread"])]
    expected = next((r for r in tied if r["runtime"] == PACKED.name), reference if reference in tied else leader)
    assert (selection["runtime"], selection["precision"]) == (expected["runtime"], expected["precision"])
    assert selection["tied"] == [f"{r['precision']} ({r['runtime']})" for r in tied]
    parameters = exported_parameters(model_dir)
    assert parameters.precision == selection["precision"] == written["precision"]
    assert parameters.runtime == selection["runtime"]
    assert parameters.precision_reason.startswith(f"auto: {selection['precision']} ({selection['runtime']}) ")
    assert parameters.cpu_flags == "avx2,avx512_bf16,avx512_vnni"
    # What the choice and its fallback need is there, nothing else; long pairs go to the packed engine under
    # the measured threshold (the chosen engine's) or, for the fp32 fallback of a packed choice, the default.
    version = model_dir / "1"
    assert (version / parameters.weights).exists() and (version / parameters.fp32_weights).is_file()
    assert parameters.fp32_runtime == ONNXRUNTIME.name and (version / "model").is_dir()
    threshold = selection["threshold"]
    if selection["runtime"] == PACKED.name:
        routed = parameters.max_length > LONG_PAIR_TOKENS
        assert threshold is None and parameters.long_pair_tokens == (LONG_PAIR_TOKENS if routed else 0)
    else:
        assert parameters.long_pair_tokens == threshold["tokens"] and threshold["ladder"][0]["tokens"] == 256
    assert written["verification"]["verified"] is True
    assert set(written["verification"]["variants"]) >= {f"{PACKED.name}-fp32", f"{ONNXRUNTIME.name}-int8"}
    assert not (version / "model.int8.onnx").exists()


@pytest.mark.e2e
def test_refuses_combinations_no_runtime_computes(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    model = str(checkpoints["reranker"])
    for precision, runtime, able in (("bf16", ONNXRUNTIME, "torch or packed"), ("int8", TORCH, "onnxruntime")):
        done = run_rerank(
            "export", "--model", model, "--output", str(tmp_path), "--precision", precision, "--runtime", runtime.name
        )
        assert done.returncode == 2, done.stderr
        assert f"the {runtime.name} runtime does not compute {precision} on cpu; --runtime {able} does" in done.stderr
    done = run_rerank(
        "export", "--model", model, "--output", str(tmp_path), "--precision", "auto", "--runtime", TORCH.name
    )
    assert done.returncode == 2 and "chooses the runtime itself" in done.stderr
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


def _ranking(model_dir: Path) -> tuple[dict[str, object] | None, str]:
    """An export's ranking check (export.json) and the precision reason it serves."""
    written = provenance(model_dir)
    return written["verification"].get("ranking"), exported_parameters(model_dir).precision_reason


@pytest.mark.e2e
def test_a_fixed_reduced_precision_is_checked_for_ranking_like_fp32(
    tmp_path: Path, checkpoints: dict[str, Path], repositories: dict[str, Path]
) -> None:
    """The per-logit bound catches wrong weights; ranking is checked too, on auto's 32 sample documents
    against eager fp32. transformers' padded model in bf16 rounds its residual stream at every layer: on
    `reranker` (CLS pooling) that reorders the documents, and the export keeps the choice but says so."""
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path), *VARIANTS["bf16-torch"]
    )
    assert done.returncode == 0, done.stderr
    ranking, reason = _ranking(tmp_path / "reranker")
    assert ranking is not None and ranking["documents"] == 32 and not ranking["agrees"], ranking
    assert reason.startswith("--precision bf16; ranks unlike fp32 on 32 sample documents (top-10 overlap ")
    assert "serve --precision fp32 where ranking matters" in reason
    assert "Warning: bf16 ranks unlike fp32" in done.stderr
    # Where the precision ranks like fp32 the reason is the choice alone; fp32 is the reference, unchecked.
    for variant in ("bf16", "bf16-torch", "int8"):
        ranking, reason = _ranking(repositories[variant] / "reranker")
        assert ranking is not None and ("ranks unlike fp32" in reason) != ranking["agrees"], (variant, ranking)
    ranking, reason = _ranking(repositories["bf16"] / "reranker")
    assert ranking is not None and ranking["agrees"] and reason == "--precision bf16", ranking
    assert _ranking(repositories["fp32"] / "reranker")[0] is None


@dataclass
class Served:
    precision: str  # GetModelInfo's
    logits: np.ndarray
    expected: np.ndarray  # eager fp32's
    triton_log: str
    reported: dict[str, str]  # the precision as each other surface reports it


def _reported(stack: Stack) -> dict[str, str]:
    """The served model's precision in TEI /info, NIM /v1/models, the metrics and the serve banner."""
    assert stack.http_url is not None and stack.metrics_url is not None

    def get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=30) as response:
            return str(response.read().decode())

    families = {f.name: f for f in text_string_to_metric_families(get(stack.metrics_url))}
    (sample,) = families["rerank_model_info"].samples
    banner = re.search(r"rerank: serving reranker \(default; [^,]+, (\w+),", stack.printed("rerank: serving"))
    assert banner is not None and sample.labels["model"] == "reranker"
    return {
        "tei": json.loads(get(f"{stack.http_url}/info"))["model_dtype"],
        "nim": json.loads(get(f"{stack.http_url}/v1/models"))["data"][0]["precision"],
        "metrics": sample.labels["precision"],
        "banner": banner.group(1),
    }


def _serve_and_score(repository: Path, checkpoint: Path, **env: str) -> Served:
    """`rerank serve` (local Triton) on the repository with these environment variables, asked for
    its model's precision and for the logits of mixed-length documents."""
    triton_log = repository.parent / f"{repository.name}-{len(os.listdir(repository.parent))}-triton.log"
    with mock.patch.dict(os.environ, env):  # inherited by rerank serve, Triton and its stub
        stack = start_serve(
            [
                f"--model-repository={repository}",
                f"--triton-grpc-port={free_port()}",
                f"--triton-http-port={free_port()}",
                f"--triton-metrics-port={free_port()}",
                f"--triton-log={triton_log}",
            ]
        )
    documents = mixed_documents()
    try:
        with RerankClient(stack.target, timeout=120) as c:
            info = c.model_info()
            response = c.rerank(QUERY, documents)
        reported = _reported(stack)
    finally:
        stop_serve_later(stack)
    logits = np.full(len(documents), np.nan)
    for result in response.results:
        logits[result.index] = result.logit
    expected = eager(checkpoint).logits(QUERY, documents)
    return Served(info.precision, logits, expected, triton_log.read_text(errors="replace"), reported)


def _tolerance(precision: str, expected: np.ndarray) -> float:
    return 1e-4 if precision == "fp32" else tolerance(precision, expected)


@pytest.mark.e2e
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
    # Every surface reports the precision the model computes in, as GetModelInfo does.
    assert served.reported == dict.fromkeys(("tei", "nim", "metrics", "banner"), in_use)
    np.testing.assert_allclose(served.logits, served.expected, atol=_tolerance(in_use, served.expected))
    if in_use != "fp32":
        assert not np.allclose(served.logits, served.expected, atol=1e-5), "reduced precision, other logits"
    assert f"reranker: precision {in_use} (" in served.triton_log, served.triton_log[-3000:]


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_cpu_without_native_support_serves_the_fp32_weights_and_says_so(
    repositories: dict[str, Path], checkpoints: dict[str, Path], precision: str
) -> None:
    served = _serve_and_score(
        repositories[precision], checkpoints["reranker_mean"], **{cpu_features.FLAGS_ENV: PLAIN_CPU}
    )
    assert served.precision == "fp32"
    assert set(served.reported.values()) == {"fp32"}  # exported as a reduced precision, reported as served
    np.testing.assert_allclose(served.logits, served.expected, atol=1e-4)  # ONNX Runtime fp32: exact
    assert f"reranker: precision fp32 ({ONNXRUNTIME.name}, model" in served.triton_log, served.triton_log[-3000:]
    assert f"exported as {precision}, but the CPU has none of" in served.triton_log


@pytest.mark.e2e
def test_forced_bf16_runs_emulated_and_matches_eager_within_bf16_tolerance(
    repositories: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    # A CPU without bf16, bf16 forced anyway, and oneDNN kept off its bf16 instructions: emulated.
    env = {cpu_features.FLAGS_ENV: PLAIN_CPU, cpu_features.FORCE_ENV: "bf16", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    served = _serve_and_score(repositories["bf16"], checkpoints["reranker_mean"], **env)
    assert served.precision == "bf16"
    assert set(served.reported.values()) == {"bf16"}
    np.testing.assert_allclose(served.logits, served.expected, atol=_tolerance("bf16", served.expected))
    assert not np.allclose(served.logits, served.expected, atol=1e-5)
    assert "forced by RERANK_FORCE_PRECISION" in served.triton_log and "emulated" in served.triton_log


@pytest.mark.e2e
def test_a_served_bf16_model_returns_as_many_distinct_logits_as_fp32(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 close candidates (fp32 logits within about ±1 of each other, which bf16's resolution would merge
    into a third as many) through a served bf16 export, bf16 forced so that any CPU computes it: the final
    norm, pooling and head run in fp32, and the logits are as distinct as fp32 eager's."""
    candidates = close_candidates(checkpoints["reranker_mean"], tmp_path / "close")
    done = run_rerank(
        "export", "--model", str(candidates.checkpoint), "--output", str(tmp_path / "repository"), "--precision", "bf16"
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv(cpu_features.FORCE_ENV, "bf16")
    stack = start_serve(
        [
            f"--model-repository={tmp_path / 'repository'}",
            f"--triton-grpc-port={free_port()}",
            f"--triton-http-port={free_port()}",
            f"--triton-metrics-port={free_port()}",
        ]
    )
    try:
        with RerankClient(stack.target, timeout=120) as client:
            assert client.model_info().precision == "bf16"
            response = client.rerank(candidates.query, candidates.documents)
    finally:
        stop_serve_later(stack)
    logits = np.full(len(candidates.documents), np.nan)
    for result in response.results:
        logits[result.index] = result.logit
    assert distinct(logits) == distinct(candidates.expected) == len(candidates.documents)
    assert np.abs(logits - candidates.expected).max() < 0.05
