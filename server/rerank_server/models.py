"""The models a frontend serves, by name: each with its own tokenizer, maximum length, precision and
backend, and one of them the default (what a request naming no model gets).

The set follows Triton. `ModelSync.refresh` (run at start and then every --health-interval-s) reads
Triton's repository index: a model that became ready is served from then on (its configuration read,
its tokenizer loaded), a model whose configuration changed (a re-export loaded again) is replaced, and
a model unloaded through Triton's model control stops being served (NOT_FOUND). With --model-name the
set is the names given: they are never dropped, only marked not ready. A model that fails (its Triton
instance died, Triton is down) stays served and not ready: calls get UNAVAILABLE, not NOT_FOUND.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from rerank_server.errors import BackendUnavailableError, ModelNotFoundError, field_error, shown
from rerank_server.score_cache import ModelKey
from rerank_server.tokenization import PairTokenizer
from rerank_server.triton_backend import ModelInfo, ScoringBackend, TritonServer
from rerank_triton_model import package_digest

log = logging.getLogger(__name__)
_SERVINGS = itertools.count(1)


@dataclass(frozen=True)
class ServedModel:
    """One served model: what Triton says of it, its tokenizer and the backend that scores on it."""

    info: ModelInfo
    tokenizer: PairTokenizer
    backend: ScoringBackend
    serving: int = field(default_factory=lambda: next(_SERVINGS))  # this serving of it, for its cache key

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def cache_key(self) -> ModelKey:
        return ModelKey(self.info.name, self.info.version, self.info.precision, self.info.export_id, self.serving)


class ServedModels:
    """The served models by name, the default one, and which are ready; used from the event loop only."""

    def __init__(self, models: Iterable[ServedModel], default: str) -> None:
        self._models = {model.name: model for model in models}
        self._ready = dict.fromkeys(self._models, True)
        if default not in self._models:
            raise ValueError(f"the default model {default!r} is not among the served models {self.names()}")
        self.default = default

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> ServedModel:
        """The model a request names ("": the default one); NOT_FOUND names the served ones."""
        model = self._models.get(name or self.default)
        if model is not None:
            return model
        if name:
            description = f"{shown(name)} is not served here; the served models are {', '.join(self.names())}"
        else:
            description = f"the default model {self.default!r} is not loaded; name one of {', '.join(self.names())}"
        raise field_error(ModelNotFoundError, "model", description)

    def for_client(self, name: str) -> str:
        """The name to serve an HTTP request naming `name` with: `name` itself, or "" (the default) when it is
        not served and exactly one model is. The vendors' clients insist on a model name and send their own
        vendor's (LangChain's Cohere ranker: "rerank-v3.5"); with one model there is no other they could
        mean, so moving to this service stays a base-URL change. With several, an unknown name is NOT_FOUND."""
        if name and name not in self._models and len(self._models) == 1:
            return ""
        return name

    def find(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def is_ready(self, name: str) -> bool:
        return self._ready.get(name, False)

    def all_ready(self) -> bool:
        """Every served model can answer (and there is one): the server's readiness."""
        return bool(self._ready) and all(self._ready.values())

    def put(self, model: ServedModel) -> ServedModel | None:
        """Serve `model` (ready), replacing the one of its name; returns the replaced one."""
        previous = self._models.get(model.name)
        self._models[model.name] = model
        self._ready[model.name] = True
        return previous

    def remove(self, name: str) -> ServedModel | None:
        self._ready.pop(name, None)
        return self._models.pop(name, None)

    def set_ready(self, name: str, ready: bool) -> None:
        if name in self._models:
            self._ready[name] = ready

    def set_all_ready(self, ready: bool) -> None:
        for name in self._ready:
            self._ready[name] = ready


# Builds the ServedModel of a ready model from what Triton says of it (the app reads its tokenizer).
Loader = Callable[[ModelInfo], Awaitable[ServedModel]]


class ModelSync:
    """Keeps a ServedModels in step with Triton's repository (see the module's docstring)."""

    def __init__(
        self,
        server: TritonServer,
        loader: Loader,
        names: Sequence[str] | None = None,
    ) -> None:
        self.server = server
        self.loader = loader
        self.names = None if names is None else tuple(names)  # None: whatever Triton has loaded

    async def discover(self) -> list[ServedModel]:
        """The models to serve now: the named ones once all are ready, else every ready one once Triton
        has loaded what it loads at start; [] to wait."""
        try:
            if self.names is None and not await self.server.is_ready():
                return []
            index = await self.server.repository()
        except BackendUnavailableError:
            return []
        ready = {entry.name: entry for entry in index if entry.ready}
        wanted = self.names if self.names is not None else tuple(ready)
        if not wanted or any(name not in ready for name in wanted):
            return []
        return [await self._load(ready[name].name, ready[name].version) for name in wanted]

    async def refresh(self, models: ServedModels) -> list[ServedModel]:
        """One look at Triton's repository: serve what became ready or changed, drop what was unloaded.
        Returns the models replaced or dropped (the score cache forgets them)."""
        retired: list[ServedModel] = []
        try:
            index = {entry.name: entry for entry in await self.server.repository()}
        except BackendUnavailableError:
            models.set_all_ready(False)
            return retired
        names = self.names if self.names is not None else tuple(sorted(set(index) | set(models.names())))
        for name in names:
            entry = index.get(name)
            current = models.find(name)
            if entry is not None and entry.ready:
                try:
                    info = await self.server.backend(name).model_info(entry.version)
                except Exception:  # it is being unloaded, or Triton just went away: look again next time
                    log.debug("model %r: reading its configuration failed", name, exc_info=True)
                    models.set_ready(name, False)
                    continue
                if current is not None and current.info == info:
                    models.set_ready(name, True)
                    continue
                try:
                    model = await self._serve(info)
                except Exception:  # its tokenizer cannot be read: not served in this form; try again next time
                    log.exception("model %r is ready in Triton but cannot be served", name)
                    models.set_ready(name, False)
                    continue
                replaced = models.put(model)
                log.info(
                    "model %s %s (%s, %s)", name, "reloaded" if replaced else "served", info.precision, info.version
                )
                if replaced is not None:
                    retired.append(replaced)
            elif current is not None and self.names is None and (entry is None or entry.unloaded):
                models.remove(name)
                log.info("model %s unloaded: no longer served", name)
                retired.append(current)
            else:
                models.set_ready(name, False)
        return retired

    async def _load(self, name: str, version: str) -> ServedModel:
        return await self._serve(await self.server.backend(name).model_info(version))

    async def _serve(self, info: ModelInfo) -> ServedModel:
        if info.package_digest != package_digest():
            # Triton runs the model code the export copied, not this version's: it may lack fixes or
            # disagree with this frontend. Served all the same (the contract checks still hold).
            log.warning(
                "model %s was exported by another version of this service (model code %s; this version's %s): "
                "export it again to serve this version's model code",
                info.name,
                info.package_digest or "unrecorded",
                package_digest(),
            )
        return await self.loader(info)
