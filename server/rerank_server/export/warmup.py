"""The exported model's warm-up: Triton's model_warmup in config.pbtxt, requests Triton runs through each model
instance before it reports the model ready, so that SERVING means warm. Without it the first callers pay the
first runs: ONNX Runtime's and PyTorch's first run of each shape, the packed engine's rotary tables, CUDA's
lazily loaded kernels and caching allocator, and the Python backend's first shared-memory transfers.

The requests follow the shapes the engine plans (reranker_engine.py): one of pairs from 16 tokens up to the
longest pair the main engine runs (a sub-batch per width class), where long pairs go to the packed engine one
pair just over the threshold, and one request that fills the token budget in one sub-batch (the largest
activations a call allocates: ONNX Runtime's arena, glibc's heap, CUDA's caching allocator and the kernels
chosen for that shape). On CPUs the budget request runs only where it is cheap (`cheap_on_cpu`): a small
model's first call at a size larger than any before took 1.5-1.9x its later calls, the extra all memory
mapped for the first time, while ModernBERT-base on 2 cores answered its first call as fast as its later
ones without any warm-up (docs/performance.md), and a budget-sized run there is seconds of start-up.
Their inputs lie under <model>/warmup/ as raw little-endian int32, the form Triton reads an
input_data_file in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rerank_triton_model.contract import INPUT_IDS, SEQUENCE_LENGTHS, ModelParameters

WARMUP_DIR = "warmup"
# The GPU budget request's pair length: (a)-sized pairs, so that the budget holds many rows (the padded
# engines' batch dimension) as a full rerank call's sub-batch does. On CPUs its pairs are the widest the
# main engine runs (up to LONGEST_MIXED): a padded engine's attention scores, its largest buffers, grow with
# the square of the width.
BUDGET_PAIR_TOKENS = 256
# On CPUs the budget request runs where its estimated work is at most this: about a second at 50 GFLOP/s, a
# low figure for fp32 on 2 cores (MKL's GEMMs run at about 112 GFLOP/s on 2 Zen 5 cores; the tests' tiny
# model's padded runs at width 1,024 reach about 60).
CPU_BUDGET_FLOPS = 50e9
SHORTEST = 16
# The mixed request stops here even when the main engine runs longer pairs: on a CPU, a pair of thousands of
# tokens takes seconds, and a long pair's first run costs no more than a short one's.
LONGEST_MIXED = 1024


@dataclass(frozen=True)
class WarmupRequest:
    name: str
    lengths: tuple[int, ...]  # one per pair, special tokens included

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def _main_longest(parameters: ModelParameters) -> int:
    """The longest pair the main engine runs (longer ones go to the packed engine where routed)."""
    routed = parameters.long_pair_tokens > 0 and bool(parameters.long_weights)
    return min(parameters.max_length, parameters.long_pair_tokens) if routed else parameters.max_length


def budget_width(parameters: ModelParameters, on_gpu: bool) -> int:
    main_longest = _main_longest(parameters)
    return min(BUDGET_PAIR_TOKENS if on_gpu else LONGEST_MIXED, main_longest)


def cheap_on_cpu(config: Any, parameters: ModelParameters) -> bool:
    """Whether the budget request's work (the encoder's matmuls, and dense attention at its width in every
    layer, as a padded engine computes it) is under CPU_BUDGET_FLOPS. `config`: the checkpoint's
    ModernBertConfig."""
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    width = budget_width(parameters, on_gpu=False)
    # Per token and layer: Wqkv and Wo (4 H^2), the gated MLP (H x 2I and I x H), QK^T and AV (2 x 2 w H).
    per_token = layers * (2 * (4 * hidden * hidden + 3 * hidden * inner) + 4 * width * hidden)
    return per_token * parameters.max_batch_tokens <= CPU_BUDGET_FLOPS


def warmup_requests(parameters: ModelParameters, on_gpu: bool, budget: bool | None = None) -> list[WarmupRequest]:
    """The requests the model runs before it is ready, from the parameters the export writes. `budget`:
    whether to fill the token budget once (default: on GPUs only; the export decides for CPUs)."""
    longest = parameters.max_length
    routed = parameters.long_pair_tokens > 0 and bool(parameters.long_weights)
    main_longest = _main_longest(parameters)
    requests = []
    if on_gpu if budget is None else budget:
        width = budget_width(parameters, on_gpu)
        requests.append(WarmupRequest("budget", (width,) * max(1, parameters.max_batch_tokens // width)))
    mixed, length = [], min(SHORTEST, main_longest)
    while length < min(main_longest, LONGEST_MIXED):
        mixed.append(length)
        length *= 2
    mixed.append(min(main_longest, LONGEST_MIXED))
    requests.append(WarmupRequest("mixed", tuple(mixed)))
    if routed and parameters.long_pair_tokens < longest:
        requests.append(WarmupRequest("long", (parameters.long_pair_tokens + 1,)))
    return requests


def token_ids(tokens: int, vocab_size: int) -> np.ndarray:
    """Ids spread over the vocabulary (any valid ids will do: the run's cost depends on the shape alone)."""
    return ((np.arange(tokens, dtype=np.int64) * 7919 + 1000) % vocab_size).astype("<i4")


def write_warmup(model_dir: Path, parameters: ModelParameters, on_gpu: bool, config: Any) -> str:
    """Each request's inputs under model_dir/warmup/, and the model_warmup block that names them."""
    folder = model_dir / WARMUP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    budget = on_gpu or cheap_on_cpu(config, parameters)
    for request in warmup_requests(parameters, on_gpu, budget):
        files = {
            INPUT_IDS: (token_ids(request.tokens, parameters.vocab_size), request.tokens),
            SEQUENCE_LENGTHS: (np.asarray(request.lengths, dtype="<i4"), len(request.lengths)),
        }
        inputs = []
        for tensor, (values, size) in files.items():
            file_name = f"{request.name}_{tensor}"
            (folder / file_name).write_bytes(values.tobytes())
            inputs.append(
                f'    inputs {{ key: "{tensor}" value: {{ data_type: TYPE_INT32 dims: [ {size} ] '
                f'input_data_file: "{file_name}" }} }}'
            )
        entries.append(
            "  {\n" + f'    name: "{request.name}"\n    batch_size: 1\n    count: 1\n' + "\n".join(inputs) + "\n  }"
        )
    return "model_warmup [\n" + ",\n".join(entries) + "\n]\n"
