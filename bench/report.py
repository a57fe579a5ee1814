"""The benchmark's outputs: target ratios, a markdown results table, and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SYSTEM_LABELS = {
    "onnxruntime": "in-process ONNX Runtime (fp32)",
    "onnxruntime-int8": "in-process ONNX Runtime (int8)",
    "crossencoder": "sentence-transformers CrossEncoder",
    "served": "served (gRPC frontend + Triton)",
}


def find(
    measurements: list[dict[str, Any]], system: str, workload: str, concurrency: str = "low"
) -> dict[str, Any] | None:
    """The measurement of a system on a workload (a, b or c) at its lowest or highest concurrency."""
    found = [m for m in measurements if m["system"] == system and m["workload"] == workload]
    if not found:
        return None
    found.sort(key=lambda m: m["concurrency"])
    return {"low": found[0], "mid": found[len(found) // 2], "high": found[-1]}[concurrency]


def _ratio(
    name: str,
    numerator: dict[str, Any] | None,
    denominator: dict[str, Any] | None,
    key: str,
    target: float,
    note: str,
) -> dict[str, Any] | None:
    if numerator is None or denominator is None or not denominator[key]:
        return None
    value = numerator[key] / denominator[key]
    return {"name": name, "value": value, "target": target, "met": value >= target, "note": note}


def ratios(measurements: list[dict[str, Any]], agreement: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each as value / target / met; a ratio whose runs were skipped is left out."""
    ort_a = find(measurements, "onnxruntime", "a")
    ort_b = find(measurements, "onnxruntime", "b")
    served_a1 = find(measurements, "served", "a")
    served_a_mid = find(measurements, "served", "a", "mid")
    served_a_high = find(measurements, "served", "a", "high")
    mid = served_a_mid["concurrency"] if served_a_mid else "?"
    high = served_a_high["concurrency"] if served_a_high else "?"
    found = [
        _ratio(
            "served / in-process ORT, (a) concurrency 1",
            served_a1,
            ort_a,
            "pairs_per_s",
            0.95,
            "pairs/s",
        ),
        _ratio(
            f"served / in-process ORT, (a) concurrency {mid}",
            served_a_mid,
            ort_a,
            "pairs_per_s",
            0.95,
            "pairs/s (informative: no target in the issue)",
        ),
        _ratio(
            f"served / in-process ORT, (a) concurrency {high}",
            served_a_high,
            ort_a,
            "pairs_per_s",
            0.95,
            "pairs/s",
        ),
        _ratio(
            "served / CrossEncoder, (b)",
            find(measurements, "served", "b"),
            find(measurements, "crossencoder", "b"),
            "pairs_per_s",
            3.0,
            "pairs/s",
        ),
        _ratio(
            "in-process ORT / CrossEncoder, (b)",
            ort_b,
            find(measurements, "crossencoder", "b"),
            "pairs_per_s",
            3.0,
            "pairs/s (informative: the engine's own lead)",
        ),
        _ratio(
            "(c) concurrent clients / (a) served concurrency 1, per token",
            find(measurements, "served", "c"),
            served_a1,
            "tokens_per_s",
            0.9,
            "tokens/s",
        ),
        _ratio(
            "int8 / fp32 in-process ORT, (b)",
            find(measurements, "onnxruntime-int8", "b"),
            ort_b,
            "pairs_per_s",
            2.0,
            "pairs/s",
        ),
    ]
    out = [r for r in found if r is not None]
    int8 = agreement.get("int8_vs_fp32")
    if int8:
        out.append(
            {
                "name": "int8 vs fp32 top-10 overlap, (b)",
                "value": int8["top10_overlap"],
                "target": 0.9,
                "met": int8["top10_overlap"] >= 0.9,
                "note": "fraction of fp32's top 10 documents in int8's top 10",
            }
        )
        out.append(
            {
                "name": "int8 vs fp32 Spearman correlation, (b)",
                "value": int8["spearman"],
                "target": 0.98,
                "met": int8["spearman"] >= 0.98,
                "note": "rank correlation of the (b) scores",
            }
        )
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """The results table, the ratios, and the context a reader needs, ready to paste into the README."""
    machine = results["machine"]
    lines = [
        f"Run of {results['created'][:16].replace('T', ' ')} UTC, mode `{results['mode']}`, "
        f"model: {results['model']['description']}.",
        f"Machine: {machine['cpu']} ({machine['cores']} cores), {machine['memory_gib']:.0f} GiB; "
        f"CPU pressure (others' load) at start {_fmt(machine.get('cpu_pressure_start'))}%, "
        f"at end {_fmt(machine.get('cpu_pressure_end'))}% (PSI 'some' avg60).",
        "",
        "| system | workload | conc. | pairs | pairs/s | tokens/s | p50 ms | p99 ms | padded/real "
        "| frontend CPU share | frontend peak RSS MiB | Triton peak RSS MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in results["measurements"]:
        lines.append(
            "| "
            + " | ".join(
                [
                    SYSTEM_LABELS.get(m["system"], m["system"]),
                    m["workload_title"],
                    str(m["concurrency"]),
                    str(m["pairs"]),
                    _fmt(m["pairs_per_s"], 2),
                    _fmt(m["tokens_per_s"], 0),
                    _fmt(m["latency_ms"]["p50"], 0),
                    _fmt(m["latency_ms"]["p99"], 0),
                    _fmt(m.get("padding_waste"), 3),
                    "—" if m.get("frontend_cpu_share") is None else f"{100 * m['frontend_cpu_share']:.1f}%",
                    _fmt(m.get("frontend_peak_rss_mib"), 0),
                    _fmt(m.get("triton_peak_rss_mib"), 0),
                ]
            )
            + " |"
        )
    lines += ["", "| ratio | value | target | met |", "|---|--:|--:|:-:|"]
    for r in results["ratios"]:
        lines.append(f"| {r['name']} | {r['value']:.3f} | ≥ {r['target']} | {'yes' if r['met'] else '**no**'} |")
    int8 = results["agreement"].get("int8_vs_fp32")
    if int8:
        lines += [
            "",
            f"int8 vs fp32 on (b): top-10 overlap {int8['top10_overlap']:.2f}, Spearman {int8['spearman']:.4f}, "
            f"max |Δlogit| {int8['max_abs_diff']:.3f}, RMS Δ / std of fp32 logits {int8['noise_to_spread']:.3f} "
            f"(fp32 logits: std {int8['fp32_logit_std']:.2f} over the {int8['documents']} documents).",
        ]
    kernel = results.get("profile", {}).get("gemm")
    if kernel:
        lines += [
            "",
            f"One GEMM ({kernel['shape']}), one thread: fp32 {kernel['fp32_gflops']:.1f} GFLOP/s, "
            f"int8 (dynamic, {kernel['int8_op']}) {kernel['int8_gops']:.1f} GOP/s.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measurements = results["measurements"]
    labels = [f"{m['workload_title'].split(')')[0]}) c{m['concurrency']} · {m['system']}" for m in measurements]
    colors = {"onnxruntime": "#4c72b0", "onnxruntime-int8": "#8172b2", "crossencoder": "#c44e52", "served": "#55a868"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(measurements) + 2.0), sharey=True)
    positions = list(range(len(measurements)))[::-1]
    left.barh(positions, [m["tokens_per_s"] for m in measurements], color=[colors[m["system"]] for m in measurements])
    left.set_yticks(positions, labels, fontsize=8)
    left.set_xlabel("tokens/s (higher is better)")
    left.set_xlim(0, 1.3 * max(m["tokens_per_s"] for m in measurements))
    for pos, m in zip(positions, measurements, strict=True):
        left.text(m["tokens_per_s"], pos, f" {m['pairs_per_s']:.2f} pairs/s", va="center", fontsize=7)
    p50 = [m["latency_ms"]["p50"] / 1000 for m in measurements]
    p99 = [m["latency_ms"]["p99"] / 1000 for m in measurements]
    right.barh(positions, p99, color="#dddddd", label="p99")
    right.barh(positions, p50, color=[colors[m["system"]] for m in measurements], height=0.5, label="p50")
    right.set_xlabel("request latency, s (lower is better)")
    right.legend(loc="lower right", fontsize=8)
    machine = results["machine"]
    figure.suptitle(
        f"Reranking throughput, {results['model']['description']} — {machine['cpu']}, {machine['cores']} cores "
        f"({results['created'][:10]})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
