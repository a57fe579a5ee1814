"""`rerank export --quantize int8` (= --precision int8): a dynamically quantized CPU model, verified and
recorded as int8, with its fp32 graph kept for CPUs without VNNI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from rerank_server.export.agreement import INT8_SPEARMAN_BOUND, INT8_TOP10_OVERLAP_BOUND, agreement
from rerank_server.export.weights import quantize_int8
from rerank_triton_model.cpu_features import FLAGS_ENV, cpu_flags, native_precisions
from rerank_triton_model.reranker_engine import PackedReranker
from rerank_triton_model.runtimes import ONNXRUNTIME
from tests.conftest import provenance, run_rerank

PAD = 50283
# The weights' type where this CPU has VNNI dot products (signed: U8S8 kernels) and where it has not.
SIGNED, UNSIGNED = onnx.TensorProto.INT8, onnx.TensorProto.UINT8
HERE = SIGNED if "int8" in native_precisions(cpu_flags()) else UNSIGNED  # what an export on this machine writes


def weight_types(graph: onnx.GraphProto) -> set[int]:
    """The 8-bit types among the graph's initializers (quantized weights and their zero points)."""
    return {init.data_type for init in graph.initializer} & {SIGNED, UNSIGNED}


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    repository = tmp_path_factory.mktemp("int8")
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker"]), "--output", str(repository), "--quantize", "int8"
    )
    assert done.returncode == 0, done.stderr
    assert "[4/7] Quantizing to int8" in done.stderr and "[6/7] Checking that int8 ranks like fp32" in done.stderr
    assert "[7/7]" in done.stderr
    return repository


@pytest.mark.e2e
def test_config_and_provenance_say_int8(int8_repository: Path) -> None:
    config = (int8_repository / "reranker" / "config.pbtxt").read_text()
    assert 'key: "precision" value: { string_value: "int8" }' in config
    assert "kind: KIND_CPU" in config
    written = provenance(int8_repository / "reranker")
    assert written["precision"] == "int8"
    assert written["quantization"]["method"] == "onnxruntime.quantization.quantize_dynamic"
    assert written["quantization"]["weight_type"] == ("QInt8" if HERE == SIGNED else "QUInt8")
    verification = written["verification"]
    assert verification["verified"] is True
    assert 0 < verification["max_abs_diff"] <= verification["tolerance"]  # int8 is close, not exact
    fp32 = verification["variants"][f"{ONNXRUNTIME.name}-fp32"]
    assert fp32["verified"] is True and fp32["max_abs_diff"] < 1e-4
    # The fp32 graph stays: a CPU without VNNI loads it instead (cpu_features.py).
    assert (int8_repository / "reranker" / "1" / "model.fp32.onnx").is_file()
    assert 'key: "fp32_weights" value: { string_value: "model.fp32.onnx" }' in config
    assert written["fp32_fallback"] == {"runtime": ONNXRUNTIME.name, "weights": "model.fp32.onnx"}


@pytest.mark.e2e
def test_graph_runs_its_weight_matmuls_in_int8(int8_repository: Path, model_repository: Path) -> None:
    graph = onnx.load(str(int8_repository / "reranker" / "1" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    weights = {init.name for init in graph.initializer}
    quantized = ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul")
    # 4 layers x 4 weight matrices (Wqkv, Wo, Wi, mlp Wo); the scoring head stays fp32.
    assert quantized == 4 * 4, ops
    fp32_weights = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
    # (quantize_dynamic rewrites the classifier's Gemm as MatMul + Add, still fp32)
    assert [name.split("/")[2] for name in fp32_weights] == ["head", "classifier"], fp32_weights
    assert weight_types(graph) == {HERE}
    # The fp32 graph of the same checkpoint is the larger file: the weights shrank to a byte each.
    fp32_size = (model_repository / "reranker" / "1" / "model.onnx").stat().st_size
    assert (int8_repository / "reranker" / "1" / "model.onnx").stat().st_size < fp32_size


def _random_pairs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 300, count)
    return rng.integers(0, PAD, int(lengths.sum())).astype(np.int32), lengths


@pytest.mark.e2e
def test_int8_scores_rank_like_fp32(int8_repository: Path, model_repository: Path) -> None:
    def engine(repository: Path) -> PackedReranker:
        path = repository / "reranker" / "1" / "model.onnx"
        return PackedReranker.from_file(str(path), pad_token_id=PAD, max_batch_tokens=4096)

    ids, lengths = _random_pairs(48, seed=7)
    fp32 = engine(model_repository).score(ids, lengths)
    int8 = engine(int8_repository).score(ids, lengths)
    assert not np.array_equal(fp32, int8)
    assert np.abs(int8 - fp32).max() <= 0.05 * np.abs(fp32).max()
    measured = agreement(fp32, int8)
    assert measured.spearman >= INT8_SPEARMAN_BOUND and measured.top10_overlap >= INT8_TOP10_OVERLAP_BOUND, measured


@pytest.mark.e2e
def test_refuses_int8_on_gpu(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    done = run_rerank(
        "export",
        "--model",
        str(checkpoints["reranker"]),
        "--output",
        str(tmp_path),
        "--quantize",
        "int8",
        "--device",
        "gpu",
    )
    assert done.returncode == 2
    assert "makes a CPU model" in done.stderr and "--device gpu" in done.stderr
    assert not (tmp_path / "reranker").exists()


@pytest.mark.e2e
def test_refuses_an_unknown_quantization(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path), "--quantize", "int4"
    )
    assert done.returncode == 2 and "invalid choice: 'int4'" in done.stderr


def test_the_api_refuses_an_unknown_quantization(tmp_path: Path) -> None:
    from rerank_server.export import ExportError, ExportOptions, export

    with pytest.raises(ExportError, match="quantize must be one of"):
        export(ExportOptions(model=str(tmp_path), output=tmp_path, quantize="int4"))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("avx2,avx512f", UNSIGNED),
        ("avx2,avx512f,avx512_vnni", SIGNED),
        ("avx2,avx_vnni", SIGNED),
        ("avx2,avx512f,amx_tile,amx_int8", SIGNED),
    ],
)
def test_weights_are_signed_only_where_the_cpu_has_vnni_dot_products(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, expected: int
) -> None:
    """U8S8 runs on VNNI (and AMX) where the CPU has them; without, ONNX Runtime's AVX2 U8S8 kernels saturate
    int16 sums, so the export quantizes to uint8 there (U8U8)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = (np.random.default_rng(0).standard_normal((64, 32)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="/model/layers.0/mlp/Wi/MatMul")],
        "layer",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [8, 32])],
        [numpy_helper.from_array(weight, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "fp32.onnx"))
    monkeypatch.setenv(FLAGS_ENV, flags)
    settings = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    assert weight_types(onnx.load(str(tmp_path / "int8.onnx")).graph) == {expected}
    assert settings["weight_type"] == ("QInt8" if expected == SIGNED else "QUInt8")
