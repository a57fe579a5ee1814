"""Starts the `tritonserver` shipped in the nvidia-pytriton wheel on a model repository.

The wheel carries the binary, its shared libraries (nvidia_pytriton.libs/), the Python backend and
one backend stub per Python version. The stub must match the interpreter whose packages the models
import (numpy, onnxruntime), so a backend folder is assembled with the stub of this interpreter and
Triton is started with a Python environment's bin/ first on PATH (this one's by default).

The stub embeds Python with the environment ignored (PYTHONPATH has no effect on it): it imports from
the environment whose `python3` comes first on PATH, so `python_env` is how another set of packages
reaches the model. `home` is a folder laid out like the wheel's subset (pytriton/tritonserver/...,
nvidia_pytriton.libs/), e.g. what `python -m bench.gpu_pack` carries to a machine without the wheel.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    libraries: Path
    python_backend: Path
    stub: Path

    @classmethod
    def find(cls, home: Path | None = None) -> TritonInstallation:
        """The wheel's Triton, or the one under `home` (the wheel's layout: home/pytriton/tritonserver)."""
        if home is not None:
            package = home.resolve() / "pytriton"
        else:
            # Located, not imported: only the wheel's files are used, not pytriton's Python API or its needs.
            spec = importlib.util.find_spec("pytriton")
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError(
                    "a local Triton needs the nvidia-pytriton wheel: pip install 'rerank-service[triton]', "
                    "or connect to a running Triton with --triton-url"
                )
            package = Path(next(iter(spec.submodule_search_locations))).resolve()
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=root / "bin" / "tritonserver",
            libraries=package.parent / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (found.binary, found.libraries, found.python_backend, found.stub):
            if not path.exists():
                raise RuntimeError(f"the Triton install at {package.parent} lacks {path} (Python {version})")
        return found

    def environment(self, python_env: Path | None = None) -> dict[str, str]:
        """Triton's environment; python_env: the Python environment (a venv's folder) whose packages the
        stub imports, by default this interpreter's. It must be a Python of this version."""
        env = dict(os.environ)
        # The stub links libpython3.X.so by name; without this it may find the system's, an older patch
        # release than this interpreter's, whose compiled modules (_ssl, imported by transformers) then
        # miss symbols. This interpreter's own library folder comes first.
        paths = [str(self.libraries), *_libpython_folders(), env.get("LD_LIBRARY_PATH")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, paths))
        # The stub embeds Python and imports from the environment found first on PATH: ours, or python_env.
        bin_dir = python_env / "bin" if python_env is not None else Path(sys.executable).parent
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
        if python_env is not None:
            env["VIRTUAL_ENV"] = str(python_env)
        else:
            env.setdefault("VIRTUAL_ENV", sys.prefix)
        return env

    def backend_directory(self, into: Path) -> Path:
        """A --backend-directory holding python/ with the backend and the stub of this interpreter.

        Made once: a restarted Triton reuses it (stubs of a killed one may still be running from it).
        """
        python = into / "python"
        if (python / self.stub.name).exists():
            return into
        python.mkdir(parents=True, exist_ok=True)
        for item in self.python_backend.iterdir():
            if item.is_file():
                shutil.copy2(item, python / item.name)
        shutil.copy2(self.stub, python / self.stub.name)
        return into


@dataclass(frozen=True)
class TritonPorts:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002


def ports_in_use(ports: dict[str, int], attempts: int = 3, pause_s: float = 1.0) -> list[str]:
    """Which of the named ports something on this host already listens on (each as "NAME PORT"), on IPv4 or
    IPv6. A port is reported only when it stays taken over `attempts` probes `pause_s` apart: a client
    connection can hold a port of the ephemeral range for a moment.

    tritonserver binds every interface; a port another server holds makes it exit at start, while the
    frontend, reaching "its" Triton at localhost, would find and serve through the other one."""
    for attempt in range(attempts):
        taken = [f"{name} {port}" for name, port in ports.items() if port_taken(port)]
        if not taken or attempt == attempts - 1:
            return taken
        time.sleep(pause_s)
    return []


def port_taken(port: int) -> bool:
    """Whether binding `port` on every IPv4 (and, where the host has it, IPv6) interface fails as in use.
    Other failures (no such family, a port the user may not bind) are left for tritonserver to report."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # SO_REUSEADDR: a port whose last server left connections in TIME_WAIT is free; a listener is not.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
    return False


class LocalTriton:
    """A tritonserver child process serving one model repository.

    Its models are under explicit model control: it loads `models` at start (None: every model of the
    repository), and Triton's model-control API (`POST /v2/repository/models/<name>/load` or `/unload`)
    loads, reloads and unloads models while it runs, which the frontend follows."""

    def __init__(
        self,
        model_repository: Path,
        ports: TritonPorts,
        log_path: Path | None = None,
        *,
        home: Path | None = None,
        python_env: Path | None = None,
        models: Sequence[str] | None = None,
    ) -> None:
        self.model_repository = model_repository.resolve()
        self.ports = ports
        self.models = None if models is None else tuple(models)
        self.home, self.python_env = home, python_env
        self._workdir = Path(tempfile.mkdtemp(prefix="rerank-triton-"))
        self.log_path = log_path or self._workdir / "tritonserver.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.ports.grpc}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start tritonserver (again, after it exited: same ports, same log file)."""
        if self._process is not None:
            # A crashed Triton can leave its Python-backend stubs behind in its process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        installation = TritonInstallation.find(self.home)
        command = [
            str(installation.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={installation.backend_directory(self._workdir / 'backends')}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-port={self.ports.http}",
            f"--metrics-port={self.ports.metrics}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in (self.models or ("*",))),
        ]
        log.info("starting tritonserver (log: %s)", self.log_path)
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                env=installation.environment(self.python_env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group: a Ctrl-C in the terminal reaches us, and we stop Triton in order.
                start_new_session=True,
            )

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def kill(self) -> None:
        """SIGKILL Triton and its stubs (its process group): for a Triton that no longer answers."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; returns Triton's exit code."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0fs; killing it", timeout_s)
                # Its whole process group: the Python-backend stubs with it.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process is not None:
            # Stubs of a Triton that died (killed, crashed) outlive it in its process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        # The work folder goes unless it holds the log (kept for a post-mortem).
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        if self.log_path.parent != self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return None if process is None else process.returncode


def _libpython_folders() -> list[str]:
    """Folders holding this interpreter's shared libpython (LIBDIR, or base_prefix/lib when LIBDIR is
    a build-time path, as in relocated builds); none for a static interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib")]
    found: list[str] = []
    for folder in filter(None, candidates):
        if folder not in found and any(Path(folder).glob(f"libpython{version}*.so*")):
            found.append(folder)
    return found


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
