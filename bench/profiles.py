"""Where the CPU time goes: ONNX Runtime's per-operator profile of the exported graph, and one
encoder-sized GEMM in fp32 against the int8 export's kernels."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def gemm_check(workdir: Path) -> dict[str, Any]:
    """One encoder-sized MatMul (1024 x 768 @ 768 x 2304), one thread: fp32 vs the int8 export's kernels."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rerank_server.export.weights import quantize_int8

    m, k, n = 1024, 768, 2304
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="/layers.0/gemm/MatMul")],  # quantize_int8 wants layers
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), "W")],
    )
    fp32_path, int8_path = workdir / "gemm.onnx", workdir / "gemm-int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(fp32_path))
    quantize_int8(fp32_path, int8_path)
    a = rng.standard_normal((m, k)).astype(np.float32)
    rates = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, {"A": a})
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            session.run(None, {"A": a})
            times.append(time.perf_counter() - t0)
        rates[name] = 2 * m * k * n / min(times) / 1e9
    int8_ops = [node.op_type for node in onnx.load(str(int8_path)).graph.node]
    return {
        "shape": f"{m}x{k} @ {k}x{n}",
        "fp32_gflops": rates["fp32"],
        "int8_gops": rates["int8"],
        "int8_op": "+".join(sorted(set(int8_ops) - {"Mul", "Cast"})),
    }


def op_profile(onnx_path: Path, ids: np.ndarray, threads: int, workdir: Path) -> dict[str, Any]:
    """ONNX Runtime's own profiler on one padded batch: time per operator type, largest first."""
    import onnxruntime as ort

    from rerank_triton_model.reranker_engine import session_options

    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile-{onnx_path.parent.parent.parent.name}")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # the first run allocates; the second is the one read
    t0 = time.perf_counter()
    session.run(None, feeds)
    run_s = time.perf_counter() - t0
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]["ts"]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e6
    total = sum(by_op.values())
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "batch": list(ids.shape),
        "run_s": run_s,
        "by_op": [{"op": op, "seconds": s, "share": s / total} for op, s in ranked[:10]],
    }
