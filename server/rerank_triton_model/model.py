"""Triton Python-backend model: the cross-encoder reranker over ragged batches.

`rerank export` copies this package to <repository>/<name>/1/rerank_triton_model/, beside a model.py that
imports TritonPythonModel from here, the weights (model.onnx for the onnxruntime runtime, the checkpoint
folder model/ for the torch and packed runtimes) and the tokenizer. Each request carries one or more
tokenized (query, document) pairs; contract.py names the tensors and the config parameters.

The inputs allow ragged batches, so Triton's dynamic batcher merges requests of any lengths; this
model then pools the pairs of all merged requests, orders them by length and runs them in padded
sub-batches under the `max_batch_tokens` budget (see reranker_engine.py), answering each request as soon
as its own pairs are scored.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .contract import EXPORT_ID_PARAMETER, INPUT_IDS, LOGITS, SEQUENCE_LENGTHS, ModelParameters, stale_export_message
from .cpu_features import cpu_flags, served_choice
from .reranker_engine import PackedReranker, RoutedReranker, check_ragged_batch
from .runtimes import PACKED, runtime

# Read once: the output path depends on it, and numpy does not change under a running stub.
_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def _input(request: Any, name: str) -> np.ndarray:
    """One input tensor as a flat numpy array, read through DLPack.

    Never as_numpy(): Triton 2.51's stub builds those arrays through pybind11 2.10, which under numpy 2
    reads every element as the first one (fixed in python_backend r24.11). DLPack bypasses numpy's C API.
    """
    return np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name)).reshape(-1)


def _numpy_output(name: str, values: np.ndarray) -> Any:
    """An output tensor from numpy through DLPack (pb_utils.Tensor(name, array) has a byte size of 0
    under numpy 2, for the reason _input gives). Under numpy 1 the stub dies consuming a numpy
    capsule (observed with numpy 1.26.4), while pb_utils.Tensor is correct there."""
    if not _NUMPY_2:
        return pb_utils.Tensor(name, np.ascontiguousarray(values))
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(values))


def expected_export(request: Any) -> str | None:
    """The export id the request was made for (contract.EXPORT_ID_PARAMETER); None when it names none."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):
        return None
    value = parameters.get(EXPORT_ID_PARAMETER) if isinstance(parameters, dict) else None
    return None if value is None else str(value)


def _send(sender: Any, response: Any) -> None:
    """A request's one response, final (the model is not decoupled: execute answers through senders)."""
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _cancelled() -> Any:
    return pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)


def _ignore_consumed_numpy_capsules() -> None:
    """Silence one harmless report per numpy output: the stub renames the DLPack capsule it consumed
    ("used_dlpack"), numpy's capsule destructor expects its own name, reports the mismatch through
    sys.unraisablehook and frees nothing (the stub frees the tensor). Anything else is still reported."""
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (
            isinstance(unraisable.exc_value, ValueError)
            and "PyCapsule_GetPointer called with incorrect name" in str(unraisable.exc_value)
            and (unraisable.object is None or type(unraisable.object).__name__ == "PyCapsule")
        ):
            default(unraisable)

    sys.unraisablehook = hook


def _torch_output(name: str, values: np.ndarray) -> Any:
    """As _numpy_output, through a torch capsule: the stub logs a spurious PyCapsule warning for each
    numpy capsule it consumes, none for torch's. For the runtimes that import torch anyway."""
    import torch
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(np.ascontiguousarray(values))))


class _Metrics:
    """Custom counters on Triton's metrics endpoint: pairs computed or dropped, real and padded tokens.

    Every series carries `pid`, the instance's stub process. Triton 2.51 shares one Prometheus counter
    between stubs that add the same family and labels (a reloaded model's new and old instances, or
    several instances of one model), but counts references per stub: the first stub to unload frees the
    counter the others still write to, and the server dies of heap corruption (seen on a reload). A
    label unique to each live stub keeps every counter owned by one stub; sum over `pid`."""

    def __init__(self, model: str) -> None:
        series = {"model": model, "pid": str(os.getpid())}
        self.pairs_family = pb_utils.MetricFamily(
            name="rerank_model_pairs_total",
            description="(query, document) inputs that reached the model, by outcome (computed, dropped)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.tokens_family = pb_utils.MetricFamily(
            name="rerank_model_tokens_total",
            description="tokens of computed inputs: real, and padded (real plus padding) as run",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.long_family = pb_utils.MetricFamily(
            name="rerank_model_long_pairs_total",
            description="pairs over the model's long_pair_tokens, computed on the packed engine (CPU, dense runtimes)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.computed = self.pairs_family.Metric(labels={**series, "outcome": "computed"})
        self.dropped = self.pairs_family.Metric(labels={**series, "outcome": "dropped"})
        self.real_tokens = self.tokens_family.Metric(labels={**series, "kind": "real"})
        self.padded_tokens = self.tokens_family.Metric(labels={**series, "kind": "padded"})
        self.long_pairs = self.long_family.Metric(labels=series)

    def count_long(self, pairs: int) -> None:
        self.long_pairs.increment(pairs)

    def count(self, lengths: np.ndarray, padded_tokens: int) -> None:
        """One run's computed pairs (`lengths`: their tokens) and the tokens it ran, padding included."""
        self.computed.increment(int(lengths.size))
        self.real_tokens.increment(int(lengths.sum()))
        self.padded_tokens.increment(padded_tokens)

    def count_dropped(self, pairs: int) -> None:
        """Pairs of cancelled requests, dropped uncomputed."""
        if pairs:
            self.dropped.increment(pairs)


class _Warmup:
    """The warm-up requests (config.pbtxt's model_warmup: each sample's batch_size requests, count times), which
    Triton runs through the instance before it reports the model ready: kept out of the traffic metrics, and
    logged once all have run."""

    def __init__(self, config: dict[str, Any]) -> None:
        samples = config.get("model_warmup", [])
        self.left = sum(max(1, int(s.get("batch_size", 1))) * max(1, int(s.get("count", 1))) for s in samples)
        self.requests, self.pairs, self.tokens, self.seconds = 0, 0, 0, 0.0

    def ran(self, requests: int, lengths: np.ndarray, seconds: float) -> bool:
        """Count one execution of warm-up requests; True once the last has run."""
        self.left -= requests
        self.requests += requests
        self.pairs += int(lengths.size)
        self.tokens += int(lengths.sum())
        self.seconds += seconds
        return self.left <= 0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        on_gpu = args["model_instance_kind"] == "GPU"
        device_id = int(args["model_instance_device_id"])
        # On CPUs, the precision this CPU runs natively: a bf16 or int8 export served on a CPU without
        # bf16 or VNNI loads its fp32 weights (cpu_features.py); the frontend resolves the same to report it.
        try:
            parameters = ModelParameters.from_model_config(config)
            choice = served_choice(parameters, cpu_flags(), on_gpu)
        except ValueError as error:
            raise pb_utils.TritonModelException(str(error)) from None
        log = pb_utils.Logger.log_info if choice.precision == choice.requested else pb_utils.Logger.log_warn
        log(f"{args['model_name']}: precision {choice.precision} ({choice.runtime}, {choice.weights}): {choice.reason}")
        served = runtime(choice.runtime)
        common = {
            "pad_token_id": parameters.pad_token_id,
            "max_batch_tokens": parameters.max_batch_tokens,
            "intra_op_threads": parameters.intra_op_threads,
        }
        device = f"cuda:{device_id}" if on_gpu else "cpu"
        self.engine: PackedReranker | RoutedReranker = served.build(
            os.path.join(version_dir, choice.weights), device=device, precision=choice.precision, **common
        )
        if choice.long_precision is not None:
            # The others' attention is dense T x T in every layer; pairs over the threshold go to the packed
            # engine (no T x T buffer, windowed local layers), loaded now so a bad checkpoint fails here.
            long = PACKED.build(
                os.path.join(version_dir, parameters.long_weights),
                device=device,
                precision=choice.long_precision,
                **common,
            )
            self.engine = RoutedReranker(self.engine, long, parameters.long_pair_tokens)
            pb_utils.Logger.log_info(
                f"{args['model_name']}: pairs over {parameters.long_pair_tokens} tokens run on the packed "
                f"engine ({choice.long_precision}, {parameters.long_weights}), the others on {served.name}"
            )
        # Outputs through a torch capsule wherever torch is loaded (see _torch_output), else numpy's.
        self.output = _numpy_output if served.graph and choice.long_precision is None else _torch_output
        if self.output is _numpy_output:
            _ignore_consumed_numpy_capsules()
        self.vocab_size = parameters.vocab_size
        self.export_id = parameters.export_id
        pb_utils.Logger.log_info(f"{args['model_name']}: {served.name} runtime, numpy {np.__version__}")
        self.model_name = args["model_name"]
        self.metrics = _Metrics(self.model_name)
        self.warmup = _Warmup(config)
        if self.warmup.left == 0:
            self._count_long_pairs()

    def _count_long_pairs(self) -> None:
        if isinstance(self.engine, RoutedReranker):
            self.engine.on_long = self.metrics.count_long

    def execute(self, requests: list[Any]) -> None:
        # Pool the pairs of every well-formed request into one ragged batch and score it in sub-batches,
        # shortest pairs first. Each request is answered through its response sender as soon as its last pair
        # is computed: a short request merged with long ones does not wait for their runs.
        started = time.perf_counter()
        senders = [request.get_response_sender() for request in requests]
        pooled: list[tuple[int, np.ndarray, np.ndarray]] = []
        for position, request in enumerate(requests):
            # Made for another export of this model (the frontend has not seen the reload yet): refused, so that
            # no logit of this model is answered as the other's or cached under its key.
            expected = expected_export(request)
            if expected is not None and expected != self.export_id:
                failure = pb_utils.TritonError(stale_export_message(expected, self.export_id))
                _send(senders[position], pb_utils.InferenceResponse(error=failure))
                continue
            ids, lengths = _input(request, INPUT_IDS), _input(request, SEQUENCE_LENGTHS)
            problem = check_ragged_batch(ids, lengths, self.vocab_size)
            if problem is None:
                pooled.append((position, ids, lengths))
            else:
                _send(senders[position], pb_utils.InferenceResponse(error=pb_utils.TritonError(problem)))
        if not pooled:
            return None
        sizes = np.array([lengths.size for _, _, lengths in pooled])
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        owners = np.repeat(np.arange(len(pooled)), sizes)
        waiting = sizes.copy()  # pairs each request still waits for
        cancelled = np.zeros(len(pooled), dtype=bool)
        answered = np.zeros(len(pooled), dtype=bool)
        lengths_all = np.concatenate([lengths for _, _, lengths in pooled])
        logits = np.full(lengths_all.size, np.nan, dtype=np.float32)

        def answer(owner: int, response: Any) -> None:
            answered[owner] = True
            _send(senders[pooled[owner][0]], response)

        def active(pairs: np.ndarray) -> np.ndarray:
            # Asked before each sub-batch: a caller that cancelled (or whose deadline passed) since
            # the execution began has its remaining pairs dropped, not computed, and is answered at once.
            for owner in np.unique(owners[pairs]):
                if not cancelled[owner] and requests[pooled[owner][0]].is_cancelled():
                    cancelled[owner] = True
                    answer(owner, pb_utils.InferenceResponse(error=_cancelled()))
            return ~cancelled[owners[pairs]]

        # Traffic is counted run by run, before the answers it holds, so a caller that reads the metrics once
        # answered finds its pairs there. Warm-up requests are not traffic.
        counting = self.warmup.left <= 0
        try:
            ids_all = np.concatenate([ids for _, ids, _ in pooled])
            for batch, batch_logits in self.engine.iter_sub_batches(ids_all, lengths_all, active):
                logits[batch.pairs] = batch_logits
                if counting:
                    self.metrics.count(lengths_all[batch.pairs], batch.padded_tokens)
                done = owners[batch.pairs]
                np.subtract.at(waiting, done, 1)
                for owner in np.unique(done):
                    if waiting[owner] == 0 and not answered[owner]:
                        chunk = logits[starts[owner] : starts[owner] + sizes[owner]]
                        answer(owner, pb_utils.InferenceResponse([self.output(LOGITS, chunk.reshape(1, -1))]))
        except Exception as error:  # noqa: BLE001 - a failed run answers every request, never hangs one
            failure = pb_utils.TritonError(f"model execution failed: {error}")
            for owner in np.flatnonzero(~answered):
                answer(int(owner), pb_utils.InferenceResponse(error=failure))
            return None
        for owner in np.flatnonzero(~answered):  # every pair is planned into a run, so none is left here
            answer(int(owner), pb_utils.InferenceResponse(error=pb_utils.TritonError("pairs left unscored")))
        if counting:
            self.metrics.count_dropped(int(np.isnan(logits).sum()))
        elif self.warmup.ran(len(requests), lengths_all, time.perf_counter() - started):
            warmup = self.warmup
            pb_utils.Logger.log_info(
                f"{self.model_name}: warmed up before ready: {warmup.requests} requests, {warmup.pairs} pairs, "
                f"{warmup.tokens} tokens in {warmup.seconds:.2f} s"
            )
            self._count_long_pairs()
        return None

    def finalize(self) -> None:
        del self.engine
        del self.metrics  # its Metric objects before their families, as the backend requires
        # The stub process exits next, and its interpreter's last collection walks every object torch and
        # transformers made: about 1 s on 2 cores that a model unload and Triton's shutdown wait for.
        # Frozen objects are skipped; the process's memory goes back when it exits.
        gc.freeze()
