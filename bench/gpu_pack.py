"""What the GPU check carries to a machine with no package index, and how it runs there.

    python -m bench.gpu_pack pack --output artifacts/gpu-pack        # here (the project's venv)
    python3 -m bench.gpu_pack run artifacts/gpu-pack -- --output DIR # there: bench.gpu's arguments after --

`pack` writes, under 64 MiB in all (asserted):
    triton.tar.xz   the subset of the nvidia-pytriton wheel that serves a Python-backend model, in the
                    wheel's layout (pytriton/tritonserver/{bin/tritonserver, backends/python,
                    python_backend_stubs/<X.Y>/...}, nvidia_pytriton.libs/ with only the libraries they
                    link), stripped
    project.tar.xz  the project's sources (client, server, bench, the tokenizer fixture)
    wheels/         wheels (--no-deps) of what the frontend and the benchmark import, for --python's first
                    version; `run` uses one only where the machine lacks the package or has it too old
    manifest.json   sizes, versions, files

`run` (stdlib only, so it runs on a bare Python) unpacks into --workdir, makes a Python environment
there (a venv's layout over the running interpreter's packages, plus the project and the wheels it
needs), and runs `python -m bench.gpu` in it with RERANK_TRITON_HOME set to the unpacked Triton: the
frontend (`rerank serve`) starts that Triton, whose backend stub imports from this environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20  # what the device machine accepts in all
# Project folders that travel (tracked and untracked-not-ignored files).
PROJECT_PATHS = (
    "client/rerank_client",
    "server/rerank_server",
    "server/rerank_triton_model",
    "bench",
    "tests/fixtures",
)
# Wheels for the frontend, the served path's client and the benchmark: (requirement, module, least version).
WHEELS = (
    ("grpcio==1.81.1", "grpc", "1.81.1"),
    ("grpcio-health-checking==1.81.1", "grpc_health", None),
    ("grpcio-reflection==1.81.1", "grpc_reflection", None),
    ("grpcio-status==1.81.1", "grpc_status", None),
    ("protobuf==6.33.6", "google.protobuf", "6.33.5"),  # the committed stubs need this runtime
    ("googleapis-common-protos==1.76.0", "google.rpc", None),
    ("tritonclient==2.73.0", "tritonclient", None),
    ("python-rapidjson==1.25", "rapidjson", None),
    ("ml-dtypes==0.6.0", "ml_dtypes", None),  # tritonclient.utils imports it
    ("urllib3==2.8.0", "urllib3", None),
    ("prometheus-client==0.26.0", "prometheus_client", None),
    ("opentelemetry-api==1.45.2", "opentelemetry", None),
    ("importlib-metadata==8.7.1", "importlib_metadata", None),
    ("zipp==3.23.0", "zipp", None),
    ("typing-extensions==4.15.0", "typing_extensions", "4.14.1"),
    ("psutil==7.2.2", "psutil", None),
    # The HTTP/JSON frontend (FastAPI on uvicorn), imported by `rerank serve`.
    ("fastapi==0.165.0", "fastapi", "0.115"),
    ("starlette==1.10.0", "starlette", "0.40"),
    ("pydantic==2.14.4", "pydantic", "2.14.4"),
    ("pydantic-core==2.50.5", "pydantic_core", "2.50.5"),  # exactly the one pydantic 2.14.4 needs
    ("typing-inspection==0.4.5", "typing_inspection", None),
    ("annotated-types==0.8.0", "annotated_types", None),
    ("annotated-doc==0.0.7", "annotated_doc", None),
    ("uvicorn==0.54.0", "uvicorn", "0.30"),
    ("h11==0.16.0", "h11", None),
    ("click==8.5.1", "click", "8.0"),
    ("anyio==4.16.0", "anyio", "4.0"),
    ("sniffio==1.3.1", "sniffio", None),
    ("idna==3.20", "idna", None),
    # The PNG (about 24 MB of the pack; used only where matplotlib is missing).
    ("matplotlib==3.11.2", "matplotlib", None),
    ("pillow==13.0.0", "PIL", None),
    ("kiwisolver==1.5.1", "kiwisolver", None),
    ("fonttools==4.68.0", "fontTools", None),
    ("contourpy==1.4.0", "contourpy", None),
    ("cycler==0.12.1", "cycler", None),
    ("pyparsing==3.3.3", "pyparsing", None),
    ("python-dateutil==4.0.0", "dateutil", None),
    ("six==1.17.0", "six", None),
    ("packaging==26.4", "packaging", None),
)
# Carried as their pure-Python wheels, a fraction of the compiled ones' size (fonttools: 1.2 MB, not 5.4).
PURE_WHEELS = ("fonttools",)
DISTRIBUTIONS = {"google.protobuf": "protobuf", "grpc": "grpcio", "pydantic_core": "pydantic-core"}


def needed_libraries(binaries: list[Path], libraries: Path) -> list[Path]:
    """The files of `libraries` that these binaries load, directly or through each other (ldd)."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(libraries))
    found: set[str] = set()
    for binary in binaries:
        listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
        for line in listing.splitlines():
            match = re.match(r"\s*(\S+) => (\S+)", line)
            if match and Path(match.group(2)).parent.resolve() == libraries.resolve():
                found.add(match.group(1))
    return sorted(libraries / name for name in found)


def triton_files(python_versions: list[str]) -> dict[str, Path]:
    """Archive name -> file of the installed wheel: the binary, the Python backend, the stubs, their libraries."""
    import pytriton  # located only: its files are what travel

    package = Path(next(iter(pytriton.__path__))).resolve()
    server = package / "tritonserver"
    files = {
        "pytriton/tritonserver/bin/tritonserver": server / "bin" / "tritonserver",
        **{
            f"pytriton/tritonserver/backends/python/{f.name}": f
            for f in (server / "backends" / "python").iterdir()
            if f.is_file()
        },
    }
    for version in python_versions:
        stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise SystemExit(f"the wheel has no backend stub for Python {version}")
        files[f"pytriton/tritonserver/python_backend_stubs/{version}/{stub.name}"] = stub
    libraries = package.parent / "nvidia_pytriton.libs"
    binaries = [p for name, p in files.items() if not name.endswith(".py")]
    for library in needed_libraries(binaries, libraries):
        files[f"nvidia_pytriton.libs/{library.name}"] = library
    return files


def write_triton(output: Path, python_versions: list[str], preset: int = 6) -> int:
    """triton.tar.xz with stripped copies; returns the number of files."""
    files = triton_files(python_versions)
    with tempfile.TemporaryDirectory() as temporary, tarfile.open(output, "w:xz", preset=preset) as archive:  # type: ignore[call-overload]  # preset: any int 0-9
        for name, source in sorted(files.items()):
            copy = Path(temporary) / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
            if not name.endswith(".py"):
                subprocess.run(["strip", "--strip-unneeded", str(copy)], check=True, capture_output=True)
            archive.add(copy, arcname=name)
    return len(files)


def project_files() -> list[str]:
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *PROJECT_PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted({name for name in listing if (ROOT / name).is_file() and "__pycache__" not in name})


def write_project(output: Path) -> int:
    names = project_files()
    with tarfile.open(output, "w:xz", preset=6) as archive:
        for name in names:
            archive.add(ROOT / name, arcname=name)
    return len(names)


def download_wheels(into: Path, python_version: str) -> list[str]:
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--dest", str(into)]
    pure = [r for r, _, _ in WHEELS if r.split("==")[0] in PURE_WHEELS]
    compiled = [r for r, _, _ in WHEELS if r not in pure]
    subprocess.run([*command, "--platform", "any", "--implementation", "py", *pure], check=True)
    command += ["--implementation", "cp"]
    for platform in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"):
        command += ["--platform", platform]
    subprocess.run([*command, *compiled], check=True)
    return sorted(p.name for p in into.glob("*.whl"))


def pack(output: Path, python_versions: list[str], wheels: bool, preset: int = 6) -> dict[str, object]:
    """Write the pack; raises SystemExit when it exceeds LIMIT_BYTES."""
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    manifest: dict[str, object] = {"python_versions": python_versions}
    manifest["triton_files"] = write_triton(output / "triton.tar.xz", python_versions, preset)
    manifest["project_files"] = write_project(output / "project.tar.xz")
    manifest["wheels"] = download_wheels(output / "wheels", python_versions[0]) if wheels else []
    sizes = {str(p.relative_to(output)): p.stat().st_size for p in sorted(output.rglob("*")) if p.is_file()}
    manifest["bytes"] = sum(sizes.values())
    manifest["sizes"] = sizes
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    total = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    if total > LIMIT_BYTES:
        raise SystemExit(f"the pack is {total / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB limit")
    return manifest


def _installed(module: str, least: str | None) -> bool:
    """Whether this interpreter imports `module`, at `least` this version when one is given."""
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except ModuleNotFoundError:
        return False
    if least is None:
        return True
    try:
        version = importlib.metadata.version(DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return False
    return _version_key(version) >= _version_key(least)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def make_environment(root: Path, paths: list[Path]) -> Path:
    """A Python environment (venv layout) at root over this interpreter: `paths` first, then this
    interpreter's own package folders, with their .pth files. Returns its python3."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_dir = root / "lib" / version / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    (root / "bin").mkdir(exist_ok=True)
    python = root / "bin" / "python3"
    python.unlink(missing_ok=True)
    python.symlink_to(os.path.realpath(sys.executable))
    home = Path(os.path.realpath(sys.executable)).parent
    (root / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")
    import site

    own = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]
    lines = [str(p) for p in paths]
    lines += [f"import site; site.addsitedir({folder!r})" for folder in own]
    (site_dir / "zz-gpu-pack.pth").write_text("\n".join(lines) + "\n")
    rerank = root / "bin" / "rerank"
    # The console script; the server's commands are a plug-in found through installed metadata, which
    # this environment has none of, so it is named here.
    rerank.write_text(
        f"#!{python}\n"
        "import sys\n"
        "from importlib.metadata import EntryPoint\n"
        "import rerank_client.cli as cli\n"
        'cli.entry_points = lambda group: [EntryPoint("server", "rerank_server.cli:register", group)]\n'
        "sys.exit(cli.main())\n"
    )
    rerank.chmod(0o755)
    return python


def unpack(pack_dir: Path, workdir: Path) -> tuple[Path, Path, Path]:
    """Unpack into workdir; returns (the environment's python3, the Triton home, the project folder)."""
    triton, project = workdir / "triton", workdir / "project"
    for archive, into in ((pack_dir / "triton.tar.xz", triton), (pack_dir / "project.tar.xz", project)):
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as opened:
            opened.extractall(into, filter="data")
    for binary in triton.rglob("*"):
        if binary.is_file() and binary.suffix != ".py":
            binary.chmod(0o755)
    paths = [project, project / "server", project / "client"]
    wheels = {w.name.split("-")[0].lower().replace("_", "-"): w for w in (pack_dir / "wheels").glob("*.whl")}
    for requirement, module, least in WHEELS:
        name = requirement.split("==")[0].lower()
        if name in wheels and not _installed(module, least):
            target = workdir / "wheels" / name
            with zipfile.ZipFile(wheels[name]) as wheel:
                wheel.extractall(target)
            paths.append(target)
            print(f"gpu_pack: using the carried {wheels[name].name}", flush=True)
    return make_environment(workdir / "env", paths), triton, project


def run(pack_dir: Path, workdir: Path | None, gpu_args: list[str]) -> int:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="rerank-gpu-check-"))
    python, triton, project = unpack(pack_dir.resolve(), workdir.resolve())
    env = dict(os.environ, RERANK_TRITON_HOME=str(triton), PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    print(f"gpu_pack: unpacked into {workdir}; running bench.gpu {' '.join(gpu_args)}", flush=True)
    return subprocess.run([str(python), "-m", "bench.gpu", *gpu_args], cwd=project, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_pack", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write the pack")
    packing.add_argument("--output", type=Path, default=Path("artifacts/gpu-pack"))
    packing.add_argument(
        "--python",
        action="append",
        dest="pythons",
        help="backend stub versions to carry (repeatable; default 3.12, the GPU machine's); wheels for the first",
    )
    packing.add_argument("--no-wheels", action="store_true", help="carry no wheels (the target has them all)")
    packing.add_argument("--xz-preset", type=int, default=6, help="0 (fast, larger) to 9 (slow, smallest)")
    running = commands.add_parser("run", help="unpack and run bench.gpu")
    running.add_argument("pack", type=Path)
    running.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    argv = sys.argv[1:] if argv is None else argv
    # `run PACK [--workdir W] -- <bench.gpu's arguments>`
    gpu_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.command == "pack":
        manifest = pack(args.output, args.pythons or ["3.12"], wheels=not args.no_wheels, preset=args.xz_preset)
        print(f"packed {args.output}: {int(manifest['bytes']) / 2**20:.1f} MiB")  # type: ignore[call-overload]
        return 0
    return run(args.pack, args.workdir, gpu_args)


if __name__ == "__main__":
    sys.exit(main())
