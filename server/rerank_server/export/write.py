"""Writing the Triton model around the verified weights: the tokenizer, a copy of the model package,
config.pbtxt (its parameters: contract.ModelParameters) and export.json (provenance)."""

from __future__ import annotations

import json
import shutil
import string
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import rerank_triton_model
from rerank_server.export.options import ExportOptions
from rerank_server.export.source import Source
from rerank_server.export.warmup import write_warmup
from rerank_triton_model.contract import INPUT_IDS, LOGITS, SEQUENCE_LENGTHS, ModelParameters
from rerank_triton_model.runtimes import GPU


@dataclass(frozen=True)
class Variant:
    """What the version folder serves: the precision, its runtime and weights, the fp32 fallback, and why."""

    precision: str
    runtime: str
    weights: str
    fp32_runtime: str
    fp32_weights: str
    reason: str
    verification: dict[str, Any]
    quantization: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None


@dataclass(frozen=True)
class LongPairs:
    """Pairs over `tokens` run on the packed engine over `weights` (CPU models of dense-attention runtimes)."""

    tokens: int
    weights: str
    provenance: dict[str, Any]  # how the threshold was set, and the long engines' verification


def write_model(
    source: Source,
    options: ExportOptions,
    variant: Variant,
    long_pairs: LongPairs | None,
    flags: frozenset[str],
    staging: Path,
) -> ModelParameters:
    """The tokenizer, the model package, config.pbtxt and export.json; returns the parameters written."""
    import torch
    import transformers

    version_dir = staging / "1"
    source.tokenizer.save_pretrained(version_dir / "tokenizer")
    copy_model_package(version_dir)
    parameters = ModelParameters(
        source_model=options.resolved_model_id,
        precision=variant.precision,
        max_length=source.max_length,
        vocab_size=source.config.vocab_size,
        pad_token_id=source.pad_token_id,
        max_batch_tokens=options.batch_tokens(source.max_length),
        intra_op_threads=options.intra_op_threads,
        runtime=variant.runtime,
        weights=variant.weights,
        precision_reason=variant.reason,
        cpu_flags=",".join(sorted(flags)),
        fp32_runtime=variant.fp32_runtime,
        fp32_weights=variant.fp32_weights,
        long_pair_tokens=long_pairs.tokens if long_pairs else 0,
        long_weights=long_pairs.weights if long_pairs else "",
        export_id=uuid.uuid4().hex,
        package_digest=rerank_triton_model.package_digest(),
    )
    warmup = write_warmup(staging, parameters, options.device == GPU, source.config) if options.warmup else ""
    (staging / "config.pbtxt").write_text(render_config(options, parameters, warmup))
    provenance = {
        "options": {k: str(v) for k, v in asdict(options).items()},
        "precision": variant.precision,
        "runtime": variant.runtime,
        "weights": variant.weights,
        "fp32_fallback": {"runtime": variant.fp32_runtime, "weights": variant.fp32_weights}
        if variant.fp32_weights
        else None,
        "long_pairs": {"long_pair_tokens": long_pairs.tokens, "weights": long_pairs.weights, **long_pairs.provenance}
        if long_pairs
        else None,
        "precision_reason": variant.reason,
        "cpu_flags": sorted(flags),
        "precision_selection": variant.selection,
        "quantization": variant.quantization,
        "max_length": source.max_length,
        "config": source.config.to_dict(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "verification": variant.verification,
    }
    (version_dir / "export.json").write_text(json.dumps(provenance, indent=2, default=str))
    return parameters


# Triton's batcher prefetches the next batch while the model runs only when its queue has no priority levels and
# no timeouts (core scheduler_utils.cc); without prefetching, a batch can wait up to 500 ms for a wake-up the
# batcher missed (bench.queue_delay). So priority levels are opt-in (--triton-priority). Either way the frontend
# orders callers by priority (admission, tokenizer queue) and cancels a call at its deadline, which takes it
# out of Triton's queue.
QUEUE_POLICY_PREFETCHING = """\
  # No priority levels and no queue timeouts, so Triton's batcher prefetches; --triton-priority adds levels.
"""
QUEUE_POLICY_WITH_PRIORITY = """\
  # Level 1 first: callers' priority 0 (the default) at 1, later priorities at 2 (rerank_server/triton_backend.py).
  priority_levels: 2
  default_priority_level: 1
"""


def render_config(options: ExportOptions, parameters: ModelParameters, model_warmup: str = "") -> str:
    """config.pbtxt from the template; string values are escaped for protobuf text format."""

    def quoted(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid protobuf text-format string

    lines = [
        f"  {{ key: {quoted(key)} value: {{ string_value: {quoted(value)} }} }}"
        for key, value in parameters.as_strings().items()
    ]
    return string.Template(rerank_triton_model.CONFIG_TEMPLATE.read_text()).substitute(
        name=quoted(options.name)[1:-1],
        input_ids=INPUT_IDS,
        sequence_lengths=SEQUENCE_LENGTHS,
        logits=LOGITS,
        max_batch_size=options.max_batch_size,
        max_queue_delay_us=options.max_queue_delay_us,
        queue_policy=QUEUE_POLICY_WITH_PRIORITY if options.triton_priority else QUEUE_POLICY_PREFETCHING,
        instance_kind="KIND_GPU" if options.device == GPU else "KIND_CPU",
        instance_count=options.instance_count,
        parameters=",\n".join(lines),
        model_warmup=model_warmup,
    )


def copy_model_package(version_dir: Path) -> None:
    """The model package into the version folder, and the model.py Triton's stub loads (one import)."""
    shutil.copytree(
        rerank_triton_model.PACKAGE_DIR,
        version_dir / rerank_triton_model.PACKAGE_DIR.name,
        ignore=shutil.ignore_patterns("__pycache__", "*.py[co]", rerank_triton_model.CONFIG_TEMPLATE.name),
    )
    (version_dir / "model.py").write_text(rerank_triton_model.ENTRY_POINT)
