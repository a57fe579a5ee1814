"""bench.stub_profile: py-spy's raw samples of the Python-backend stub and the frontend as shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report
from bench.stub_profile import parse_raw, sampled, stub_shares, summarize

EXECUTE = "TritonPythonModel.execute (rerank_triton_model/model.py:217)"
SUB_BATCHES = f"{EXECUTE};PackedReranker.iter_sub_batches (rerank_triton_model/reranker_engine.py:271)"
ORT = "OnnxRunner.__call__ (rerank_triton_model/reranker_engine.py:165);Session.run (onnxruntime/capi/session.py:406)"
TORCH = "PackedTorchRunner.run_packed (rerank_triton_model/torch_runner.py:90)"
# As `py-spy record --format raw --idle` writes the stub: an idle sample's stack is empty.
STUB_RAW = f""" 20
{SUB_BATCHES};_linear (rerank_triton_model/modernbert_packed.py:222) 50
{SUB_BATCHES};{ORT} 15
{EXECUTE};{TORCH};PackedModernBert.forward_packed (rerank_triton_model/modernbert_packed.py:420) 5
{EXECUTE};concatenate (numpy/core/multiarray.py:153) 8
TritonPythonModel.execute (rerank_triton_model/model.py:237);split (numpy/lib/shape_base.py:866) 2
"""
LOOP = "<module> (rerank:6);run (asyncio/runners.py:190);BaseEventLoop._run_once (asyncio/base_events.py:1922)"
FRONTEND_RAW = f"""{LOOP};TritonBackend._infer (rerank_server/triton_backend.py:212) 3
Thread._bootstrap (threading.py:1002);PairTokenizer.encode (rerank_server/tokenization.py:320) 2
"""


def test_raw_lines_parse_into_frames_and_counts() -> None:
    stacks = parse_raw(STUB_RAW + "\nnot a sample line\n")
    assert stacks[0] == ([], 20)
    assert [count for _, count in stacks] == [20, 50, 15, 5, 8, 2]
    assert stacks[-1][0] == [
        "TritonPythonModel.execute (rerank_triton_model/model.py:237)",
        "split (numpy/lib/shape_base.py:866)",
    ]


def test_stub_samples_split_into_engine_execute_and_idle() -> None:
    shares, samples = stub_shares(STUB_RAW)
    assert samples == 100
    assert shares == pytest.approx({"engine": 0.70, "execute_other": 0.10, "idle": 0.20})
    assert stub_shares("") == ({"engine": 0.0, "execute_other": 0.0, "idle": 0.0}, 0)
    # The model's own code called from inside the engine (the cancellation check between sub-batches) is
    # the model's time, not the engine's.
    check = f"{SUB_BATCHES};execute.<locals>.active (rerank_triton_model/model.py:203);is_cancelled (<stub>:0) 4"
    assert stub_shares(check) == ({"engine": 0.0, "execute_other": 1.0, "idle": 0.0}, 4)


def test_summary_counts_the_frontends_samples_against_the_duration() -> None:
    summary = summarize(STUB_RAW, FRONTEND_RAW, duration_s=0.5, rate=100)
    assert summary["stub"] == pytest.approx({"engine": 0.70, "execute_other": 0.10, "idle": 0.20})
    assert summary["samples"] == 100 and summary["frontend_samples"] == 5
    assert summary["frontend_busy"] == pytest.approx(0.1)
    assert summarize("", "", duration_s=0.0)["frontend_busy"] == 0.0

    lines = report.served_profile(
        {
            "workloads": {"a16": {"title": "(a) fixed 8 x 512 tokens", "clients": 16}},
            "profile": {"served": {"served": {"a16": summary}}},
        }
    )
    assert "Where the served time goes" in "\n".join(lines)
    assert lines[-1] == (
        "- served (gRPC frontend + Triton), (a) fixed 8 x 512 tokens, concurrency 16: engine 70.0%, "
        "execute other 10.0%, idle 20.0%; frontend busy 10.0% (100 stub samples)"
    )
    assert report.served_profile({"profile": {}}) == []


def test_a_failed_sampling_is_reported_and_the_block_still_runs(tmp_path: Path) -> None:
    ran = False
    with sampled(2**22 + 12345, 2**22 + 12346, tmp_path / "gone") as sampling:  # no such processes
        ran = True
    assert ran and sampling.summary is None and sampling.error
