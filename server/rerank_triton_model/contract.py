"""The names both sides of the Triton wire agree on: the model's tensors and its config.pbtxt parameters.

The model (model.py), `rerank export` (which renders config.pbtxt) and the frontend (TritonBackend, which
reads the parameters through Triton's model-config API) all import them from here. Standard library only
(with the runtime registry, itself standard library at import): the frontend's image has neither torch nor
Triton's Python backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .runtimes import ONNXRUNTIME

# Tensors. Each request carries a ragged batch of tokenized pairs:
INPUT_IDS = "input_ids"  # INT32 [1, total_tokens]: every pair's ids laid end to end
SEQUENCE_LENGTHS = "sequence_lengths"  # INT32 [1, pairs]: each pair's length
LOGITS = "logits"  # FP32 [1, pairs]: one logit per pair, the answer

# A request parameter (Triton's, beside the tensors): the export_id of the model the frontend tokenized the
# request for and keys its score cache on. A model of another export (exported again under the same name and
# reloaded before the frontend looked) refuses the request with an error naming STALE_EXPORT, and the frontend
# scores it again on the model served now. Requests without it (other clients of Triton) are served as ever.
EXPORT_ID_PARAMETER = "rerank_export_id"
STALE_EXPORT = "rerank-stale-export"


def stale_export_message(expected: str, served: str) -> str:
    """The error of a request made for export `expected` that reached a model of export `served`."""
    return (
        f"{STALE_EXPORT}: the request was made for export {expected!r} of this model, which Triton now serves as "
        f"export {served!r} (exported again and reloaded)"
    )


@dataclass(frozen=True)
class ModelParameters:
    """The parameters block of config.pbtxt (string values on the wire, typed here).

    Fields without a default are required: a model without them was not made by `rerank export`."""

    source_model: str  # the checkpoint it was exported from (GetModelInfo reports it)
    precision: str  # as exported: fp32, bf16, int8 (CPU) or fp16 (GPU)
    max_length: int  # tokens per pair, special tokens included
    vocab_size: int  # ids at or past it are refused per request
    pad_token_id: int
    max_batch_tokens: int  # the model's token budget per forward
    intra_op_threads: int = 0  # 0: the cores this process may use
    runtime: str = ONNXRUNTIME.name  # a name in runtimes.RUNTIMES
    weights: str = "model.onnx"  # in the version folder: the ONNX graph or the checkpoint folder
    # CPUs: why this precision was chosen, the CPU flags it was chosen on, and the fp32 weights a CPU
    # without native support for `precision` loads instead (cpu_features.served_choice).
    precision_reason: str = ""
    cpu_flags: str = ""
    fp32_runtime: str = ""
    fp32_weights: str = ""
    # Pairs longer than this run on the packed engine over `long_weights` (a checkpoint folder) rather than
    # `runtime`: dense attention would cost O(length²) time and memory there. 0: no such routing.
    long_pair_tokens: int = 0
    long_weights: str = ""
    tokenizer_dir: str = "tokenizer"  # in the version folder
    # New with every export: the frontend's score cache keys on it, so that a model re-exported under
    # the same name and version never answers the logits of the one it replaced.
    export_id: str = ""
    # rerank_triton_model.package_digest() of the exporting service ("" for a model exported without one).
    package_digest: str = ""

    @classmethod
    def from_strings(cls, values: Mapping[str, str]) -> ModelParameters:
        """From string values by key (unknown keys ignored); ValueError names what is missing or malformed."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        missing = sorted(
            name for name, field in fields.items() if field.default is dataclasses.MISSING and name not in values
        )
        if missing:
            raise ValueError(f"it lacks the parameters {missing}: it was not made by `rerank export`")
        typed: dict[str, Any] = {}
        for name, field in fields.items():
            if name not in values:
                continue
            try:
                typed[name] = int(values[name]) if field.type in ("int", int) else str(values[name])
            except ValueError:
                raise ValueError(f"the parameter {name!r} is not an integer: {values[name]!r}") from None
        return cls(**typed)

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> ModelParameters:
        """From Triton's JSON model configuration (what the model's `initialize` and the model-config API get)."""
        raw = config.get("parameters", {})
        return cls.from_strings({key: str(value.get("string_value", "")) for key, value in raw.items()})

    def as_strings(self) -> dict[str, str]:
        return {name: str(value) for name, value in dataclasses.asdict(self).items()}
