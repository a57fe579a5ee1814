"""Shared fixtures: random-weight ModernBERT checkpoints, a model repository exported by `rerank
export` itself, and a real stack (tritonserver + frontend) started by `rerank serve`."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest

from bench.common import Progress
from bench.models import run_exports
from rerank_server.testing import TINY_CONFIG, free_port, save_random_checkpoint, wait_until_serving
from rerank_triton_model.runtimes import PACKED, TORCH
from tests import served_logs
from tests.tiers import COLLECTED_TIERS, LIST_TIERS_ENV, tier_lines

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "modernbert-tokenizer"
RERANK = [str(Path(sys.executable).parent / "rerank")]  # the console script users run

# A second shape the first never uses: other width, depth, window, global-layer spacing and pooling.
MEAN_POOLING_CONFIG = {
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
    "local_attention": 32,
    "global_attn_every_n_layers": 2,
    "classifier_pooling": "mean",
    "max_position_embeddings": 384,
}
# 8192-token inputs on a model small enough for CPU tests, with a token budget of two such inputs
# per model run, so long documents go through several sub-batches.
LONG_CONFIG = {**TINY_CONFIG, "max_position_embeddings": 8192, "local_attention": 64}
# The packed engine's served shape, unlike the others: odd head count, five layers with every fourth
# global, a window of 24 (12 each way).
PACKED_CONFIG: dict[str, object] = {
    "hidden_size": 80,
    "intermediate_size": 112,
    "num_hidden_layers": 5,
    "num_attention_heads": 5,
    "local_attention": 24,
    "global_attn_every_n_layers": 4,
    "max_position_embeddings": 512,
}


# How long reranker_held's batcher holds a call before running it (its --max-queue-delay-us).
HELD_S = 3.0


@dataclass(frozen=True)
class ModelSpec:
    config: dict[str, object]
    seed: int
    export_args: tuple[str, ...] = ()


MODELS = {
    "reranker": ModelSpec(TINY_CONFIG, 0),
    "reranker_mean": ModelSpec(MEAN_POOLING_CONFIG, 1),
    # 8192-token inputs, exported by default: pairs over LONG_PAIR_TOKENS run on the packed engine.
    "reranker_long": ModelSpec(LONG_CONFIG, 2, ("--max-batch-tokens", "16384")),
    # The same, with each batch held HELD_S in Triton's dynamic-batcher queue before it runs: calls that
    # stay in flight for seconds on any CPU (the tests of drain, overload, deadlines and connection age)
    # while the CPU stays free for the tests beside them. Seconds of real work per call (8192-token pairs
    # through the dense graph) cost those tests about 100 s of CPU on 2 cores.
    "reranker_held": ModelSpec(
        LONG_CONFIG, 2, ("--max-batch-tokens", "16384", "--max-queue-delay-us", f"{HELD_S * 1e6:.0f}")
    ),
    # reranker_mean's weights (same shape and seed) run by PyTorch inside Triton instead of ONNX Runtime.
    "reranker_torch": ModelSpec(MEAN_POOLING_CONFIG, 1, ("--runtime", TORCH.name)),
    # The packed (unpadded) engine, with a small token budget so that requests run as several packed runs.
    "reranker_packed": ModelSpec(PACKED_CONFIG, 3, ("--runtime", PACKED.name, "--max-batch-tokens", "600")),
    # reranker_long's weights in the packed engine: one 8192-token pair per run.
    "reranker_long_packed": ModelSpec(LONG_CONFIG, 2, ("--runtime", PACKED.name, "--max-batch-tokens", "8192")),
}


def run_rerank(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `rerank` command line as a user would."""
    return subprocess.run([*RERANK, *args], capture_output=True, text=True, timeout=timeout)


def provenance(model_dir: Path) -> dict[str, Any]:
    """export.json of a model folder `rerank export` wrote."""
    return cast(dict[str, Any], json.loads((model_dir / "1" / "export.json").read_text()))


def edit_head(checkpoint: Path, edit: Callable[[Any], None]) -> None:
    """Apply `edit` to the checkpoint's scoring head (transformers' `classifier` Linear), without autograd,
    and save the checkpoint again: logits of another scale or offset than a random checkpoint's."""
    import torch
    from transformers import ModernBertForSequenceClassification

    model = ModernBertForSequenceClassification.from_pretrained(checkpoint)
    with torch.no_grad():
        edit(model.classifier)
    model.save_pretrained(checkpoint)


def export_all(exports: list[list[str]], at_once: int = 3) -> None:
    """`rerank export` with each argument list, `at_once` at a time, as the benchmarks run them
    (bench.models.run_exports), without their progress lines; raises with a failure's output."""
    run_exports(exports, Progress(0, enabled=False), at_once)


F = TypeVar("F", bound=Callable[..., Any])

# Fixtures that export models or start Triton; only tests marked e2e may use them (checked at collection).
E2E_FIXTURES: set[str] = set()


def e2e_fixture(**kwargs: Any) -> Callable[[F], F]:
    """pytest.fixture for the end-to-end tier: records the fixture's name in E2E_FIXTURES."""

    def register(function: F) -> F:
        E2E_FIXTURES.add(function.__name__)
        return cast(F, pytest.fixture(**kwargs)(function))

    return register


# Set by `make test` and `make test-e2e` to a folder of their own (removed when they end): their pytest
# processes build the session's checkpoints and model repository there once, and read them after that.
SHARE_ENV = "RERANK_TEST_SHARE"


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder `build` fills, which tests only read. Under SHARE_ENV the first pytest process to need it
    builds it while the others wait on a lock, and then they all read the same one (the end-to-end
    processes of one `make test` export the session's models once instead of once each); without it, a
    folder of this session's own."""
    share = os.environ.get(SHARE_ENV)
    if not share:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder, built = Path(share) / name, Path(share) / f"{name}.built"
    with open(Path(share) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not built.exists():  # first, or the one before failed part way
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


@e2e_fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    def build(root: Path) -> None:
        for name, model in MODELS.items():
            save_random_checkpoint(root / name, TOKENIZER_DIR, seed=model.seed, **model.config)

    root = built_once(tmp_path_factory, "checkpoints", build)
    return {name: root / name for name in MODELS}


@e2e_fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    def build(repository: Path) -> None:
        exports = []
        for name, checkpoint in checkpoints.items():
            # fp32: the tests hold the served logits to eager's at fp32 tolerances; the CPU-dependent
            # choice of the default (auto) has its own tests (test_precision.py).
            args = MODELS[name].export_args
            precision = () if "--runtime" in args or "--precision" in args else ("--precision", "fp32")
            exports.append(["--model", str(checkpoint), "--output", str(repository), "--name", name, *args, *precision])
        export_all(exports)

    return built_once(tmp_path_factory, "model_repository", build)


@dataclass
class Stack:
    """A running `rerank serve`: its frontend target, the Triton it uses, and what it printed.

    Its output goes to a file, never a pipe: a pipe nobody reads fills up and blocks the server.
    """

    process: subprocess.Popen[bytes]
    target: str
    triton_url: str
    log_path: Path
    triton_metrics_url: str | None = None
    metrics_url: str | None = None
    http_url: str | None = None  # the HTTP/JSON frontend (http_api), e.g. http://127.0.0.1:PORT
    triton_log: Path | None = None

    @property
    def output(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines(keepends=True)

    def printed(self, prefix: str, timeout_s: float = 10) -> str:
        """The first line printed that starts with prefix, waiting up to timeout_s for it (readiness comes
        from the health service, so start-up lines may still be on their way)."""
        deadline = time.monotonic() + timeout_s
        while True:
            line = next((line for line in self.output if line.startswith(prefix)), None)
            if line is not None:
                return line
            assert time.monotonic() < deadline, f"no line starting {prefix!r} in:\n" + "".join(self.output[-30:])
            time.sleep(0.1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The logs of every `rerank serve` (and its Triton) the tests started: removed when the session
    passes, kept (and named) when it fails."""
    folder = served_logs.made()
    if folder is None:
        return
    if exitstatus == 0:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"\nrerank serve and Triton logs: {folder}")


def _flag(args: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)


def start_serve(
    args: list[str],
    timeout_s: float = 240,
    credentials: grpc.ChannelCredentials | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Stack:
    """Start `rerank serve` and wait until its health service says SERVING, as a readiness probe would:
    on --health-port when given (plaintext), else on the API port, over TLS with `credentials`.
    `preexec_fn` runs in the child before `rerank` starts (to set resource limits, say)."""
    if _flag(args, "tls-cert-file") and credentials is None and _flag(args, "health-port") is None:
        raise ValueError("a TLS frontend's readiness needs credentials= or a plaintext --health-port")
    port = free_port()
    if _flag(args, "metrics-port") is None:
        args = [*args, f"--metrics-port={free_port()}"]
    if _flag(args, "http-port") is None:  # a free port each: several frontends run at once
        args = [*args, f"--http-port={free_port()}"]
    command = [*RERANK, "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = Path(tempfile.mkstemp(prefix="rerank-serve-", suffix=".log", dir=served_logs.log_dir())[1])
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)
    host = _flag(args, "host") or "127.0.0.1"
    triton_metrics = _flag(args, "triton-metrics-port")
    stack = Stack(
        process,
        f"{host}:{_flag(args, 'port') or port}",
        _flag(args, "triton-url") or f"localhost:{_flag(args, 'triton-grpc-port')}",
        log_path,
        f"http://localhost:{triton_metrics}/metrics" if triton_metrics else None,
        f"http://{host}:{_flag(args, 'metrics-port')}/metrics",
        f"http://{host}:{_flag(args, 'http-port')}" if _flag(args, "http-port") != "0" else None,
    )
    health_port = _flag(args, "health-port")
    if health_port is not None:
        ready = wait_until_serving(f"{host}:{health_port}", process, timeout_s)
    else:
        ready = wait_until_serving(stack.target, process, timeout_s, credentials)
    if not ready:
        process.kill()
        process.wait(30)
        raise RuntimeError("rerank serve did not start:\n" + "".join(stack.output))
    return stack


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    """Polls `condition` every 20 ms until it holds; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.02)


def one_model_repository(model_repository: Path, folder: Path, name: str = "reranker") -> Path:
    """A repository of one of model_repository's models (linked, not copied): a Triton serving it starts and
    restarts in seconds."""
    folder.mkdir()
    (folder / name).symlink_to(model_repository / name, target_is_directory=True)
    return folder


def start_local(repository: Path, *args: str) -> Stack:
    """`rerank serve` starting its own Triton on free ports, serving `repository`."""
    ports = [f"--triton-{kind}-port={free_port()}" for kind in ("grpc", "http", "metrics")]
    if _flag(list(args), "triton-log") is None:
        ports.append(f"--triton-log={tempfile.mkstemp(prefix='triton-', suffix='.log', dir=served_logs.log_dir())[1]}")
    return start_serve([f"--model-repository={repository}", *ports, *args])


def stop_serve_later(stack: Stack) -> None:
    """SIGTERM now; its exit code (0: a clean shutdown) is asserted when the session ends. A local Triton
    takes seconds to unload its models, which the next test need not wait for."""
    stack.process.terminate()
    served_logs.STOPPING.append(stack)


@pytest.fixture(scope="session", autouse=True)
def stopped_cleanly() -> Iterator[None]:
    """Every stack stopped with stop_serve_later exited 0."""
    yield
    failures = []
    for stack in served_logs.STOPPING:
        try:
            code = stack.process.wait(60)
        except subprocess.TimeoutExpired:
            stack.process.kill()
            code = None
        if code != 0:
            failures.append(f"{stack.target} exited with {code}:\n" + "".join(stack.output[-30:]))
    assert not failures, "\n\n".join(failures)


# A stop slower than this is reported (pytest's warnings summary) with the server's last lines: it costs the
# suite's time and may be a shutdown waiting on something it should not.
SLOW_STOP_S = 10


def stop_serve(stack: Stack, timeout_s: float = 60) -> int:
    started = time.monotonic()
    stack.process.terminate()
    try:
        return stack.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        raise
    finally:
        took = time.monotonic() - started
        if took > SLOW_STOP_S:
            warnings.warn(f"{stack.target} took {took:.0f} s to stop:\n" + "".join(stack.output[-15:]), stacklevel=2)


@e2e_fixture(scope="session")
def stack(model_repository: Path) -> Iterator[Stack]:
    """`rerank serve` with a local Triton, serving every model of the repository; `reranker` (first by name) is
    the default."""
    served = start_local(model_repository)
    yield served
    code = stop_serve(served)
    assert code == 0, "".join(served.output[-30:])


@contextmanager
def frontend(
    stack: Stack,
    model_repository: Path,
    *args: str,
    credentials: grpc.ChannelCredentials | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[Stack]:
    """Another frontend on the stack's Triton (--triton-url), with its own settings (`credentials`,
    `preexec_fn`: see start_serve)."""
    served = start_serve(
        [f"--triton-url={stack.triton_url}", f"--model-repository={model_repository}", *args],
        credentials=credentials,
        preexec_fn=preexec_fn,
    )
    served.triton_metrics_url = stack.triton_metrics_url
    try:
        yield served
    finally:
        assert stop_serve(served) == 0, "".join(served.output[-30:])


@e2e_fixture(scope="session")
def mean_stack(stack: Stack, model_repository: Path) -> Iterator[Stack]:
    """A second frontend fronting `reranker_mean`: another model shape, through --triton-url."""
    with frontend(stack, model_repository, "--model-name=reranker_mean") as served:
        yield served


@e2e_fixture(scope="session")
def torch_stack(stack: Stack, model_repository: Path) -> Iterator[Stack]:
    """A frontend fronting `reranker_torch`: the model computed by PyTorch inside Triton."""
    with frontend(stack, model_repository, "--model-name=reranker_torch") as served:
        yield served


@e2e_fixture(scope="session")
def packed_stack(stack: Stack, model_repository: Path) -> Iterator[Stack]:
    """A frontend fronting `reranker_packed`: the packed engine inside Triton."""
    with frontend(stack, model_repository, "--model-name=reranker_packed") as served:
        yield served


@e2e_fixture(scope="session")
def numpy2_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python environment (a venv's layout) in which numpy>=2 shadows this venv's numpy 1, this venv's
    packages coming after it. Triton's backend stub ignores PYTHONPATH (it embeds Python with the
    environment ignored), so this reaches the model through `rerank serve --triton-python-env`."""
    root = tmp_path_factory.mktemp("numpy2-env")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = root / "lib" / version / "site-packages"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), "numpy>=2.3,<3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    # The venv's site folder after numpy 2, with its own .pth files (editable installs) processed.
    (site / "zz-this-venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    (root / "bin").mkdir()
    (root / "bin" / "python3").symlink_to(os.path.realpath(sys.executable))
    shutil.copy2(Path(sys.prefix) / "pyvenv.cfg", root / "pyvenv.cfg")
    return root


@e2e_fixture(scope="session")
def numpy2_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model per runtime (onnxruntime, torch, packed), for a Triton running them under numpy 2."""
    repository = tmp_path_factory.mktemp("numpy2-repository")
    for name in ("reranker", "reranker_torch", "reranker_packed"):
        shutil.copytree(model_repository / name, repository / name)
    return repository


@e2e_fixture(scope="session")
def numpy2_stack(numpy2_env: Path, numpy2_repository: Path) -> Iterator[Stack]:
    """`rerank serve` whose Triton runs numpy2_repository's models under numpy 2, fronting `reranker`;
    its Triton log is stack.triton_log."""
    repository = numpy2_repository
    triton_log = repository.parent / "numpy2-triton.log"
    served = start_local(repository, f"--triton-python-env={numpy2_env}", f"--triton-log={triton_log}")
    served.triton_log = triton_log
    yield served
    stop_serve_later(served)


@e2e_fixture(scope="session")
def long_stack(stack: Stack, model_repository: Path) -> Iterator[Stack]:
    """A frontend fronting `reranker_long` (8192-token inputs, 16384-token budget per model run)."""
    with frontend(stack, model_repository, "--model-name=reranker_long") as served:
        yield served


def pytest_collection_finish(session: pytest.Session) -> None:
    listing = os.environ.get(LIST_TIERS_ENV)
    if listing:
        Path(listing).write_text("".join(f"{line}\n" for line in tier_lines(session.items)))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked and listed
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test declares its tier: `pytestmark = pytest.mark.e2e` in an end-to-end module, or
    `@pytest.mark.e2e` on one test; `make test-fast` runs the rest (`-m "not e2e"`). A test that declares
    the fast tier but needs an exported model or Triton (an `e2e_fixture`, directly or through another
    fixture) is a collection error, so a tier cannot be wrong silently."""
    misplaced = [
        f"{item.nodeid} (uses {', '.join(sorted(E2E_FIXTURES & set(item.fixturenames)))})"
        for item in items
        if isinstance(item, pytest.Function)
        and not item.get_closest_marker("e2e")
        and E2E_FIXTURES & set(item.fixturenames)
    ]
    config.stash[COLLECTED_TIERS] = tier_lines(items)
    if misplaced:
        raise pytest.UsageError(
            "tests that need an exported model or Triton must be marked e2e (pytestmark = pytest.mark.e2e, or"
            " @pytest.mark.e2e):\n  " + "\n  ".join(misplaced)
        )
