"""`rerank export` on checkpoints unlike the tests' own: logits far from the usual few units."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rerank_server.export.verify import ABSOLUTE_TOLERANCE, head_bias, tolerance
from rerank_server.testing import save_random_checkpoint
from rerank_triton_model.runtimes import ONNXRUNTIME
from tests.conftest import TOKENIZER_DIR, edit_head, provenance, run_rerank


def test_the_fp32_bound_grows_with_the_logits_scale_only_past_where_it_holds_as_is() -> None:
    # fp32 rounds relative to the activations: the bound is absolute for logits of the usual scale and
    # relative beyond, measured from the head's bias as the reduced precisions' bounds are.
    usual = np.array([-7.5, 0.3, 9.8])
    assert tolerance("fp32", usual) == ABSOLUTE_TOLERANCE["fp32"]
    assert tolerance("fp32", usual + 500.0, bias=500.0) == ABSOLUTE_TOLERANCE["fp32"]
    large = np.array([-768.0, 388.0, 12.0])
    assert tolerance("fp32", large) == pytest.approx(768.0 * 1e-4)
    # fp16 alike, with its own share: 11 significant bits.
    assert tolerance("fp16", usual / 10) == ABSOLUTE_TOLERANCE["fp16"]
    assert tolerance("fp16", large) == pytest.approx(768.0 * 0.02)


def test_the_head_bias_is_read_without_a_torch_warning() -> None:
    model = SimpleNamespace(classifier=torch.nn.Linear(4, 1))  # its bias a parameter that requires grad
    with torch.no_grad():
        model.classifier.bias.fill_(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert head_bias(model) == 1.5


@pytest.mark.e2e
def test_an_fp32_export_of_a_checkpoint_with_logits_in_the_hundreds(tmp_path: Path) -> None:
    """Logits of several hundred (a head scaled 50x over the random checkpoint's): ONNX Runtime's fp32
    differs from eager by about 2e-6 of their scale, which is past 1e-3 there."""
    checkpoint = save_random_checkpoint(
        tmp_path / "large-logits",
        TOKENIZER_DIR,
        seed=0,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        global_attn_every_n_layers=1,
        local_attention=16,
        max_position_embeddings=128,
        initializer_range=0.5,
    )
    edit_head(checkpoint, lambda head: head.weight.mul_(50.0))
    done = run_rerank("export", "--model", str(checkpoint), "--output", str(tmp_path / "repo"), "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    verification = provenance(tmp_path / "repo" / "reranker")["verification"]
    assert verification["verified"] and verification["tolerance"] > ABSOLUTE_TOLERANCE["fp32"]
    assert verification["max_abs_diff"] <= verification["tolerance"]


@pytest.mark.e2e
def test_auto_leaves_out_a_candidate_too_coarse_for_the_checkpoint(tmp_path: Path) -> None:
    """Large activations (a wide random initialisation): int8 lies past its bound from eager here while fp32
    verifies. auto chooses among the candidates that verified and says which it left out, where an explicit
    --precision int8 is refused."""
    checkpoint = save_random_checkpoint(
        tmp_path / "coarse",
        TOKENIZER_DIR,
        seed=0,
        hidden_size=96,
        num_attention_heads=2,
        intermediate_size=216,
        num_hidden_layers=3,
        local_attention=32,
        max_position_embeddings=512,
        initializer_range=0.3,
    )
    args = ["export", "--model", str(checkpoint), "--output", str(tmp_path / "repo")]
    done = run_rerank(*args, "--precision", "auto", "--auto-seconds", "3")
    assert done.returncode == 0, done.stderr
    assert f"Leaving {ONNXRUNTIME.name}-int8 out of the choice" in done.stdout + done.stderr
    written = provenance(tmp_path / "repo" / "reranker")
    assert written["precision"] != "int8"
    assert f"left out, too far from eager on this checkpoint: {ONNXRUNTIME.name}-int8" in written["precision_reason"]
    variants = written["verification"]["variants"]
    assert variants[f"{ONNXRUNTIME.name}-int8"]["verified"] is False
    assert variants[f"{ONNXRUNTIME.name}-fp32"]["verified"] is True
    refused = run_rerank(*args, "--name", "int8", "--precision", "int8")
    assert refused.returncode != 0 and "differs from eager" in refused.stderr
