"""The served set of models (fast tier): lookup by name, the default, and how ModelSync follows Triton's
repository index, over a stand-in of Triton's index. tests/test_models.py has the same on a real Triton."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from rerank_server.errors import BackendUnavailableError, ErrorCode, ServiceError
from rerank_server.models import ModelSync, ServedModel, ServedModels
from rerank_server.tokenization import PairTokenizer
from rerank_server.triton_backend import ModelInfo, RepositoryModel
from tests.conftest import TOKENIZER_DIR
from tests.fakes import MODEL, FakeBackend

TOKENIZER = PairTokenizer.from_dir(TOKENIZER_DIR, 64)


def info(name: str, export_id: str = "e1") -> ModelInfo:
    return dataclasses.replace(MODEL, name=name, source_model=f"checkpoint-{name}", export_id=export_id)


def served(name: str, export_id: str = "e1") -> ServedModel:
    return ServedModel(info(name, export_id), TOKENIZER, FakeBackend())


@dataclass
class FakeTriton:
    """What ModelSync reads of Triton: readiness, the repository index, each model's configuration."""

    index: list[RepositoryModel] = field(default_factory=list)
    configs: dict[str, ModelInfo] = field(default_factory=dict)
    up: bool = True

    def state(self, name: str, state: str, reason: str = "", export_id: str = "e1") -> None:
        self.index = [m for m in self.index if m.name != name] + [RepositoryModel(name, "1", state, reason)]
        self.configs[name] = info(name, export_id)

    async def is_ready(self) -> bool:
        return self.up and not any(m.state == "LOADING" for m in self.index)

    async def repository(self) -> list[RepositoryModel]:
        if not self.up:
            raise BackendUnavailableError("the model server is unavailable")
        return sorted(self.index, key=lambda m: m.name)

    def backend(self, name: str) -> FakeTriton._Model:
        return FakeTriton._Model(self, name)

    @dataclass
    class _Model:
        triton: FakeTriton
        name: str

        async def model_info(self, version: str | None = None) -> ModelInfo:
            return self.triton.configs[self.name]


async def load(model: ModelInfo) -> ServedModel:
    return ServedModel(model, TOKENIZER, FakeBackend())


def sync(triton: FakeTriton, names: tuple[str, ...] | None = None) -> ModelSync:
    return ModelSync(triton, load, names)  # type: ignore[arg-type]


def test_a_request_gets_its_model_or_the_default_and_another_name_is_not_found() -> None:
    models = ServedModels([served("beta"), served("alpha")], default="beta")
    assert models.names() == ["alpha", "beta"]
    assert models.get("").name == "beta" and models.get("alpha").name == "alpha"
    with pytest.raises(ServiceError) as caught:
        models.get("gamma")
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert caught.value.violations == [("model", "'gamma' is not served here; the served models are alpha, beta")]
    models.remove("beta")
    with pytest.raises(ServiceError, match="the default model 'beta' is not loaded; name one of"):
        models.get("")
    with pytest.raises(ValueError, match="not among the served models"):
        ServedModels([served("alpha")], default="beta")


async def test_discovery_waits_for_triton_then_serves_every_ready_model() -> None:
    triton = FakeTriton()
    triton.state("alpha", "READY")
    triton.state("beta", "LOADING")
    assert await sync(triton).discover() == []
    triton.state("beta", "READY")
    triton.state("never", "")
    assert [m.name for m in await sync(triton).discover()] == ["alpha", "beta"]
    assert [m.name for m in await sync(triton, ("beta",)).discover()] == ["beta"]
    assert await sync(triton, ("beta", "gamma")).discover() == []  # a named model is not there yet
    triton.up = False
    assert await sync(triton).discover() == []


async def test_refresh_follows_loads_reloads_unloads_and_outages() -> None:
    triton = FakeTriton()
    triton.state("alpha", "READY")
    follower = sync(triton)
    models = ServedModels(await follower.discover(), default="alpha")

    triton.state("beta", "READY")  # loaded through model control while serving
    assert await follower.refresh(models) == []
    assert models.names() == ["alpha", "beta"] and models.all_ready()

    old_alpha = models.get("alpha")
    triton.state("alpha", "READY", export_id="e2")  # re-exported and loaded again
    assert await follower.refresh(models) == [old_alpha]
    assert models.get("alpha").info.export_id == "e2"

    beta = models.get("beta")
    triton.state("beta", "UNAVAILABLE", "unloaded")
    assert await follower.refresh(models) == [beta]
    assert models.names() == ["alpha"]

    triton.state("alpha", "UNAVAILABLE", "the stub process died")  # failed, not unloaded: served, not ready
    await follower.refresh(models)
    assert models.names() == ["alpha"] and not models.all_ready()
    triton.state("alpha", "READY", export_id="e2")
    await follower.refresh(models)
    assert models.all_ready()

    triton.up = False
    await follower.refresh(models)
    assert models.names() == ["alpha"] and not models.is_ready("alpha")


async def test_named_models_are_never_dropped_only_not_ready() -> None:
    triton = FakeTriton()
    triton.state("alpha", "READY")
    triton.state("beta", "READY")
    follower = sync(triton, ("alpha",))
    models = ServedModels(await follower.discover(), default="alpha")
    triton.state("alpha", "UNAVAILABLE", "unloaded")
    await follower.refresh(models)
    assert models.names() == ["alpha"] and not models.all_ready()
    await follower.refresh(models)
    assert "beta" not in models.names()


async def test_a_model_whose_tokenizer_cannot_be_read_is_not_served_until_it_can() -> None:
    triton = FakeTriton()
    triton.state("alpha", "READY")
    follower = sync(triton)
    models = ServedModels(await follower.discover(), default="alpha")
    broken = {"beta"}

    async def loader(model: ModelInfo) -> ServedModel:
        if model.name in broken:
            raise FileNotFoundError("tokenizer.json")
        return await load(model)

    follower.loader = loader
    triton.state("beta", "READY")
    await follower.refresh(models)
    assert models.names() == ["alpha"]
    broken.clear()
    await follower.refresh(models)
    assert models.names() == ["alpha", "beta"]
