"""In-process stand-ins for the fast test tier: a scoring backend with deterministic logits.

FakeBackend computes each model input's logit from its token ids (a fixed hash, spread over about
[-5, 5]), so the core's de-duplication, truncation, chunking, ranking and limits can be checked
without Triton: the same ids always give the same logit, and different ids almost always differ.
Every test that runs against it keeps a twin against the real Triton (tests/test_api.py and others).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rerank_server.core import RerankCore, build_core
from rerank_server.models import ServedModel, ServedModels
from rerank_server.observability import Metrics
from rerank_server.settings import Settings
from rerank_server.tokenization import PairTokenizer, TokenizedPairs
from rerank_server.triton_backend import ModelInfo, StaleModelError
from tests.conftest import TOKENIZER_DIR

MODEL = ModelInfo(
    name="fake",
    version="1",
    source_model="fake-reranker",
    max_length=512,
    precision="fp32",
    tokenizer_dir="tokenizer",
)


def fake_logit(ids: np.ndarray) -> float:
    """A deterministic logit of one input's token ids."""
    weights = np.arange(1, ids.size + 1, dtype=np.int64)
    return float((int((ids.astype(np.int64) * weights).sum()) % 1000) / 100.0 - 5.0)


@dataclass
class FakeBackend:
    """A ScoringBackend without Triton: fake_logit per model input, after an optional delay."""

    delay_s: float = 0.0
    ready: bool = True
    calls: list[TokenizedPairs] = field(default_factory=list)
    offset: float = 0.0  # added to every logit: another "model" on the same ids
    # Triton serves another export of the model now (it was exported again and reloaded): calls are refused.
    replaced: bool = False

    priorities: list[int] = field(default_factory=list)

    async def score(self, pairs: TokenizedPairs, timeout_s: float | None = None, priority: int = 0) -> np.ndarray:
        if self.replaced:
            raise StaleModelError("rerank-stale-export: the model was exported again and reloaded")
        self.calls.append(pairs)
        self.priorities.append(priority)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        offsets = np.concatenate(([0], np.cumsum(pairs.lengths)))
        return np.array(
            [fake_logit(pairs.input_ids[offsets[i] : offsets[i + 1]]) + self.offset for i in range(pairs.lengths.size)],
            dtype=np.float32,
        )

    async def is_ready(self) -> bool:
        return self.ready


def fake_core(
    backend: FakeBackend | None = None, models: Sequence[ServedModel] | None = None, **settings: object
) -> RerankCore:
    """A RerankCore over FakeBackend and the real ModernBERT tokenizer, with Settings overrides; `models`
    (the first is the default) instead of MODEL on `backend`."""
    resolved = Settings(triton_url="fake:0", **settings).validated()  # type: ignore[arg-type]
    if models is None:
        models = [fake_model(MODEL, backend or FakeBackend())]
    return build_core(resolved, ServedModels(models, models[0].name), Metrics())


def fake_model(info: ModelInfo, backend: FakeBackend | None = None) -> ServedModel:
    """A served model on the real tokenizer, cut at info.max_length, scored by `backend`."""
    return ServedModel(info, PairTokenizer.from_dir(TOKENIZER_DIR, info.max_length), backend or FakeBackend())


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds
