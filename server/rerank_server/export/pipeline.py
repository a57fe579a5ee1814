"""The export from options to a written model folder: what to write (Plan), writing and verifying the
weights, the auto choice, and the long-pair routing."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rerank_server.export.options import AUTO, INT8, ExportError, ExportOptions, checked_precision
from rerank_server.export.source import Progress, Source, Steps, load_config, load_source, longest_pair
from rerank_server.export.write import LongPairs, Variant, write_model
from rerank_triton_model.cpu_features import BF16_FLAGS, INT8_FLAGS, cpu_flags, resolve_precision
from rerank_triton_model.runtimes import CPU, FP32, LONG_PAIR_TOKENS, ONNXRUNTIME, PACKED, Runtime, long_pairs

INT8_GRAPH = "model.int8.onnx"  # while exporting; renamed to the served name when int8 is chosen
FP32_GRAPH_BESIDE_INT8 = "model.fp32.onnx"


@dataclass(frozen=True)
class Plan:
    """What an export writes, verifies and measures, known before the checkpoint loads."""

    options: ExportOptions
    precision: str  # auto, or the fixed one
    flags: frozenset[str]
    candidates: list[tuple[Runtime, str]]  # what may be served; auto measures them
    routing: bool  # CPU: pairs over a threshold may go to the packed engine (a dense runtime may serve)
    measure_threshold: bool  # auto: the threshold is measured, not given

    @classmethod
    def make(cls, options: ExportOptions, precision: str, flags: frozenset[str], config: Any) -> Plan:
        from rerank_server.export import auto

        if options.device != CPU:
            candidates = [(options.resolved_runtime, precision)]
        elif precision == AUTO:
            candidates = auto.candidates(flags)
        else:
            candidates = [(options.resolved_runtime, precision)]
        dense = any(not r.packed for r, _ in candidates) or any(p != FP32 for _, p in candidates)
        measured = precision == AUTO and options.long_pair_tokens is None
        lowest = auto.LADDER[0] if measured else options.long_pair_tokens or LONG_PAIR_TOKENS
        routing = (
            options.device == CPU
            and options.long_pair_tokens != 0
            and dense
            and lowest < longest_pair(config, options.max_length)
        )
        return cls(options, precision, flags, candidates, routing, measured and routing)

    @property
    def fallback(self) -> bool:
        """A CPU model in a reduced precision holds ONNX Runtime fp32 for CPUs that lack it natively."""
        return self.options.device == CPU and any(p != FP32 for _, p in self.candidates)

    @property
    def graph(self) -> bool:
        return self.fallback or any(r.graph for r, _ in self.candidates)

    @property
    def int8(self) -> bool:
        return any(p == INT8 for _, p in self.candidates)

    @property
    def fp16_graph(self) -> bool:
        return any(r.graph and p == "fp16" for r, p in self.candidates)

    @property
    def checkpoint(self) -> bool:
        return self.routing or any(not r.graph for r, _ in self.candidates)

    @property
    def measuring(self) -> bool:
        return len(self.candidates) > 1 or self.measure_threshold

    @property
    def ranks_checked(self) -> bool:
        """A fixed reduced precision on the CPU is checked for ranking like fp32 (auto checks its candidates)."""
        return self.options.device == CPU and not self.measuring and self.candidates[0][1] != FP32

    @property
    def steps(self) -> int:
        """Check, load, verify, write, and what this export adds."""
        return 4 + self.graph + self.fp16_graph + self.int8 + self.checkpoint + self.measuring + self.ranks_checked


def export(options: ExportOptions, progress: Progress = print) -> Path:
    """Export the checkpoint into options.output/options.name; returns that folder."""
    precision = checked_precision(options)
    destination = options.output / options.name
    if destination.exists() and not options.overwrite:
        raise ExportError(f"{destination} exists; pass --overwrite to replace it")
    flags = cpu_flags()
    config = load_config(options)
    plan = Plan.make(options, precision, flags, config)
    steps = Steps(plan.steps, progress)
    source = load_source(options, config, steps)
    staging = options.output / f".{options.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / "1"
    version_dir.mkdir(parents=True)
    try:
        variant, long = _export_weights(source, plan, version_dir, steps)
        with steps.step("Writing the Triton model"):
            parameters = write_model(source, options, variant, long, flags, staging)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    routed = f", pairs over {parameters.long_pair_tokens} tokens packed" if parameters.long_pair_tokens else ""
    progress(
        f"Exported {options.model} to {destination} ({parameters.runtime}, {parameters.precision}, "
        f"max_length {parameters.max_length}{routed})"
    )
    progress(f"Precision {parameters.precision}: {parameters.precision_reason}")
    return destination


def _export_weights(source: Source, plan: Plan, version_dir: Path, steps: Steps) -> tuple[Variant, LongPairs | None]:
    """Write what the plan needs, verify every runtime that may serve it, choose (auto), and leave the chosen
    weights, the fp32 fallback and the long-pair checkpoint in the version folder."""
    from rerank_server.export import weights as written
    from rerank_server.export.verify import eager_reference, ranking, verify

    options, model = plan.options, source.model
    graph, int8_graph, checkpoint = version_dir / ONNXRUNTIME.weights, version_dir / INT8_GRAPH, version_dir / "model"
    if plan.graph:
        with steps.step(f"Exporting to ONNX (opset {options.opset})"):
            written.export_onnx(model, source.config, graph, options.opset, source.max_length)
    if plan.fp16_graph:
        with steps.step("Converting the graph to fp16 (the final norm, pooling and head stay fp32)"):
            written.convert_fp16(graph)
    quantization = None
    if plan.int8:
        with steps.step("Quantizing to int8 (dynamic)"):
            quantization = written.quantize_int8(graph, int8_graph)
    if plan.checkpoint:
        with steps.step("Saving the fp32 checkpoint (PyTorch runtimes cast it at load)"):
            written.save_checkpoint(model, checkpoint)

    def weights_of(runtime: Runtime, precision: str) -> Path:
        return int8_graph if precision == INT8 else graph if runtime.graph else checkpoint

    checked = {f"{r.name}-{p}": (r, p) for r, p in plan.candidates}
    if plan.fallback:
        checked.setdefault(f"{ONNXRUNTIME.name}-{FP32}", (ONNXRUNTIME, FP32))
    if plan.routing:
        for runtime, precision in [*plan.candidates, (ONNXRUNTIME, FP32)]:
            long = long_pairs(runtime, precision, CPU)
            if long is not None and (runtime, precision) in checked.values():
                checked.setdefault(f"{PACKED.name}-{long}", (PACKED, long))
    with steps.step(f"Verifying {', '.join(checked)} against transformers eager"):
        reference = eager_reference(source)
        verification: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        for key, (runtime, precision) in checked.items():
            try:
                verification[key] = verify(
                    runtime, weights_of(runtime, precision), precision, options.device, source, reference
                )
            except ExportError as error:
                # auto: a reduced precision too coarse for this checkpoint's activations is left out, not
                # fatal (an explicit --precision, or fp32, is).
                if plan.precision != AUTO or precision == FP32:
                    raise
                failed[key] = str(error)
                verification[key] = {"verified": False, "reason": str(error)}
    if failed:
        plan = _without_failed(plan, failed, steps)

    selection = None
    threshold = options.long_pair_tokens if options.long_pair_tokens is not None else LONG_PAIR_TOKENS
    if plan.measuring:
        title = f"{len(plan.candidates)} candidates" if len(plan.candidates) > 1 else "the long-pair threshold"
        if len(plan.candidates) > 1 and plan.measure_threshold:
            title += " and the long-pair threshold"
        with steps.step(f"Measuring {title} on this CPU"):
            selection = _choose(source, plan, weights_of, threshold)
        runtime, chosen = plan.candidates[selection.pop("index")]
        reason = selection["reason"]
        if selection["threshold"] is not None:
            threshold = selection["threshold"]["tokens"]
    else:
        runtime, chosen = plan.candidates[0]
        reason = "auto: fp32, the only candidate that verified" if failed else _fixed_reason(plan, chosen)
    if failed:
        reason += f"; left out, too far from eager on this checkpoint: {', '.join(failed)}"
    if plan.ranks_checked:
        with steps.step(f"Checking that {chosen} ranks like fp32"):
            budget = options.batch_tokens(source.max_length)
            ranks = ranking(runtime, weights_of(runtime, chosen), chosen, source, budget)
        verification[f"{runtime.name}-{chosen}"]["ranking"] = ranks
        if not ranks["agrees"]:
            # An explicit choice is kept, but said plainly: the export log, export.json and GetModelInfo.
            unlike = (
                f"ranks unlike fp32 on {ranks['documents']} sample documents (top-10 overlap "
                f"{ranks['top10_overlap']:.2f}, Spearman {ranks['spearman']:.4f}): serve --precision fp32 "
                "where ranking matters"
            )
            reason += f"; {unlike}"
            steps.progress(f"Warning: {chosen} {unlike}")

    if chosen == INT8:
        graph.rename(version_dir / FP32_GRAPH_BESIDE_INT8)
        int8_graph.rename(graph)
        served, fp32_weights = graph.name, FP32_GRAPH_BESIDE_INT8
    else:
        served = weights_of(runtime, chosen).name
        fp32_weights = graph.name if plan.fallback else served if chosen == FP32 else ""
    int8_graph.unlink(missing_ok=True)
    fp32_runtime = ONNXRUNTIME.name if plan.fallback else runtime.name if chosen == FP32 else ""
    routed = plan.routing and 0 < threshold < source.max_length
    if runtime.graph and not routed:
        shutil.rmtree(checkpoint, ignore_errors=True)
    long_pairs_written = None
    if routed:
        # The long engine of the served choice; the fp32 fallback's where the choice is the packed engine.
        long_precision = long_pairs(runtime, chosen, CPU)
        measured = selection is not None and selection["threshold"] is not None
        how = "measured" if measured else "given" if options.long_pair_tokens else "default"
        long_pairs_written = LongPairs(
            threshold,
            checkpoint.name,
            {
                "threshold": how,
                "precision": long_precision,
                "verification": verification[f"{PACKED.name}-{long_precision or FP32}"],
            },
        )
    variant = Variant(
        precision=chosen,
        runtime=runtime.name,
        weights=served,
        fp32_runtime=fp32_runtime,
        fp32_weights=fp32_weights,
        reason=reason,
        verification={**verification[f"{runtime.name}-{chosen}"], "variants": verification},
        quantization=quantization if chosen == INT8 else None,
        selection=selection,
    )
    return variant, long_pairs_written


def _without_failed(plan: Plan, failed: dict[str, str], steps: Steps) -> Plan:
    """auto's candidates less those that failed verification, or whose long-pair engine did."""

    def verified(runtime: Runtime, precision: str) -> bool:
        long = long_pairs(runtime, precision, CPU) if plan.routing else None
        keys = [f"{runtime.name}-{precision}", *([f"{PACKED.name}-{long}"] if long is not None else [])]
        return not any(key in failed for key in keys)

    for key, why in failed.items():
        steps.progress(f"Leaving {key} out of the choice: {why}")
    return replace(plan, candidates=[candidate for candidate in plan.candidates if verified(*candidate)])


def _fixed_reason(plan: Plan, precision: str) -> str:
    options = plan.options
    if precision == AUTO:
        raise AssertionError("auto is measured")
    if plan.precision != AUTO:
        reason = (
            f"--precision {precision}" if options.precision or options.quantize else f"the default on {options.device}"
        )
        if options.device == CPU:
            served, why = resolve_precision(precision, plan.flags)
            if served != precision:
                reason += f" (on this CPU it would load as {served}: {why})"
        return reason
    lacking = ", ".join((*BF16_FLAGS, *INT8_FLAGS))
    return f"auto: fp32, the only native precision here (the CPU has none of {lacking})"


def _choose(source: Source, plan: Plan, weights_of: Any, threshold: int) -> dict[str, Any]:
    """auto.py's measurements on engines built as the served model builds them."""
    from rerank_server.export import auto
    from rerank_triton_model.reranker_engine import RoutedReranker

    options = plan.options
    budget = options.batch_tokens(source.max_length)

    def build(runtime: Runtime, precision: str) -> Any:
        return runtime.build(
            str(weights_of(runtime, precision)),
            device=CPU,
            precision=precision,
            pad_token_id=source.pad_token_id,
            max_batch_tokens=budget,
            intra_op_threads=options.intra_op_threads,
        )

    packed: dict[str, Any] = {}

    def packed_in(precision: str) -> Any:
        if precision not in packed:
            packed[precision] = build(PACKED, precision)
        return packed[precision]

    shorts = [packed_in(p) if r.packed else build(r, p) for r, p in plan.candidates]
    selection: dict[str, Any] = {"threshold": None}
    if len(plan.candidates) > 1:
        served = []
        for (runtime, precision), short in zip(plan.candidates, shorts, strict=True):
            long = long_pairs(runtime, precision, CPU) if plan.routing and threshold < source.max_length else None
            served.append(short if long is None else RoutedReranker(short, packed_in(long), threshold))
        shapes, ranked = auto.caller_shapes(source.config, source.tokenizer, source.max_length)
        rows = [auto.Row(runtime, precision, {}) for runtime, precision in plan.candidates]
        auto.rank_check(rows, served, ranked)
        decision = auto.measure(rows, served, shapes, budget_s=options.auto_seconds)
        index = rows.index(decision.chosen)
        selection.update(
            reason=auto.reason(decision, shapes, rows),
            candidates=[row.as_dict() for row in rows],
            shapes=[{"name": s.name, "pairs": int(s.lengths.size), "tokens": s.tokens} for s in shapes],
            agreement_documents=int(ranked.lengths.size),
            separated=decision.separated,
            tied=[f"{row.precision} ({row.runtime.name})" for row in decision.tied],
        )
    else:
        index = 0
        selection["reason"] = _fixed_reason(plan, plan.candidates[0][1])
    runtime, precision = plan.candidates[index]
    selection.update(runtime=runtime.name, precision=precision, index=index)
    long = long_pairs(runtime, precision, CPU)
    if plan.measure_threshold and long is not None:
        pairs = auto.Pairs(source.config, source.tokenizer, seed=1)
        query = auto.query_tokens(source.max_length)
        selection["threshold"] = auto.threshold(
            shorts[index], packed_in(long), lambda n: pairs.shape("pair", query, [n]), source.max_length
        )
    return selection
