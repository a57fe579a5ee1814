"""The score cache: logits of model inputs already computed, answered again without the model.

Callers send the same candidates again and again (the next page of results, a retry, a popular query),
and a cross-encoder's logit depends only on the model and the pair's token ids. So each model input (a
pair, or one CHUNK window of it) is cached on its own, keyed by

- the model that computed it (`ModelKey`: the served name, Triton's version, the precision it computes
  in and the export's id, which a re-export changes), so no logit of another model, precision or export
  is ever answered; and
- a 128-bit BLAKE2b digest of its token ids, special tokens included: what the model saw, whatever
  text, truncation or window produced it.

A hit answers the float32 logit the model computed, bit for bit, so cached and computed answers differ
only in time. The cache holds at most `max_bytes` (measured Python memory per entry, keys and
bookkeeping included) and forgets the least recently used inputs first; 0 turns it off. It is used from
the event loop only, so it needs no lock; the digests, pure, are computed beforehand on a tokenizer thread
(`input_keys`): a gRPC CHUNK call of 5-token windows has about 100,000 inputs, whose digests would hold the
event loop for 0.1-0.2 s.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np

from rerank_server.observability import Metrics
from rerank_server.tokenization import TokenizedPairs

# Python memory one entry holds: its key (a 20-byte bytes object), its float, the OrderedDict's slot
# and link node, and the hash table's spare and deleted slots. tracemalloc measured at most 214 bytes
# per entry under LRU churn (caches of 1 to 16 MiB filled twelve times over); 240 leaves room for the
# table's growth steps (tests/test_score_cache.py holds the bound in real memory).
ENTRY_BYTES = 240
_DIGEST_BYTES = 16
_SLOT_BYTES = 4


@dataclass(frozen=True)
class ModelKey:
    """What decides a logit besides the token ids: which model computes it, in which precision."""

    name: str  # the served model's name (Triton's)
    version: str  # Triton's version of it
    precision: str  # the precision it computes in
    export_id: str  # the export that wrote it ("" for a model exported without one)
    # Which serving of it (models.ServedModel): one served again after it was forgotten (unloaded and loaded
    # again) is a new key, while calls still holding the forgotten one find nothing cached and store nothing.
    serving: int = 0


@dataclass(frozen=True)
class Lookup:
    """A request's model inputs against the cache: their keys, the cached logits, what is left to compute."""

    keys: list[bytes]  # one per model input
    logits: np.ndarray  # float32 [inputs]: cached ones filled, the rest to be computed
    missing: np.ndarray  # indices of the inputs to compute, ascending
    slot: bytes = b""  # the model's number in the cache at the lookup


def input_keys(slot: bytes, pairs: TokenizedPairs) -> list[bytes]:
    """The cache keys of `pairs`' model inputs under the model numbered `slot` (ScoreCache.slot). Reads nothing
    of the cache: safe off the event loop."""
    data = pairs.input_ids.tobytes()
    keys = []
    start = 0
    for end in (np.cumsum(pairs.lengths, dtype=np.int64) * pairs.input_ids.itemsize).tolist():
        keys.append(slot + hashlib.blake2b(data[start:end], digest_size=_DIGEST_BYTES).digest())
        start = end
    return keys


class ScoreCache:
    """LRU logits by (model, token ids), bounded in bytes; hit, miss and eviction counts per model."""

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        # Each ModelKey gets a number that prefixes its keys, so entries of different models never meet.
        self._slots: dict[ModelKey, bytes] = {}
        self._names: dict[bytes, str] = {}
        self._retired: set[bytes] = set()  # the numbers of forgotten models

    @property
    def enabled(self) -> bool:
        return self.max_bytes >= ENTRY_BYTES

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def held_bytes(self) -> int:
        """The memory the cache's entries hold, as the bound counts it."""
        return len(self._entries) * ENTRY_BYTES

    def slot(self, model: ModelKey) -> bytes | None:
        """The number `model`'s keys start with (input_keys), or None when the cache is off."""
        return self._slot(model) if self.enabled else None

    def lookup(self, model: ModelKey, pairs: TokenizedPairs, keys: list[bytes] | None = None) -> Lookup:
        """The cached logits of `pairs`' inputs under `model`; a hit becomes the most recently used. `keys`:
        input_keys(self.slot(model), pairs), when computed beforehand."""
        count = pairs.lengths.size
        logits = np.empty(count, dtype=np.float32)
        if not self.enabled:
            return Lookup([], logits, np.arange(count))
        slot = self._slot(model)
        if keys is None:
            keys = input_keys(slot, pairs)
        missing = []
        get, used = self._entries.get, self._entries.move_to_end
        for i, key in enumerate(keys):
            logit = get(key)
            if logit is None:
                missing.append(i)
            else:
                used(key)
                logits[i] = logit
        self.metrics.cache_hits.labels(model=model.name).inc(count - len(missing))
        self.metrics.cache_misses.labels(model=model.name).inc(len(missing))
        return Lookup(keys, logits, np.array(missing, dtype=np.int64), slot)

    def store(self, lookup: Lookup, computed: np.ndarray) -> None:
        """Cache the logits computed for `lookup.missing`, forgetting the least recently used first, so that
        the bound holds at every moment; nothing when the model was forgotten since the lookup (a retired
        model's keys are never answered again, and would only take the place of live ones)."""
        if not self.enabled or lookup.slot in self._retired:
            return
        capacity = self.max_bytes // ENTRY_BYTES
        fresh: dict[bytes, float] = {}
        for index, logit in zip(lookup.missing.tolist(), computed.tolist(), strict=True):
            key = lookup.keys[index]
            if key in self._entries:  # stored meanwhile by a call that computed the same input
                self._entries[key] = logit
                self._entries.move_to_end(key)
            else:
                fresh[key] = logit
        # More new inputs than the whole cache holds: only the last `capacity` would stay, so only they go in;
        # the others count as evicted, as if stored and forgotten.
        evicted: Counter[bytes] = Counter()  # by model number: one metric update per model, not per entry
        skipped = list(fresh)[: max(0, len(fresh) - capacity)]
        for key in skipped:
            del fresh[key]
            evicted[key[:_SLOT_BYTES]] += 1
        for _ in range(len(self._entries) + len(fresh) - capacity):
            key, _logit = self._entries.popitem(last=False)
            evicted[key[:_SLOT_BYTES]] += 1
        for slot, count in evicted.items():
            self.metrics.cache_evictions.labels(model=self._names[slot]).inc(count)
        self._entries.update(fresh)
        self._report()

    def forget(self, model: ModelKey) -> None:
        """Drop every entry of `model` (it was unloaded or replaced): its memory is free at once."""
        # Its slot stays retired: a call that looks it up later (one in flight since before) finds nothing cached
        # and stores nothing.
        slot = self._slot(model)
        self._retired.add(slot)
        for key in [key for key in self._entries if key.startswith(slot)]:
            del self._entries[key]
        self._report()

    def _slot(self, model: ModelKey) -> bytes:
        slot = self._slots.get(model)
        if slot is None:
            # Never reused: a forgotten model's number stays retired, as its stray keys would match it.
            slot = (len(self._names)).to_bytes(_SLOT_BYTES, "little")
            self._slots[model] = slot
            self._names[slot] = model.name
        return slot

    def _report(self) -> None:
        self.metrics.cache_entries.set(len(self._entries))
        self.metrics.cache_bytes.set(self.held_bytes)
