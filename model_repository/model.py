"""Triton Python-backend model: the cross-encoder reranker over ragged batches.

`rerank export` copies this file to <repository>/<name>/1/model.py, next to reranker_engine.py,
model.onnx and the tokenizer. Each request carries one or more tokenized (query, document) pairs:

    input_ids         INT32 [1, total_tokens]  every pair's ids laid end to end
    sequence_lengths  INT32 [1, pairs]         each pair's length
    logits            FP32  [1, pairs]         one logit per pair (the answer)

The inputs allow ragged batches, so Triton's dynamic batcher merges requests of any lengths; this
model then pools the pairs of all merged requests, orders them by length and runs them in padded
sub-batches under the `max_batch_tokens` budget (see reranker_engine.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from reranker_engine import PackedReranker, check_ragged_batch


def _parameter(config: dict[str, Any], key: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None:
        raise pb_utils.TritonModelException(f"config.pbtxt lacks the parameter {key!r}")
    return str(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        providers: list[str | tuple[str, dict[str, object]]] = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU":
            device: dict[str, object] = {"device_id": int(args["model_instance_device_id"])}
            providers = [("CUDAExecutionProvider", device), "CPUExecutionProvider"]
        self.engine = PackedReranker.from_file(
            os.path.join(version_dir, _parameter(config, "onnx_file", "model.onnx")),
            pad_token_id=int(_parameter(config, "pad_token_id")),
            max_batch_tokens=int(_parameter(config, "max_batch_tokens")),
            intra_op_threads=int(_parameter(config, "intra_op_threads", "0")),
            providers=providers,
        )
        self.vocab_size = int(_parameter(config, "vocab_size"))

    def execute(self, requests: list[Any]) -> list[Any]:
        # Pool the pairs of every well-formed request into one ragged batch, score it once, split it back.
        responses: list[Any] = [None] * len(requests)
        pooled: list[tuple[int, np.ndarray, np.ndarray]] = []
        for position, request in enumerate(requests):
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
            lengths = pb_utils.get_input_tensor_by_name(request, "sequence_lengths").as_numpy().reshape(-1)
            problem = check_ragged_batch(ids, lengths, self.vocab_size)
            if problem is None:
                pooled.append((position, ids, lengths))
            else:
                responses[position] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
        if pooled:
            try:
                logits = self.engine.score(
                    np.concatenate([ids for _, ids, _ in pooled]), np.concatenate([n for _, _, n in pooled])
                )
            except Exception as error:  # noqa: BLE001 - a failed run answers every request, never hangs one
                failure = pb_utils.TritonError(f"model execution failed: {error}")
                for position, _, _ in pooled:
                    responses[position] = pb_utils.InferenceResponse(error=failure)
                return responses
            bounds = np.cumsum([n.size for _, _, n in pooled])[:-1]
            for (position, _, _), chunk in zip(pooled, np.split(logits, bounds), strict=True):
                responses[position] = pb_utils.InferenceResponse([pb_utils.Tensor("logits", chunk.reshape(1, -1))])
        return responses

    def finalize(self) -> None:
        del self.engine
