"""The scoring backend: Triton Inference Server, reached through its gRPC API.

`TritonServer` is one Triton (one channel): its readiness and its repository index, which says which
models are loaded (Triton's explicit model control loads and unloads them while it runs). Each served
model scores through a `TritonBackend` on that channel. A rerank request's pairs are ordered by length
and split into Triton requests of at most `request_max_tokens` tokens each; Triton's dynamic batcher
merges them with other callers' requests and the model pads each length-sorted sub-batch under its own
token budget.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from opentelemetry import trace
from tritonclient.utils import InferenceServerException

from rerank_client import message_size_options
from rerank_server.errors import BackendFailureError, BackendUnavailableError, DeadlineExceededError, ServiceError
from rerank_server.observability import Metrics
from rerank_server.tokenization import TokenizedPairs
from rerank_server.tracing import propagation_headers, tracer
from rerank_triton_model.contract import (
    EXPORT_ID_PARAMETER,
    INPUT_IDS,
    LOGITS,
    SEQUENCE_LENGTHS,
    STALE_EXPORT,
    ModelParameters,
)
from rerank_triton_model.cpu_features import cpu_flags, served_choice
from rerank_triton_model.reranker_engine import gather_pairs, pair_offsets, plan_packed_sub_batches

log = logging.getLogger(__name__)


# gRPC's default reconnect backoff starts at 1 s and grows 1.6x per failed attempt up to 120 s: a Triton
# that starts (or restarts after a crash) while the channel is backing off is seen seconds late, and
# every call meanwhile fails fast. Connecting to Triton is cheap: retry every 100 ms, at most 500 ms apart.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


@dataclass(frozen=True)
class ModelInfo:
    """What the frontend needs to know of the served model, read from its config.pbtxt parameters."""

    name: str
    version: str
    source_model: str
    max_length: int
    precision: str
    tokenizer_dir: str
    export_id: str = ""  # changes with every export (and so with a re-export under the same name)
    package_digest: str = ""  # of the model code the export copied (rerank_triton_model.package_digest)


@dataclass(frozen=True)
class RepositoryModel:
    """A model of Triton's repository index, and its state there."""

    name: str
    version: str
    state: str  # READY, LOADING, UNLOADING, UNAVAILABLE, or "" when never loaded
    reason: str

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    @property
    def unloaded(self) -> bool:
        """Out of service on purpose (never loaded, or unloaded through model control), not failed."""
        return self.state in ("", "UNLOADING") or (self.state == "UNAVAILABLE" and self.reason == "unloaded")


class ScoringBackend(Protocol):
    """What the service needs of a model executor."""

    async def score(self, pairs: TokenizedPairs, timeout_s: float | None = None, priority: int = 0) -> np.ndarray: ...

    async def is_ready(self) -> bool: ...


class StaleModelError(BackendUnavailableError):
    """Triton serves another export of the model than the one the request was made for: it was exported again
    and reloaded, and the model watcher has not seen it yet. The core scores the call again on the model served
    once the watcher has looked; where it cannot, the caller gets UNAVAILABLE (safe to retry)."""


def _translate(error: InferenceServerException) -> ServiceError:
    status = error.status() or ""
    message = error.message() or str(error)
    if STALE_EXPORT in message:
        return StaleModelError(f"the model was reloaded while the call was scored: {message}")
    if "UNAVAILABLE" in status:
        return BackendUnavailableError(f"the model server is unavailable: {message}")
    if "DEADLINE_EXCEEDED" in status:
        return DeadlineExceededError("the deadline passed before the model answered")
    return BackendFailureError(f"the model server failed: {message}")


class TritonServer:
    """One Triton reached through tritonclient.grpc.aio: its readiness, its repository, and the
    backends of its models, which share this channel."""

    def __init__(
        self,
        url: str,
        *,
        request_max_tokens: int,
        max_message_bytes: int,
        metrics: Metrics | None = None,
        local: bool = False,
    ) -> None:
        self.url = url
        # Triton runs on this machine (started by `rerank serve`): its CPU is ours, so the precision
        # a model loaded in is the one cpu_features resolves here from the config and these flags.
        self.local = local
        self.request_max_tokens = request_max_tokens
        self.metrics = metrics
        self.client = triton_grpc.InferenceServerClient(
            url, channel_args=[*message_size_options(max_message_bytes), *RECONNECT_OPTIONS]
        )

    async def is_ready(self) -> bool:
        """Triton is up and has loaded what it loads at start (strict readiness)."""
        try:
            return bool(await self.client.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def is_live(self) -> bool:
        """Triton answers at all (its models aside)."""
        try:
            return bool(await self.client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def repository(self) -> list[RepositoryModel]:
        """Every model of Triton's repository with its state, by name; raises
        BackendUnavailableError when Triton cannot be reached."""
        try:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=2.0)
        except InferenceServerException as error:
            if "DEADLINE_EXCEEDED" in (error.status() or ""):
                # Our own 2 s bound, not a caller's deadline: a Triton that does not answer is unavailable.
                raise BackendUnavailableError("the model server did not answer within 2 s") from None
            raise _translate(error) from None
        models = [
            RepositoryModel(entry["name"], entry.get("version", ""), entry.get("state", ""), entry.get("reason", ""))
            for entry in index.get("models", [])
        ]
        return sorted(models, key=lambda model: model.name)

    def backend(self, model_name: str, export_id: str | None = None) -> TritonBackend:
        """The backend of one model; with `export_id`, its requests are refused by any other export of it."""
        return TritonBackend(self, model_name, export_id)

    async def close(self) -> None:
        await self.client.close()


# Triton's priority levels, in a model exported with --triton-priority (config.pbtxt's dynamic_batching:
# priority_levels 2, default 1; 1 is served first). A call's priority 0 (the default) runs at FIRST_LEVEL; any
# later priority at DEFERRED_LEVEL, behind every FIRST_LEVEL request waiting, in arrival order among themselves.
# A model without priority levels (the default export) reads either as its default: Triton does not reorder.
FIRST_LEVEL = 1
DEFERRED_LEVEL = 2


def priority_level(priority: int) -> int:
    """The Triton priority level of a call's priority (lower first; 0 and below: the first level)."""
    return FIRST_LEVEL if priority <= 0 else DEFERRED_LEVEL


class TritonBackend:
    """Scores ragged batches on one model of a TritonServer: on the export `export_id` of it, when given (each
    request names it, contract.EXPORT_ID_PARAMETER, and another export refuses it: StaleModelError)."""

    def __init__(self, server: TritonServer, model_name: str, export_id: str | None = None) -> None:
        self.server = server
        self.model_name = model_name
        self.export_id = export_id
        self._client = server.client

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(self.model_name, client_timeout=2.0))
        except InferenceServerException:
            return False

    async def model_info(self, version: str | None = None) -> ModelInfo:
        """The model as its config.pbtxt describes it; `version`: the one Triton serves, when known
        (from the repository index), else asked for."""
        # Bounded like every control-plane call here: the model watcher must never wait on Triton forever.
        config = (await self._client.get_model_config(self.model_name, as_json=True, client_timeout=10.0))["config"]
        if version is None:
            metadata = await self._client.get_model_metadata(self.model_name, as_json=True, client_timeout=10.0)
            version = max(metadata.get("versions", ["1"]), key=int)
        try:
            params = ModelParameters.from_model_config(config)
        except ValueError as error:
            raise RuntimeError(f"model {self.model_name!r}: {error}") from None
        return ModelInfo(
            name=self.model_name,
            version=version,
            source_model=params.source_model,
            max_length=params.max_length,
            precision=self._precision_in_use(config, params),
            tokenizer_dir=params.tokenizer_dir,
            export_id=params.export_id,
            package_digest=params.package_digest,
        )

    def _precision_in_use(self, config: dict[str, Any], params: ModelParameters) -> str:
        """The precision the model computes in: on a local CPU instance, what model.py resolved from
        the same parameters and flags (cpu_features.served_choice); else the exported one."""
        kinds = {group.get("kind", "KIND_CPU") for group in config.get("instance_group", [])}
        if not self.server.local or kinds != {"KIND_CPU"}:
            return params.precision
        try:
            return served_choice(params, cpu_flags()).precision
        except ValueError:
            return params.precision  # the model refused to load; is_ready says so

    async def score(self, pairs: TokenizedPairs, timeout_s: float | None = None, priority: int = 0) -> np.ndarray:
        """Logits (float32) of every pair, in the order of `pairs`; `priority` as in core.ScoreOptions."""
        level = priority_level(priority)
        offsets = pair_offsets(pairs.lengths)
        # Length-sorted runs of at most request_max_tokens real tokens: the model's own packed plan.
        groups = [batch.pairs for batch in plan_packed_sub_batches(pairs.lengths, self.server.request_max_tokens)]
        logits = np.empty(pairs.lengths.size, dtype=np.float32)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        self._infer(
                            gather_pairs(pairs.input_ids, offsets, pairs.lengths, g), pairs.lengths[g], timeout_s, level
                        )
                    )
                    for g in groups
                ]
        except* (InferenceServerException, ServiceError) as errors:
            # The TaskGroup has cancelled the sibling requests; the caller gets the first failure.
            first = errors.exceptions[0]
            raise (_translate(first) if isinstance(first, InferenceServerException) else first) from None
        for g, task in zip(groups, tasks, strict=True):
            logits[g] = task.result()
        return logits

    async def _infer(
        self, input_ids: np.ndarray, lengths: np.ndarray, timeout_s: float | None, level: int
    ) -> np.ndarray:
        if self.server.metrics is not None:
            self.server.metrics.triton_request_pairs.labels(model=self.model_name).observe(lengths.size)
        with tracer.start_as_current_span(
            "triton.infer",
            kind=trace.SpanKind.CLIENT,
            attributes={"pairs": int(lengths.size), "tokens": int(input_ids.size)},
        ):
            return await self._infer_traced(input_ids, lengths, timeout_s, level)

    async def _infer_traced(
        self, input_ids: np.ndarray, lengths: np.ndarray, timeout_s: float | None, level: int
    ) -> np.ndarray:
        ids_input = triton_grpc.InferInput(INPUT_IDS, [1, input_ids.size], "INT32")
        ids_input.set_data_from_numpy(input_ids.reshape(1, -1))
        lengths_input = triton_grpc.InferInput(SEQUENCE_LENGTHS, [1, lengths.size], "INT32")
        lengths_input.set_data_from_numpy(np.ascontiguousarray(lengths, dtype=np.int32).reshape(1, -1))
        result = await self._client.infer(
            self.model_name,
            [ids_input, lengths_input],
            outputs=[triton_grpc.InferRequestedOutput(LOGITS)],
            # The caller's deadline as the gRPC deadline: its expiry cancels the request in Triton (taken out of
            # the queue, or the model drops its uncomputed pairs).
            client_timeout=timeout_s,
            # 0 asks for the model's default level, FIRST_LEVEL: default traffic sends no priority at all.
            priority=0 if level == FIRST_LEVEL else level,
            headers=propagation_headers() or None,
            parameters=None if self.export_id is None else {EXPORT_ID_PARAMETER: self.export_id},
        )
        logits = result.as_numpy(LOGITS)
        if logits is None or logits.size != lengths.size:
            raise BackendFailureError(
                f"the model answered {None if logits is None else logits.size} logits for {lengths.size} pairs"
            )
        return np.asarray(logits, dtype=np.float32).reshape(-1)
