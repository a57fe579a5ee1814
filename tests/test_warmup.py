"""The export's warm-up: config.pbtxt's model_warmup follows the shapes the engine plans, Triton runs it through
the model before the model is ready, and it stays out of the traffic metrics."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from transformers import ModernBertConfig
from tritonclient.grpc import model_config_pb2

from rerank_client import RerankClient
from rerank_server.export.warmup import WARMUP_DIR, WarmupRequest, cheap_on_cpu, warmup_requests
from rerank_server.first_contact import DEMO_CONFIG
from rerank_server.testing import TINY_CONFIG, exported_parameters
from rerank_triton_model.contract import INPUT_IDS, SEQUENCE_LENGTHS, ModelParameters
from tests.conftest import provenance, run_rerank, start_local, stop_serve_later
from tests.test_operations import sample, scrape
from tests.texts import QUERY, text

pytestmark = pytest.mark.e2e


def model_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """config.pbtxt as Triton parses it (an unknown or malformed field raises)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def logged(log: Path, marker: str, timeout_s: float = 10) -> str:
    """The one line of the log holding marker (the stub's log lines may trail the model's readiness)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [line for line in log.read_text(errors="replace").splitlines() if marker in line]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.2)


def planned_on_cpu(model_dir: Path) -> list[WarmupRequest]:
    """The warm-up a CPU export of this model plans: the budget request where cheap_on_cpu says so."""
    parameters = exported_parameters(model_dir)
    checkpoint = ModernBertConfig(**provenance(model_dir)["config"])
    return warmup_requests(parameters, on_gpu=False, budget=cheap_on_cpu(checkpoint, parameters))


def test_the_budget_request_runs_on_cpus_for_small_models_only() -> None:
    parameters = ModelParameters(
        source_model="m", precision="fp32", max_length=8192, vocab_size=50368, pad_token_id=0, max_batch_tokens=8192,
    )  # fmt: skip
    assert cheap_on_cpu(ModernBertConfig(**TINY_CONFIG), parameters)
    assert cheap_on_cpu(ModernBertConfig(**DEMO_CONFIG), parameters)
    assert not cheap_on_cpu(ModernBertConfig(), parameters)  # ModernBERT-base: seconds of start-up on a CPU
    # On CPUs its pairs are the widest the main engine runs (dense attention's largest buffers), on GPUs (a)'s.
    (cpu_budget, *_) = warmup_requests(parameters, on_gpu=False, budget=True)
    assert set(cpu_budget.lengths) == {1024} and cpu_budget.tokens == 8192
    assert [r.name for r in warmup_requests(parameters, on_gpu=False)] == ["mixed"]


def test_the_export_writes_a_warmup_of_the_planned_shapes(model_repository: Path) -> None:
    for name, routed in (("reranker", False), ("reranker_long", True)):
        model_dir = model_repository / name
        parameters = exported_parameters(model_dir)
        assert (parameters.long_pair_tokens > 0) == routed
        config = model_config(model_dir)
        planned = planned_on_cpu(model_dir)
        assert [s.name for s in config.model_warmup] == [r.name for r in planned]
        # The tests' tiny model is cheap enough to fill the token budget once on a CPU.
        assert [r.name for r in planned] == ["budget", "mixed", "long"][: 3 if routed else 2]
        for warmup, request in zip(config.model_warmup, planned, strict=True):
            assert warmup.batch_size == 1 and warmup.count == 1
            ids_input, lengths_input = warmup.inputs[INPUT_IDS], warmup.inputs[SEQUENCE_LENGTHS]
            ids = np.fromfile(model_dir / WARMUP_DIR / ids_input.input_data_file, dtype="<i4")
            lengths = np.fromfile(model_dir / WARMUP_DIR / lengths_input.input_data_file, dtype="<i4")
            assert list(ids_input.dims) == [ids.size] and list(lengths_input.dims) == [lengths.size]
            assert tuple(lengths) == request.lengths and int(lengths.sum()) == ids.size
            assert ids.min() >= 0 and ids.max() < parameters.vocab_size
            assert lengths.min() >= 1 and lengths.max() <= parameters.max_length
        mixed = planned[1].lengths
        # Widths from 16 tokens up to the longest pair the main engine runs (here under the 1024-token cap).
        main_longest = min(parameters.max_length, parameters.long_pair_tokens or parameters.max_length)
        assert mixed[0] == 16 and max(mixed) == min(main_longest, 1024) and list(mixed) == sorted(set(mixed))
        if routed:  # just over the threshold: the packed engine's first run
            assert planned[2].lengths == (parameters.long_pair_tokens + 1,)
        # On a GPU, first one sub-batch at the token budget: the largest activations a call allocates.
        budget, *rest = warmup_requests(parameters, on_gpu=True)
        assert budget.name == "budget" and rest == planned[1:]
        width = budget.lengths[0]
        assert sum(budget.lengths) <= parameters.max_batch_tokens < sum(budget.lengths) + width
        assert set(budget.lengths) == {width}


def test_a_gpu_export_warms_up_at_the_token_budget(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    done = run_rerank("export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path), "--device", "gpu")
    assert done.returncode == 0, done.stderr
    config = model_config(tmp_path / "reranker")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [s.name for s in config.model_warmup] == ["budget", "mixed"]


def test_no_warmup_exports_none(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    done = run_rerank(
        "export", "--model", str(checkpoints["reranker"]), "--output", str(tmp_path), "--precision", "fp32",
        "--no-warmup",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(model_config(tmp_path / "reranker").model_warmup) == 0
    assert not (tmp_path / "reranker" / WARMUP_DIR).exists()


def test_serving_means_warm_and_the_warmup_is_not_traffic(model_repository: Path, tmp_path: Path) -> None:
    """A fresh `rerank serve`: Triton ran every warm-up request through the model before SERVING (its log says
    so), the model's traffic counters are still zero, and the first call is answered and counted."""
    repository = tmp_path / "repository"
    shutil.copytree(model_repository / "reranker_long", repository / "reranker_long")
    triton_log = tmp_path / "triton.log"
    served = start_local(repository, "--model-name=reranker_long", f"--triton-log={triton_log}")
    try:
        planned = planned_on_cpu(repository / "reranker_long")
        pairs = sum(len(r.lengths) for r in planned)
        tokens = sum(r.tokens for r in planned)
        warmed = logged(triton_log, "warmed up before ready")
        assert f"{len(planned)} requests, {pairs} pairs, {tokens} tokens in" in warmed, warmed
        metrics_url = served.triton_metrics_url
        before = scrape(metrics_url)
        for outcome in ("computed", "dropped"):
            assert sample(before, "rerank_model_pairs_total", model="reranker_long", outcome=outcome) == 0
        assert sample(before, "rerank_model_long_pairs_total", model="reranker_long") == 0
        documents = [text(12), text(40), text(1500)]  # the last over the long-pair threshold
        with RerankClient(served.target, timeout=120) as client:
            answer = client.rerank(QUERY, documents)
        assert sorted(r.index for r in answer.results) == [0, 1, 2]
        after = scrape(metrics_url)
        assert sample(after, "rerank_model_pairs_total", model="reranker_long", outcome="computed") == 3
        assert sample(after, "rerank_model_long_pairs_total", model="reranker_long") == 1
    finally:
        stop_serve_later(served)
