"""`rerank export`: what it writes, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, ModernBertConfig, ModernBertForMaskedLM

from rerank_server.testing import TINY_CONFIG, save_random_checkpoint
from rerank_triton_model.runtimes import LONG_PAIR_TOKENS, PACKED, TORCH
from tests.conftest import TOKENIZER_DIR, edit_head, provenance, run_rerank

pytestmark = pytest.mark.e2e


def test_repository_layout_and_config(model_repository: Path) -> None:
    model_dir = model_repository / "reranker"
    version = model_dir / "1"
    package = (
        "rerank_triton_model/model.py",
        "rerank_triton_model/contract.py",
        "rerank_triton_model/reranker_engine.py",
    )
    for name in ("model.onnx", "model.py", *package, "tokenizer/tokenizer.json", "export.json"):
        assert (version / name).is_file(), name
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in config
    assert "max_batch_size: 32" in config
    assert "dynamic_batching" in config and "allow_ragged_batch: true" in config
    assert "kind: KIND_CPU" in config
    assert 'key: "max_length" value: { string_value: "512" }' in config
    written = provenance(model_dir)
    assert written["verification"]["verified"] is True
    assert written["verification"]["max_abs_diff"] < 1e-4
    assert not list(model_repository.glob(".*partial"))


def test_graph_has_dynamic_batch_and_sequence_axes(model_repository: Path) -> None:
    graph = onnx.load(str(model_repository / "reranker" / "1" / "model.onnx"), load_external_data=False).graph
    for tensor in graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"], tensor.name
    assert [o.name for o in graph.output] == ["logits"]


def test_gpu_variant_is_the_packed_engine_in_fp16_over_fp32_weights(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    done = run_rerank("export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path), "--device", "gpu")
    assert done.returncode == 0, done.stderr
    config = (tmp_path / "reranker" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config and f'key: "runtime" value: {{ string_value: "{PACKED.name}" }}' in config
    assert 'key: "precision" value: { string_value: "fp16" }' in config
    version = tmp_path / "reranker" / "1"
    assert (version / "rerank_triton_model" / "modernbert_packed.py").is_file() and not (
        version / "model.onnx"
    ).exists()
    from safetensors import safe_open

    # fp32 on disk, cast to the served precision at load.
    with safe_open(str(version / "model" / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float32}  # noqa: SIM118
    verification = provenance(tmp_path / "reranker")["verification"]
    assert verification["verified"] and verification["max_abs_diff"] < 1e-3  # checked in fp32 without a GPU


def test_gpu_onnx_variant_is_fp16_with_fp32_io(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    model = str(checkpoints["reranker"])
    done = run_rerank(
        "export", "--model", model, "--output", str(tmp_path), "--device", "gpu", "--runtime", "onnxruntime"
    )
    assert done.returncode == 0, done.stderr
    config = (tmp_path / "reranker" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config and 'string_value: "fp16"' in config
    graph = onnx.load(str(tmp_path / "reranker" / "1" / "model.onnx")).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dtypes = {init.name: init.data_type for init in graph.initializer}
    assert dtypes["inner.model.embeddings.tok_embeddings.weight"] == onnx.TensorProto.FLOAT16
    # The final norm, pooling and the scoring head stay fp32: the logit keeps fp32's resolution.
    assert dtypes["inner.classifier.weight"] == dtypes["inner.classifier.bias"] == onnx.TensorProto.FLOAT
    assert "[5/6]" in done.stderr and "[6/6]" in done.stderr  # progress is shown


def test_torch_runtime_saves_the_fp32_checkpoint_and_casts_it_at_load(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    model = str(checkpoints["reranker"])
    done = run_rerank("export", "--model", model, "--output", str(tmp_path), "--device", "gpu", "--runtime", "torch")
    assert done.returncode == 0, done.stderr
    config = (tmp_path / "reranker" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config and f'key: "runtime" value: {{ string_value: "{TORCH.name}" }}' in config
    assert 'key: "weights" value: { string_value: "model" }' in config and 'string_value: "fp16"' in config
    version = tmp_path / "reranker" / "1"
    assert not (version / "model.onnx").exists() and (version / "rerank_triton_model" / "torch_runner.py").is_file()
    from safetensors import safe_open

    with safe_open(str(version / "model" / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float32}  # noqa: SIM118
    verification = provenance(tmp_path / "reranker")["verification"]
    # No GPU here: the weights are checked in fp32 on the CPU, as one padded batch against eager.
    assert verification["verified"] is True and verification["checked_in"] == "fp32"
    assert verification["max_abs_diff"] < 1e-3


def test_quantize_needs_the_onnx_runtime(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    model = str(checkpoints["reranker"])
    done = run_rerank("export", "--model", model, "--output", str(tmp_path), "--runtime", "torch", "--quantize", "int8")
    assert done.returncode == 2 and "--runtime onnxruntime" in done.stderr
    assert not (tmp_path / "reranker").exists()


def _refused(checkpoint: Path, tmp_path: Path) -> str:
    done = run_rerank("export", "--model", str(checkpoint), "--output", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert not (tmp_path / "out" / "reranker").exists()
    return done.stderr


def test_refuses_a_model_that_is_not_modernbert(tmp_path: Path) -> None:
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    assert "expected a ModernBERT checkpoint" in _refused(tmp_path / "bert", tmp_path)


def test_refuses_more_than_one_logit(tmp_path: Path) -> None:
    config = {**TINY_CONFIG, "num_labels": 3}
    torch.manual_seed(0)
    from transformers import ModernBertForSequenceClassification

    ModernBertForSequenceClassification(ModernBertConfig(**config)).save_pretrained(tmp_path / "three")
    assert "one output logit, got num_labels=3" in _refused(tmp_path / "three", tmp_path)


def test_refuses_a_checkpoint_without_a_scoring_head(tmp_path: Path) -> None:
    ModernBertForMaskedLM(ModernBertConfig(**TINY_CONFIG)).save_pretrained(tmp_path / "mlm")
    assert "ModernBertForSequenceClassification" in _refused(tmp_path / "mlm", tmp_path)


def test_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    assert "cannot load the configuration" in _refused(tmp_path / "nowhere", tmp_path)


def test_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    checkpoint = save_random_checkpoint(tmp_path / "ckpt", TOKENIZER_DIR, **TINY_CONFIG)
    export = ("export", "--model", str(checkpoint), "--output", str(tmp_path / "out"), "--precision", "fp32")
    first = run_rerank(*export, "--model-id", "org/x")  # fp32: auto's measurement is not what this tests
    assert first.returncode == 0, first.stderr
    assert 'string_value: "org/x"' in (tmp_path / "out" / "reranker" / "config.pbtxt").read_text()
    again = run_rerank(*export)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    forced = run_rerank(*export, "--overwrite")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.parametrize("value", ["3", "100000"])
def test_refuses_a_max_length_outside_the_model_limit(tmp_path: Path, checkpoints: dict[str, Path], value: str) -> None:
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path), "--max-length", value
    )
    assert done.returncode == 2 and "--max-length must lie in [4, 512]" in done.stderr


def test_an_onnx_export_keeps_the_fp32_checkpoint_for_long_pairs(
    model_repository: Path, tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    # reranker_long (8,192 tokens, ONNX Runtime): pairs past the threshold go to the packed engine.
    long_dir = model_repository / "reranker_long"
    config = (long_dir / "config.pbtxt").read_text()
    assert f'key: "long_pair_tokens" value: {{ string_value: "{LONG_PAIR_TOKENS}" }}' in config
    assert 'key: "long_weights" value: { string_value: "model" }' in config
    assert (long_dir / "1" / "model" / "config.json").is_file()
    assert provenance(long_dir)["long_pairs"]["verification"]["verified"] is True
    # Off with 0, and no checkpoint is left behind.
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker_long"]), "--output", str(tmp_path), "--precision", "fp32",
        "--long-pair-tokens", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        'key: "long_pair_tokens" value: { string_value: "0" }' in (tmp_path / "reranker" / "config.pbtxt").read_text()
    )
    assert not (tmp_path / "reranker" / "1" / "model").exists()


def test_refuses_a_negative_long_pair_threshold(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path), "--long-pair-tokens", "-1"
    )
    assert done.returncode == 2 and "--long-pair-tokens must be 0 (off) or positive" in done.stderr


def test_the_bf16_bound_ignores_the_heads_bias(tmp_path: Path) -> None:
    """A bias shifts every logit alike and adds no rounding error (the head runs in fp32): the bound stays
    relative to the logits' distance from it, so a checkpoint with offset logits is held as tightly as any."""
    checkpoint = save_random_checkpoint(tmp_path / "ckpt", TOKENIZER_DIR, **TINY_CONFIG)
    edit_head(checkpoint, lambda head: head.bias.fill_(1000.0))
    done = run_rerank("export", "--model", str(checkpoint), "--output", str(tmp_path / "out"), "--precision", "bf16")
    assert done.returncode == 0, done.stderr
    verification = provenance(tmp_path / "out" / "reranker")["verification"]
    # 5% of the largest |logit - 1000| (these logits reach about ±30), where 5% of the largest |logit| is 50.
    assert 0.05 <= verification["tolerance"] < 2.5 and verification["max_abs_diff"] < verification["tolerance"]
    assert verification["ranking"]["agrees"], verification["ranking"]
