"""modernbert_packed (the packed, windowed ModernBERT engine) on CPU, against transformers eager.

Tiny random checkpoints of different widths, depths, heads, windows, global_attn_every_n_layers and
poolings; pairs at lengths around and far past the window, packed together in one call in mixed
orders. The reference runs each pair alone, unpadded, with eager attention in fp32.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import ModernBertForSequenceClassification

from rerank_server.testing import save_random_checkpoint
from rerank_triton_model import modernbert_packed
from rerank_triton_model.modernbert_packed import (
    BLOCKED,
    FLASH_FORWARD,
    VARLEN_ATTN,
    PackedModernBert,
    flash_forward_arguments,
    select_attention_backend,
)
from rerank_triton_model.reranker_engine import PACKED_CPU_RUN_TOKENS, PackedReranker
from rerank_triton_model.runtimes import CPU, FP32, GPU, RUNTIMES, Runtime
from tests.reference import CloseCandidates, close_candidates, distinct

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "modernbert-tokenizer"
VOCAB = 50_000  # below every checkpoint's vocab_size (ModernBertConfig's default, 50368)
FP32_TOLERANCE = 1e-4

# Widths, depths, heads (head sizes 8 to 24), windows (odd half-windows too), layer patterns, poolings
# and rotary thetas that differ from one checkpoint to the next.
CONFIGS: dict[str, dict[str, Any]] = {
    "w16-every3-cls": {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "local_attention": 16,
    },
    "w32-every2-mean": {
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 5,
        "num_attention_heads": 2,
        "local_attention": 32,
        "global_attn_every_n_layers": 2,
        "classifier_pooling": "mean",
    },
    "w64-every1-cls": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "local_attention": 64,
        "global_attn_every_n_layers": 1,
    },
    "w30-every3-mean-thetas": {
        "hidden_size": 96,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "local_attention": 30,
        "classifier_pooling": "mean",
        "global_rope_theta": 80_000.0,
        "local_rope_theta": 5_000.0,
    },
    "w64-every3-cls-deep": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 7,
        "num_attention_heads": 2,
        "local_attention": 64,
        "norm_bias": True,
        "attention_bias": True,
        "mlp_bias": True,
        "classifier_bias": True,
    },
}


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed_checkpoints")
    return {
        name: save_random_checkpoint(root / name, TOKENIZER_DIR, seed=i, **config)
        for i, (name, config) in enumerate(CONFIGS.items())
    }


def window_lengths(local_attention: int) -> list[int]:
    """Lengths around the half window w and far past it (some repeated: equal lengths share a call), and
    past GEMM_ATTENTION_MIN (global layers through chunked GEMMs on CPU fp32)."""
    w = local_attention // 2
    return [1, 2, w - 1, w, w + 1, w + 2, 2 * w + 1, 3 * w + 5, 1000, w, 3 * w + 5, 7, 1100, 1100]


def random_pairs(lengths: list[int], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]


def pack(pairs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.tensor([0, *np.cumsum([p.numel() for p in pairs]).tolist()], dtype=torch.int32)
    return torch.cat(pairs), cu


def eager_logits(checkpoint: Path, pairs: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> np.ndarray:
    model = ModernBertForSequenceClassification.from_pretrained(
        checkpoint, attn_implementation="eager", dtype=dtype
    ).eval()
    with torch.inference_mode():
        return np.array([model(input_ids=p[None]).logits[0, 0].item() for p in pairs])


@pytest.fixture(scope="module")
def references(checkpoint_dirs: dict[str, Path]) -> dict[str, tuple[list[torch.Tensor], np.ndarray]]:
    """Per checkpoint: its test pairs and eager fp32's logits for them."""
    out = {}
    for i, (name, checkpoint) in enumerate(checkpoint_dirs.items()):
        pairs = random_pairs(window_lengths(CONFIGS[name]["local_attention"]), seed=100 + i)
        out[name] = (pairs, eager_logits(checkpoint, pairs))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_fp32_matches_eager_in_any_order(
    name: str, checkpoint_dirs: dict[str, Path], references: dict[str, tuple[list[torch.Tensor], np.ndarray]]
) -> None:
    engine = PackedModernBert.from_pretrained(str(checkpoint_dirs[name]))
    assert engine.backend == BLOCKED and engine.dtype == torch.float32
    pairs, expected = references[name]
    assert np.ptp(expected) > 1.0, "logits too alike to tell pairs apart"
    lengths = [p.numel() for p in pairs]
    # Given, reversed, shuffled, and by length (equal lengths end to end attend as one view).
    orders = (np.arange(len(pairs)), np.arange(len(pairs))[::-1], np.random.default_rng(0).permutation(len(pairs)))
    for order in (*orders, np.argsort(lengths, kind="stable")):
        logits = engine.forward_packed(*pack([pairs[i] for i in order]))
        assert logits.dtype == torch.float32 and logits.shape == (len(pairs),)
        np.testing.assert_allclose(logits.numpy(), expected[order], rtol=0, atol=FP32_TOLERANCE)


@pytest.mark.parametrize("name", ["w16-every3-cls", "w32-every2-mean"])
def test_packed_bf16_is_as_close_to_fp32_as_transformers_bf16(
    name: str, checkpoint_dirs: dict[str, Path], references: dict[str, tuple[list[torch.Tensor], np.ndarray]]
) -> None:
    """bf16 keeps 8 significant bits, so logits move by ~1% of their scale through a few layers. The
    bound is transformers' own bf16 eager error on the same pairs (x2, since rounding happens at other
    points), and at most 2% of the logits' spread."""
    pairs, expected = references[name]
    engine = PackedModernBert.from_pretrained(str(checkpoint_dirs[name]), dtype=torch.bfloat16)
    assert engine.dtype == torch.bfloat16 and engine.embeddings.dtype == torch.bfloat16
    logits = engine.forward_packed(*pack(pairs))
    assert logits.dtype == torch.float32
    ours = np.abs(logits.numpy() - expected).max()
    theirs = np.abs(eager_logits(checkpoint_dirs[name], pairs, torch.bfloat16) - expected).max()
    spread = np.ptp(expected)
    assert ours <= max(2 * theirs, 0.002 * spread), (ours, theirs, spread)
    assert ours <= 0.02 * spread, (ours, spread)


# Axes CONFIGS leaves at their defaults: head activations, MLP activations, norm_eps, a window of a few tokens,
# one layer, a global-layer spacing past the depth (layer 0 the only global one), attention bias without MLP bias.
HEADS_AND_NORMS: dict[str, dict[str, Any]] = {
    "w4-tanh-head-eps12-mean": {
        "hidden_size": 36,
        "intermediate_size": 40,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "local_attention": 4,
        "global_attn_every_n_layers": 2,
        "classifier_pooling": "mean",
        "classifier_activation": "tanh",
        "norm_eps": 1e-12,
    },
    "w17-silu-mlp-relu-head-eps3": {
        "hidden_size": 40,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "local_attention": 17,
        "global_attn_every_n_layers": 2,
        "hidden_activation": "silu",
        "classifier_activation": "relu",
        "norm_eps": 1e-3,
    },
    "w10-every5-of-4-attention-bias": {
        "hidden_size": 60,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 5,
        "local_attention": 10,
        "global_attn_every_n_layers": 5,
        "attention_bias": True,
        "classifier_activation": "silu",
    },
    "one-layer-gelu-tanh-mean": {
        "hidden_size": 24,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "local_attention": 8,
        "hidden_activation": "gelu_pytorch_tanh",
        "classifier_activation": "gelu_new",
        "classifier_pooling": "mean",
    },
}


@pytest.mark.parametrize("name", list(HEADS_AND_NORMS))
def test_served_pytorch_engines_match_eager_on_other_heads_norms_and_windows(name: str, tmp_path: Path) -> None:
    """The packed engine (read without transformers, runs cut by a small budget) and transformers' padded model,
    built as the served model builds them, on pairs around the window, a one-token pair and duplicates."""
    config = HEADS_AND_NORMS[name]
    checkpoint = save_random_checkpoint(tmp_path / name, TOKENIZER_DIR, seed=len(name), **config)
    assert modernbert_packed.read_checkpoint(checkpoint) is not None
    w = config["local_attention"] // 2
    pairs = random_pairs([1, 2, w, w + 1, w + 2, 2 * w + 3, 9 * w + 5, 70, 3], seed=5)
    pairs += [pairs[3], pairs[6]]
    expected = eager_logits(checkpoint, pairs)
    assert np.ptp(expected) > 0.1, "logits too alike to tell pairs apart"
    lengths = np.array([p.numel() for p in pairs])
    ids = torch.cat(pairs).numpy()
    for served in (RUNTIMES["packed"], RUNTIMES["torch"]):
        engine = served.build(str(checkpoint), device=CPU, precision=FP32, pad_token_id=0, max_batch_tokens=48)
        np.testing.assert_allclose(
            engine.score(ids, lengths), expected, rtol=0, atol=FP32_TOLERANCE, err_msg=served.name
        )


def test_a_pair_of_thousands_of_tokens_packed_with_short_ones(tmp_path: Path) -> None:
    checkpoint = save_random_checkpoint(
        tmp_path / "long",
        TOKENIZER_DIR,
        seed=7,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        local_attention=32,
    )
    pairs = random_pairs([3, 4500, 40, 17], seed=3)
    expected = eager_logits(checkpoint, pairs)
    logits = PackedModernBert.from_pretrained(str(checkpoint)).forward_packed(*pack(pairs))
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=FP32_TOLERANCE)


def test_the_engine_splits_packed_runs_by_the_token_budget_and_keeps_the_order(
    checkpoint_dirs: dict[str, Path], references: dict[str, tuple[list[torch.Tensor], np.ndarray]]
) -> None:
    """The served engine (reranker_engine.PackedReranker over the packed runner): runs of at most the
    budget's real tokens (a longer pair alone), logits back in request order."""
    name = "w30-every3-mean-thetas"
    budget = 200
    engine = PackedReranker.from_pretrained(
        str(checkpoint_dirs[name]), pad_token_id=0, max_batch_tokens=budget, packed=True
    )
    model = engine.runner.model  # type: ignore[union-attr]
    pairs, expected = references[name]
    calls: list[int] = []
    forward = model.forward_packed

    def counting(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        calls.append(int(input_ids.numel()))
        assert int(cu_seqlens[-1]) == input_ids.numel()
        return forward(input_ids, cu_seqlens)

    model.forward_packed = counting
    lengths = np.array([p.numel() for p in pairs])
    ids = torch.cat(pairs).numpy()
    logits = engine.score(ids, lengths)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=0, atol=FP32_TOLERANCE)
    assert sum(calls) == lengths.sum() and len(calls) > 1
    # Over the budget only alone: the 1000-token pair.
    assert all(n <= budget or n in lengths[lengths > budget] for n in calls), calls
    calls.clear()
    engine.max_batch_tokens = 100_000
    np.testing.assert_allclose(engine.score(ids, lengths), logits, rtol=0, atol=1e-5)
    assert calls == [lengths.sum()]
    with pytest.raises(ValueError, match="cu_seqlens"):
        forward(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 2, 3], dtype=torch.int32))


def test_on_cpus_the_packed_engine_runs_at_most_its_cpu_run_size_whatever_the_budget(
    checkpoint_dirs: dict[str, Path],
) -> None:
    checkpoint = str(checkpoint_dirs["w30-every3-mean-thetas"])
    packed = PackedReranker.from_pretrained(checkpoint, pad_token_id=0, max_batch_tokens=8192, packed=True)
    assert packed.max_batch_tokens == PACKED_CPU_RUN_TOKENS < 8192
    runs = packed.plan(np.array([1000] * 4 + [3 * PACKED_CPU_RUN_TOKENS, 5, 7]))
    # Length order, runs of at most 2,048 real tokens; a longer pair still runs alone.
    assert [run.packed_tokens for run in runs] == [5 + 7 + 1000 + 1000, 2000, 3 * PACKED_CPU_RUN_TOKENS]
    # A smaller budget stands; the padded engine keeps the budget it was given.
    assert (
        PackedReranker.from_pretrained(checkpoint, pad_token_id=0, max_batch_tokens=512, packed=True).max_batch_tokens
        == 512
    )
    padded = PackedReranker.from_pretrained(checkpoint, pad_token_id=0, max_batch_tokens=8192)
    assert padded.max_batch_tokens == 8192


def count_gemm_attention(engine: PackedModernBert) -> list[int]:
    """The lengths of the pairs the engine sends through _gemm_attention from now on, one per call."""
    calls: list[int] = []
    gemm_attention = engine._gemm_attention

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        calls.append(q.shape[0])
        gemm_attention(q, k, v, out)

    engine._gemm_attention = counting  # type: ignore[method-assign]
    return calls


def test_chunked_gemm_attention_equals_the_fused_kernel(
    checkpoint_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU fp32: pairs of GEMM_ATTENTION_MIN tokens or more attend through _gemm_attention (oneDNN GEMMs,
    chunks of queries); the same forward through SDPA's fused kernel agrees, and so does eager."""
    name = "w30-every3-mean-thetas"
    checkpoint = checkpoint_dirs[name]
    engine = PackedModernBert.from_pretrained(str(checkpoint))
    if not engine.gemm_attention:
        pytest.skip("this torch has no oneDNN linear: the fused kernel is the only CPU path")
    # Two equal long pairs end to end (one group, attended pair by pair), one longer, one short.
    pairs = random_pairs([1500, 1100, 1100, 40], seed=11)
    # Chunks of 256 queries: a pair's last chunk is partial.
    monkeypatch.setattr(modernbert_packed, "GEMM_SCORES_BYTES", 4 * 256 * 1100)
    calls = count_gemm_attention(engine)
    gemm = engine.forward_packed(*pack(pairs)).numpy()
    global_layers = sum(layer.half_window is None for layer in engine.layers)
    assert sorted(calls) == sorted([1500, 1100, 1100] * global_layers)
    engine.gemm_attention = False
    fused = engine.forward_packed(*pack(pairs)).numpy()
    np.testing.assert_allclose(gemm, fused, rtol=0, atol=1e-5)
    np.testing.assert_allclose(gemm, eager_logits(checkpoint, pairs), rtol=0, atol=FP32_TOLERANCE)


def test_bf16_gemm_attention_is_as_close_to_fp32_as_the_fused_kernel(checkpoint_dirs: dict[str, Path]) -> None:
    """CPU bf16: long pairs' global layers run as oneDNN GEMMs too (scores and softmax in bf16, as SDPA's
    bf16 kernel has them); their error against fp32 eager stays within the fused kernel's own."""
    name = "w30-every3-mean-thetas"
    checkpoint = checkpoint_dirs[name]
    engine = PackedModernBert.from_pretrained(str(checkpoint), dtype=torch.bfloat16)
    if not engine.gemm_attention:
        pytest.skip("this torch has no oneDNN bf16 linear: the fused kernel is the only CPU path")
    pairs = random_pairs([1500, 1100, 40], seed=12)
    calls = count_gemm_attention(engine)
    gemm = engine.forward_packed(*pack(pairs)).numpy()
    assert sorted(set(calls)) == [1100, 1500]
    engine.gemm_attention = False
    fused = engine.forward_packed(*pack(pairs)).numpy()
    expected = eager_logits(checkpoint, pairs)
    ours, theirs = np.abs(gemm - expected).max(), np.abs(fused - expected).max()
    assert ours <= max(2 * theirs, 0.002 * np.ptp(expected)), (ours, theirs, np.ptp(expected))


def test_cpu_fp32_linear_is_onednn_where_it_agrees_else_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, b = torch.randn(33, 48), torch.randn(20, 48), torch.randn(20)
    chosen = modernbert_packed._cpu_fp32_linear()
    torch.testing.assert_close(chosen(x, (w, b)), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)

    def broken(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(modernbert_packed, "_onednn_linear", broken)
    assert modernbert_packed._cpu_fp32_linear() is modernbert_packed._linear


MEMORY_PROBE = """
import json, resource, sys, psutil, torch
from rerank_triton_model.modernbert_packed import PackedModernBert, hold_freed_memory
torch.set_num_threads(2)
assert hold_freed_memory()  # as the served runners set glibc: what a long run frees is still given back
engine = PackedModernBert.from_pretrained(sys.argv[1])
ids = torch.randint(0, 50000, (8192,), generator=torch.Generator().manual_seed(0))
engine.forward_packed(ids[:300], torch.tensor([0, 300], dtype=torch.int32))  # warm the allocators
before = psutil.Process().memory_info().rss
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = {}
# One 8192-token pair, then two long pairs of unequal lengths (attended together, keys masked).
for name, cu in (("one", [0, 8192]), ("two", [0, 4000, 8192])):
    logits = engine.forward_packed(ids, torch.tensor(cu, dtype=torch.int32))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result[name] = {"growth": peak - max(before, peak_before), "logits": logits.tolist()}
engine.release_memory(8192)
result["after"] = psutil.Process().memory_info().rss - before
print(json.dumps(result))
"""


def test_a_long_pair_allocates_no_t_by_t_buffer(checkpoint_dirs: dict[str, Path]) -> None:
    """8192 tokens: one fp32 T x T score matrix over the heads would be 1 GiB (4000 + 4192 tokens:
    0.5 GiB); the engine's peak growth (own process, ru_maxrss) stays under an eighth of 1 GiB and
    is returned after the call."""
    name = "w16-every3-cls"
    tokens, heads = 8192, CONFIGS[name]["num_attention_heads"]
    t_by_t = tokens * tokens * heads * 4
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(checkpoint_dirs[name])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert np.isfinite(result["one"]["logits"]).all() and np.isfinite(result["two"]["logits"]).all()
    assert len(result["two"]["logits"]) == 2
    assert result["two"]["growth"] < t_by_t / 8, result  # the larger of both (ru_maxrss only grows)
    assert result["after"] < 32 * 2**20, result


FAULTS_PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "runner":
    from rerank_triton_model.torch_runner import _device
    _device("cpu", "fp32", 0)
def run():
    blocks = [np.ones(1 << 17) for _ in range(64)]  # 64 blocks of 1 MiB, as a run's activations
    del blocks
run()
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(modernbert_packed._glibc() is None, reason="glibc's malloc settings")
def test_a_cpu_runner_keeps_what_a_run_frees_for_the_next_run() -> None:
    """glibc's default thresholds hand a run's freed blocks back to the system, and the next run faults
    them in again; a CPU runner's process keeps them (each probe in a fresh process)."""

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    default, held = faults("default"), faults("runner")
    assert default > 5 * 64 * 2**20 // 4096 // 2, default  # at least half of every run's pages again
    assert held < default / 20, (held, default)


# -- attention backend selection and the CUDA path's glue (no GPU here: kernels stood in for) -----


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    select = select_attention_backend
    assert select(cpu, torch.float16, 64, varlen_window=True, flash_forward=True, flash_available=True) == BLOCKED
    assert select(cuda, torch.float32, 64, varlen_window=True, flash_forward=True, flash_available=True) == BLOCKED
    assert select(cuda, torch.bfloat16, 64, varlen_window=True, flash_forward=True, flash_available=True) == VARLEN_ATTN
    assert (
        select(cuda, torch.float16, 64, varlen_window=False, flash_forward=True, flash_available=True) == FLASH_FORWARD
    )
    assert select(cuda, torch.float16, 64, varlen_window=False, flash_forward=False, flash_available=True) == BLOCKED
    assert select(cuda, torch.float16, 64, varlen_window=True, flash_forward=True, flash_available=False) == BLOCKED
    assert select(cuda, torch.float16, 12, varlen_window=True, flash_forward=True, flash_available=True) == BLOCKED
    assert select(cuda, torch.float16, 512, varlen_window=True, flash_forward=True, flash_available=True) == BLOCKED
    # This torch (2.13) has both; 2.11 on the GPU host is checked by the same code at load time.
    assert modernbert_packed._varlen_attn_function() is not None
    assert modernbert_packed._flash_forward_has_window()

    # A varlen_attn without a window (as in torch releases before it took one) is not used.
    from torch.nn.attention import varlen

    def windowless(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, is_causal: bool = False) -> None:
        return None

    monkeypatch.setattr(varlen, "varlen_attn", windowless)
    assert modernbert_packed._varlen_attn_function() is None
    assert select(cuda, torch.float16, 64, flash_forward=True, flash_available=True) == FLASH_FORWARD


def test_flash_arguments_bind_to_the_real_ops_on_meta_tensors() -> None:
    q = torch.empty(100, 4, 16, dtype=torch.float16, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    args, kwargs = flash_forward_arguments(q, q, q, cu, 50, 0.25, 8)
    assert kwargs["window_size_left"] == kwargs["window_size_right"] == 8
    assert modernbert_packed._flash_attention_forward(*args, **kwargs).shape == q.shape
    assert flash_forward_arguments(q, q, q, cu, 50, 0.25, None)[1]["window_size_left"] == -1
    varlen_attn = modernbert_packed._varlen_attn_function()
    assert varlen_attn is not None
    assert varlen_attn(q, q, q, cu, cu, 50, 50, scale=0.25, window_size=(8, 8)).shape == q.shape


def dense_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    scale: float,
    window: tuple[int, int],
) -> torch.Tensor:
    """FlashAttention-2 varlen's semantics, densely: per segment, keys j with -left <= j - i <= right."""
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and q.dim() == 3
    assert cu.dtype == torch.int32 and max_len == int((cu[1:] - cu[:-1]).max())
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale
        pos = torch.arange(e - s)
        offset = pos[None, :] - pos[:, None]
        allowed = torch.ones_like(offset, dtype=torch.bool)
        if window[0] >= 0:
            allowed &= offset >= -window[0]
        if window[1] >= 0:
            allowed &= offset <= window[1]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v[s:e])
    return out


@pytest.mark.parametrize("backend", [VARLEN_ATTN, FLASH_FORWARD])
def test_cuda_path_glue_with_the_kernels_stood_in_for(
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    checkpoint_dirs: dict[str, Path],
    references: dict[str, tuple[list[torch.Tensor], np.ndarray]],
) -> None:
    """The flash paths' layouts, offsets and windows, end to end, with a dense stand-in for the kernel
    (fp32 on CPU). Not a GPU run: the kernels themselves are exercised only on a GPU host."""
    name = "w32-every2-mean"
    engine = PackedModernBert.from_pretrained(str(checkpoint_dirs[name]))
    windows: list[tuple[int, int]] = []

    def varlen(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        window_size: tuple[int, int],
    ) -> torch.Tensor:
        assert cu_q is cu_k and max_q == max_k
        windows.append(window_size)
        return dense_flash(q, k, v, cu_q, max_q, scale, window_size)

    def flash(*args: Any, **kwargs: Any) -> torch.Tensor:
        q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug = args
        assert cu_q is cu_k and max_q == max_k and dropout == 0.0 and not causal and not debug
        window = (kwargs["window_size_left"], kwargs["window_size_right"])
        windows.append(window)
        return dense_flash(q, k, v, cu_q, max_q, kwargs["scale"], window)

    engine.backend = backend
    stand_in: Callable[..., torch.Tensor] = varlen
    if backend == VARLEN_ATTN:
        engine.varlen_attn = stand_in
    else:
        monkeypatch.setattr(modernbert_packed, "_flash_attention_forward", flash)
    pairs, expected = references[name]
    logits = engine.forward_packed(*pack(pairs))
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=FP32_TOLERANCE)
    w = CONFIGS[name]["local_attention"] // 2
    assert windows == [(-1, -1) if i % 2 == 0 else (w, w) for i in range(CONFIGS[name]["num_hidden_layers"])]


# -- full-resolution logits in reduced precision -------------------------------------------------


@pytest.fixture(scope="module")
def candidates(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> CloseCandidates:
    return close_candidates(checkpoints["reranker_mean"], tmp_path_factory.mktemp("close") / "checkpoint")


# Every PyTorch runtime in every reduced precision it offers on a device: the GPU's fp16 too, computed by the
# same code on the CPU (torch has CPU fp16 kernels), so that its fp32 head is checked without a GPU.
REDUCED = [
    (served, precision)
    for served in RUNTIMES.values()
    if not served.graph
    for precision in sorted({*served.precisions[CPU], *served.precisions[GPU]} - {FP32})
]


@pytest.mark.e2e
@pytest.mark.parametrize(("served", "precision"), REDUCED, ids=lambda v: getattr(v, "name", v))
def test_reduced_precision_logits_are_as_distinct_as_fp32s(
    served: Runtime, precision: str, candidates: CloseCandidates
) -> None:
    """Close candidates (fp32 logits within about ±1, most of which bf16's resolution would merge): the
    engines compute the final norm, pooling and head in fp32 and return as many distinct logits."""
    ids, lengths = candidates.ragged()
    engine = served.build(
        str(candidates.checkpoint), device="cpu", precision=precision, pad_token_id=0, max_batch_tokens=4096
    )
    logits = engine.score(ids, lengths)
    assert distinct(logits) == distinct(candidates.expected) == len(candidates.documents)
    assert np.abs(logits - candidates.expected).max() < 0.05


def engine_tensors(engine: PackedModernBert) -> list[torch.Tensor]:
    found = [engine.embeddings, *engine.emb_norm, *engine.final_norm, *engine.head_dense, *engine.head_norm]
    found += [*engine.classifier, *(inv for inv, _ in engine.inv_freq.values())]
    for layer in engine.layers:
        for weights in (layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.wi, layer.mlp_wo):
            found += list(weights or ())
    return [t for t in found if t is not None]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_checkpoint_read_without_transformers_is_the_model_transformers_loads(
    name: str, checkpoint_dirs: dict[str, Path]
) -> None:
    # Stubs read config.json and model.safetensors themselves (no transformers model code to import); the
    # engine they build holds exactly the tensors and settings of one built from transformers' model.
    checkpoint = checkpoint_dirs[name]
    model = ModernBertForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()
    read = modernbert_packed.read_checkpoint(checkpoint)
    assert read is not None
    ours, theirs = PackedModernBert(read), PackedModernBert(model)
    assert (ours.pooling, ours.half_window, ours.eps) == (theirs.pooling, theirs.half_window, theirs.eps)
    assert [layer.half_window for layer in ours.layers] == [layer.half_window for layer in theirs.layers]
    assert [layer.attn_norm is None for layer in ours.layers] == [layer.attn_norm is None for layer in theirs.layers]
    pairs = engine_tensors(ours), engine_tensors(theirs)
    assert len(pairs[0]) == len(pairs[1])
    for mine, reference in zip(*pairs, strict=True):
        assert torch.equal(mine, reference)
    ids, cu = pack(random_pairs([5, 40, 3], seed=7))
    assert torch.equal(ours.forward_packed(ids, cu), theirs.forward_packed(ids, cu))


def test_checkpoints_only_transformers_can_read_are_left_to_it(
    checkpoint_dirs: dict[str, Path], tmp_path: Path
) -> None:
    source = checkpoint_dirs["w16-every3-cls"]

    def variant(name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((source / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
        return folder

    def scaled(config: dict[str, Any]) -> None:
        config["rope_parameters"]["full_attention"].update(rope_type="linear", factor=2.0)

    assert modernbert_packed.read_checkpoint(variant("scaled-rope", scaled)) is None
    assert modernbert_packed.read_checkpoint(variant("no-layer-types", lambda c: c.pop("layer_types"))) is None
    assert modernbert_packed.read_checkpoint(variant("another-model", lambda c: c.update(model_type="bert"))) is None
    # A tensor the forward does not use (say another head) means another model.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((source / "config.json").read_text())
    tensors = safetensors.torch.load_file(str(source / "model.safetensors"))
    safetensors.torch.save_file({**tensors, "decoder.weight": torch.zeros(2, 2)}, str(extra / "model.safetensors"))
    assert modernbert_packed.read_checkpoint(extra) is None
    # What is left to transformers still loads, and a scaled variant takes transformers' frequencies.
    engine = PackedModernBert.from_pretrained(str(variant("scaled-rope-load", scaled)))
    model = ModernBertForSequenceClassification.from_pretrained(tmp_path / "scaled-rope-load").eval()
    inv = model.model.rotary_emb.full_attention_inv_freq
    assert torch.equal(engine.inv_freq["full_attention"][0], inv.float())


def test_activations_outside_the_table_come_from_transformers() -> None:
    from transformers.activations import ACT2FN

    x = torch.linspace(-4, 4, 101)
    for name in ("gelu", "gelu_pytorch_tanh", "relu", "silu", "swish", "gelu_new"):
        assert torch.equal(modernbert_packed._activation(name)(x), ACT2FN[name](x)), name
