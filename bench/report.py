"""The benchmark's outputs: target ratios, a markdown results table, and a PNG plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerank_server.export.agreement import (
    INT8_SPEARMAN_BOUND,
    INT8_TOP10_OVERLAP_BOUND,
    SPEARMAN_BOUND,
    TOP10_OVERLAP_BOUND,
)

SYSTEM_LABELS = {
    "onnxruntime": "in-process ONNX Runtime (fp32)",
    "onnxruntime-int8": "in-process ONNX Runtime (int8)",
    "torch": "in-process PyTorch, padded (fp32)",
    "torch-bf16": "in-process PyTorch, padded (bf16)",
    "packed": "in-process packed engine (fp32)",
    "packed-bf16": "in-process packed engine (bf16)",
    "crossencoder": "sentence-transformers CrossEncoder",
    "served": "served (gRPC frontend + Triton)",
    "served-auto": "served, --precision auto",
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


@dataclass(frozen=True)
class Ratio:
    """A throughput target: numerator / denominator >= target, each side a (system, workload, level)
    measurement (see find). In `label`, {concurrency} is the numerator's; {auto} and {same} (system
    "{same}" too) name the served auto model's choice and its in-process system."""

    label: str
    numerator: tuple[str, str, str]
    denominator: tuple[str, str, str]
    target: float
    note: str = "pairs/s"
    key: str = "pairs_per_s"


ORT_A, ORT_B = ("onnxruntime", "a", "low"), ("onnxruntime", "b", "low")
SERVED_A = ("served", "a", "low")
RATIOS = (
    Ratio("served / in-process ORT, (a) concurrency 1", SERVED_A, ORT_A, 0.95),
    Ratio(
        "served / in-process ORT, (a) concurrency {concurrency}",
        ("served", "a", "mid"),
        ORT_A,
        0.95,
        "pairs/s (informative: no target of its own)",
    ),
    Ratio("served / in-process ORT, (a) concurrency {concurrency}", ("served", "a", "high"), ORT_A, 0.95),
    Ratio("served / CrossEncoder, (b)", ("served", "b", "low"), ("crossencoder", "b", "low"), 3.0),
    Ratio(
        "in-process ORT / CrossEncoder, (b)",
        ORT_B,
        ("crossencoder", "b", "low"),
        3.0,
        "pairs/s (informative: the engine's own lead)",
    ),
    Ratio(
        "(c) concurrent clients / (a) served concurrency 1, per token",
        ("served", "c", "low"),
        SERVED_A,
        0.9,
        "tokens/s",
        "tokens_per_s",
    ),
    Ratio("int8 / fp32 in-process ORT, (b)", ("onnxruntime-int8", "b", "low"), ORT_B, 2.0),
)
# `--precision auto` served against served fp32 (what choosing buys), and against the same precision
# in-process (what serving it costs).
AUTO_RATIOS = (
    Ratio("served auto ({auto}) / served fp32, (a) concurrency 1", ("served-auto", "a", "low"), SERVED_A, 1.7),
    Ratio("served auto ({auto}) / served fp32, (b)", ("served-auto", "b", "low"), ("served", "b", "low"), 1.7),
    Ratio(
        "served auto / in-process {same}, (a) concurrency {concurrency}",
        ("served-auto", "a", "low"),
        ("{same}", "a", "low"),
        0.95,
    ),
    Ratio(
        "served auto / in-process {same}, (a) concurrency {concurrency}",
        ("served-auto", "a", "high"),
        ("{same}", "a", "low"),
        0.95,
    ),
    Ratio("served auto / in-process {same}, (c)", ("served-auto", "c", "low"), ("{same}", "c", "low"), 0.95),
)
# Agreement targets: (label, agreement entry, its measure, target, note); {precision} is the entry's. The auto
# choice is held to the bounds the export chose it by; int8 (a precision users pick explicitly) to looser ones.
AGREEMENTS = (
    (
        "served auto ({precision}) vs fp32 top-10 overlap, (b)",
        "served-auto_vs_fp32",
        "top10_overlap",
        TOP10_OVERLAP_BOUND,
        "fraction of fp32's top 10 documents in the served auto model's top 10",
    ),
    (
        "served auto ({precision}) vs fp32 Spearman correlation, (b)",
        "served-auto_vs_fp32",
        "spearman",
        SPEARMAN_BOUND,
        "rank correlation of the (b) scores",
    ),
    (
        "int8 vs fp32 top-10 overlap, (b)",
        "int8_vs_fp32",
        "top10_overlap",
        INT8_TOP10_OVERLAP_BOUND,
        "fraction of fp32's top 10 documents in int8's top 10",
    ),
    (
        "int8 vs fp32 Spearman correlation, (b)",
        "int8_vs_fp32",
        "spearman",
        INT8_SPEARMAN_BOUND,
        "rank correlation of the (b) scores",
    ),
)


def _ratio(measurements: list[dict[str, Any]], ratio: Ratio, names: dict[str, str]) -> dict[str, Any] | None:
    """One Ratio's row, or None when either side was not measured (its runs were skipped)."""

    def side(system: str, workload: str, level: str) -> dict[str, Any] | None:
        return find(measurements, system.format(**names), workload, level)

    numerator, denominator = side(*ratio.numerator), side(*ratio.denominator)
    if numerator is None or denominator is None or not denominator[ratio.key]:
        return None
    value = numerator[ratio.key] / denominator[ratio.key]
    name = ratio.label.format(concurrency=numerator["concurrency"], **names)
    return {"name": name, "value": value, "target": ratio.target, "met": value >= ratio.target, "note": ratio.note}


def ratios(
    measurements: list[dict[str, Any]], agreement: dict[str, Any], auto: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The targets, each as value / target / met; a ratio whose runs were skipped is left out."""
    found = [_ratio(measurements, r, {}) for r in RATIOS]
    if auto is not None:
        names = {"auto": f"{auto['precision']}, {auto['runtime']}", "same": auto["system"]}
        found += [_ratio(measurements, r, names) for r in AUTO_RATIOS]
    out = [r for r in found if r is not None]
    for label, entry, measure, target, note in AGREEMENTS:
        compared = agreement.get(entry)
        if compared:
            value = compared[measure]
            out.append(
                {
                    "name": label.format(**compared),
                    "value": value,
                    "target": target,
                    "met": value >= target,
                    "note": note,
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
        f"CPU flags: {', '.join(machine.get('cpu_flags', [])) or 'none of note'}; native precisions: "
        f"{', '.join(machine.get('native_precisions', ['fp32']))}.",
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
    auto = results["model"].get("auto")
    if auto:
        lines += ["", f"`--precision auto` chose {auto['precision']} ({auto['runtime']}): {auto['reason']}."]
    compared = [(k[: -len("_vs_fp32")], v) for k, v in results["agreement"].items() if k.endswith("_vs_fp32")]
    compared = [(k, v) for k, v in compared if k != "int8"]
    if compared:
        lines += [
            "",
            "| against in-process ONNX Runtime fp32 on (b) | top-10 overlap | Spearman | max \\|Δlogit\\| |",
            "|---|--:|--:|--:|",
        ]
        for system, a in compared:
            label = SYSTEM_LABELS.get(system, system) + (f" ({a['precision']})" if "precision" in a else "")
            lines.append(f"| {label} | {a['top10_overlap']:.2f} | {a['spearman']:.4f} | {a['max_abs_diff']:.4f} |")
    int8 = results["agreement"].get("int8_vs_fp32")
    if int8:
        lines += [
            "",
            f"int8 vs fp32 on (b): top-10 overlap {int8['top10_overlap']:.2f}, Spearman {int8['spearman']:.4f}, "
            f"max |Δlogit| {int8['max_abs_diff']:.3f}, RMS Δ / std of fp32 logits {int8['noise_to_spread']:.3f} "
            f"(fp32 logits: std {int8['reference_std']:.2f} over the {int8['documents']} documents).",
        ]
    kernel = results.get("profile", {}).get("gemm")
    if kernel:
        lines += [
            "",
            f"One GEMM ({kernel['shape']}), one thread: fp32 {kernel['fp32_gflops']:.1f} GFLOP/s, "
            f"int8 (dynamic, {kernel['int8_op']}) {kernel['int8_gops']:.1f} GOP/s.",
        ]
    return "\n".join(lines + served_path_share(results) + served_profile(results)) + "\n"


def model_share(measurement: dict[str, Any]) -> float | None:
    """Of a served run at concurrency 1, the share of its wall time that Triton's model executions took; None
    for other runs. Triton gives each request of an execution the execution's whole compute time, so the sum
    over requests is divided by the requests per execution (one call's, at concurrency 1)."""
    triton = measurement.get("triton") or {}
    if not measurement["system"].startswith("served") or measurement["concurrency"] != 1:
        return None
    if not triton.get("requests_per_execution") or not measurement.get("wall_s"):
        return None
    return float(triton["compute_s"] / triton["requests_per_execution"] / measurement["wall_s"])


def served_path_share(results: dict[str, Any]) -> list[str]:
    """The served runs at concurrency 1: how much of the caller's wall time the model's executions took in
    Triton, and so how much the served path (client, frontend, gRPC, Triton's queue) added around them."""
    shares = [(m, share) for m in results["measurements"] if (share := model_share(m)) is not None]
    if not shares:
        return []
    lines = [
        "",
        "Served calls one at a time: the share of the wall time that the model's executions took in Triton "
        "(nv_inference_compute_infer_duration_us, per execution); the rest is the served path around them:",
        "",
    ]
    for m, share in shares:
        lines.append(
            f"- {SYSTEM_LABELS.get(m['system'], m['system'])}, {m['workload_title']}: model {100 * share:.1f}%, "
            f"served path {100 * (1 - share):.1f}%"
        )
    return lines


def served_profile(results: dict[str, Any]) -> list[str]:
    """The "Where the served time goes" lines: per served system and sampled workload, the shares of the
    Python-backend stub's py-spy samples (engine forward, the rest of execute, idle) and the frontend's busy share."""
    served = results.get("profile", {}).get("served", {})
    if not served:
        return []
    lines = [
        "",
        "Where the served time goes (py-spy samples of Triton's Python-backend stub: engine forward, the rest "
        "of the model's execute, idle waiting for work; frontend busy: its busy Python samples against wall time):",
        "",
    ]
    for system, by_workload in served.items():
        for name, p in by_workload.items():
            workload = results.get("workloads", {}).get(name, {})
            title = f"{workload.get('title', name)}, concurrency {workload.get('clients', '?')}"
            stub = p["stub"]
            lines.append(
                f"- {SYSTEM_LABELS.get(system, system)}, {title}: engine {100 * stub['engine']:.1f}%, "
                f"execute other {100 * stub['execute_other']:.1f}%, idle {100 * stub['idle']:.1f}%; "
                f"frontend busy {100 * p['frontend_busy']:.1f}% ({p['samples']} stub samples)"
            )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measurements = results["measurements"]
    labels = [f"{m['workload_title'].split(')')[0]}) c{m['concurrency']} · {m['system']}" for m in measurements]
    colors = {
        "onnxruntime": "#4c72b0",
        "onnxruntime-int8": "#8172b2",
        "torch": "#937860",
        "torch-bf16": "#da8bc3",
        "packed": "#8c8c8c",
        "packed-bf16": "#ccb974",
        "crossencoder": "#c44e52",
        "served": "#55a868",
        "served-auto": "#64b5cd",
    }
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(measurements) + 2.0), sharey=True)
    positions = list(range(len(measurements)))[::-1]
    left.barh(
        positions,
        [m["tokens_per_s"] for m in measurements],
        color=[colors.get(m["system"], "#999999") for m in measurements],
    )
    left.set_yticks(positions, labels, fontsize=8)
    left.set_xlabel("tokens/s (higher is better)")
    left.set_xlim(0, 1.3 * max(m["tokens_per_s"] for m in measurements))
    for pos, m in zip(positions, measurements, strict=True):
        left.text(m["tokens_per_s"], pos, f" {m['pairs_per_s']:.2f} pairs/s", va="center", fontsize=7)
    p50 = [m["latency_ms"]["p50"] / 1000 for m in measurements]
    p99 = [m["latency_ms"]["p99"] / 1000 for m in measurements]
    right.barh(positions, p99, color="#dddddd", label="p99")
    right.barh(
        positions, p50, color=[colors.get(m["system"], "#999999") for m in measurements], height=0.5, label="p50"
    )
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
