"""The README's SDK snippet, as a user copies it: run against a real stack, it prints the best result of the
same call the SDK makes, and its asyncio twin returns every document with its text. And, with no server, what
every page (the README and docs/) shows: its links and anchors resolve, each `rerank` and benchmark command and
each `make` target that runs one parses as written, and the settings table names each setting, its variable and
its default as `rerank serve` has them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from rerank_client import RerankClient
from rerank_client.cli import build_parser
from rerank_server import flags
from rerank_server.settings import ENV_PREFIX, Settings
from tests.conftest import Stack
from tests.test_sdks import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = (README, *sorted((ROOT / "docs").glob("*.md")))
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]


def readme_block(section: str, language: str) -> str:
    body = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(rf"```{language}\n(.*?)```", body, re.S)
    return block


@pytest.mark.e2e
def test_readme_sdk_snippet_prints_the_best_result_and_its_async_twin_answers(stack: Stack) -> None:
    code = readme_block("The SDK in ten lines", "python").replace("localhost:50051", stack.target)
    namespace: dict[str, Any] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, namespace)
    index, score, logit, tokens = printed.getvalue().split()
    with RerankClient(stack.target, timeout=60) as client:
        expected = client.rerank("what is the capital of China?", ["Beijing", "The weather is nice today"], top_n=1)
    best = expected.results[0]
    assert int(index) == best.index
    assert float(score) == best.score and float(logit) == best.logit
    assert int(tokens) == expected.usage.input_tokens > 0

    asyncio.run(namespace["main"]())  # the twin's call runs to completion against the same server


# -- what every page shows, checked without a server -------------------------------------------------------

FENCED = re.compile(r"```(\w*)\n(.*?)```", re.S)


def prose(page: Path) -> str:
    """The page without its fenced blocks (a `#` line in a block is no heading, a `](` in code no link)."""
    return FENCED.sub("", page.read_text())


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", prose(page), re.M)}


def test_links_between_pages_resolve_to_a_file_and_a_heading() -> None:
    broken = []
    for page in PAGES:
        for link in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, fragment = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists() or (fragment and target.suffix == ".md" and fragment not in anchors(target)):
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, broken


def shown_commands(program: str, inline: str = "") -> list[tuple[Path, str]]:
    """Each command line starting with `program` (after environment variables and an optional `.venv/bin/`)
    that the pages show in a shell block, or in backticks when it starts with `inline` (prose names a flag as
    `rerank export --name`, and runs a command as `.venv/bin/rerank ...`), its comment cut. Lines with a
    placeholder (`<folder>`, `[--port 50051]`) or cut short (`...`) are templates, not commands."""
    start = rf"(?:[A-Z_]+=\S+ )*(?:\.venv/bin/)?{program}(?= )"
    found = []
    for page in PAGES:
        text = page.read_text()
        spans = re.findall(r"`([^`\n]+)`", FENCED.sub("", text))
        commands = [c for span in spans for c in span.split(" && ") if c.startswith(inline)]
        for language, block in FENCED.findall(text):
            if language == "sh":
                lines = [re.sub(r"\s+#.*", "", line).strip() for line in block.replace("\\\n", " ").splitlines()]
                commands += [c for line in lines for c in line.split(" && ")]
        found += [(page, c) for c in commands if re.match(start, c) and not re.search(r"[<\[]|\.\.\.", c)]
    return found


def argv_of(command: str, program: str) -> list[str]:
    words = shlex.split(command)
    while "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)  # RERANK_CPU_FLAGS=... before the program
    return words[words.index(program) + 1 :] if program in words else words[1:]


def parse_rerank(argv: list[str]) -> None:
    """`rerank <argv>` as the command line parses it, and a serve or export command's values converted to
    their types (what `rerank serve` and `rerank export` do next)."""
    args = build_parser().parse_args(argv)
    if argv[0] == "serve":
        flags.values(Settings, args)
    elif argv[0] == "export":
        from rerank_server.export.options import ExportOptions

        flags.values(ExportOptions, args)


class ParsedError(Exception):
    """Raised once a benchmark's arguments are parsed, before it runs anything."""


def parse_bench(module: str, argv: list[str]) -> None:
    """`python -m bench.<module> <argv>` up to its argument parser: an unknown flag or a bad value fails
    (argparse exits 2); `--help` exits 0."""
    main = importlib.import_module(f"bench.{module}").main
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        original(self, args, namespace)
        raise ParsedError

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            main(argv)
        except ParsedError:
            pass
        except SystemExit as done:
            assert done.code == 0, f"python -m bench.{module} {shlex.join(argv)}: exit {done.code}"
            return
        else:
            raise AssertionError(f"python -m bench.{module} {shlex.join(argv)} ran past its parser")
    if module == "gpu_pack" and "--" in argv:  # `run PACK -- <bench.gpu's arguments>`
        parse_bench("gpu", argv[argv.index("--") + 1 :])


def parse_bench_command(command: str) -> None:
    words = shlex.split(command)
    module = words[words.index("-m") + 1].removeprefix("bench.")
    parse_bench(module, words[words.index("-m") + 2 :])


def test_every_rerank_command_shown_parses_as_written() -> None:
    commands = shown_commands("rerank", inline=".venv/bin/rerank ")
    # The README's query, the API page's models/query/stream, operations' exports and serves, the image's export.
    assert len(commands) >= 10, commands
    for page, command in commands:
        try:
            parse_rerank(argv_of(command, "rerank"))
        except SystemExit as done:
            raise AssertionError(f"{page.name}: {command}: exit {done.code}") from None


def test_every_benchmark_command_shown_parses_as_written() -> None:
    commands = [(page, c) for page, c in shown_commands(r"python3?") if " -m bench." in c]
    modules = {shlex.split(c)[shlex.split(c).index("-m") + 1] for _, c in commands}
    assert len(modules) >= 10, modules  # run, long, warmup, cache, queue_delay, hostile, messages, ...
    for page, command in commands:
        try:
            parse_bench_command(command)
        except AssertionError as error:
            raise AssertionError(f"{page.name}: {error}") from None


def make_runs(command: str) -> list[str]:
    """The command lines `make <args>` would run (make -n: nothing is run, the install taken as done)."""
    done = subprocess.run(
        [*MAKE, "-n", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [line.strip() for line in done.stdout.replace("\\\n", " ").splitlines()]


def test_every_make_target_shown_runs_a_command_that_parses() -> None:
    """`make bench`, `make bench BENCH_ARGS=...`, `make gpu-check`, `make serve ...`, `make demo`: the rerank or
    benchmark command each runs, as make writes it, parses (a flag renamed in one place fails here, not
    minutes into a run)."""
    running = {"serve", "demo", "export", "bench", "bench-quick", "gpu-pack", "gpu-check"}
    commands = sorted({c for _, c in shown_commands("make") if c.split()[1] in running})
    assert running - {"export"} <= {c.split()[1] for c in commands}, commands
    for command in commands:
        checked = 0
        for line in make_runs(command):
            words = shlex.split(line)
            if " -m bench." in line:
                parse_bench_command(line)
                checked += 1
            elif words and words[0].endswith("/rerank") and words[1] in ("serve", "export"):
                parse_rerank(words[1:])
                checked += 1
        assert checked, f"{command}: {make_runs(command)}"
    # docs/performance.md spells out what `make gpu-check` runs: make's own command line.
    shown = re.search(r"# = (python3 -m bench\.gpu_pack run .*)", (ROOT / "docs" / "performance.md").read_text())
    assert shown and shlex.split(shown.group(1)) in [shlex.split(line) for line in make_runs("make gpu-check")]


def test_the_settings_table_names_each_setting_its_variable_and_its_default() -> None:
    """docs/operations.md's table: each flag is a setting, each `RERANK_*` its variable, and a default
    written as a value (a number, `16 MiB`, a word; `—` for none) is the setting's."""
    fields = {flags.flag_name(f.name): f for f in dataclasses.fields(Settings)}
    table = re.findall(r"^\| (`--.*?) \| (.*?) \|", (ROOT / "docs" / "operations.md").read_text(), re.M)
    assert len(table) >= 20
    for names, default in table:
        for flag in re.findall(r"`(--[a-z0-9-]+)`", names):
            assert flag in fields, flag
        for variable in re.findall(r"`(RERANK_[A-Z0-9_]+)`", names):
            assert variable.removeprefix(ENV_PREFIX).lower() in {f.name for f in fields.values()}, variable
        field = fields[re.findall(r"`(--[a-z0-9-]+)`", names)[0]]
        if default == "—":
            assert field.default is None, (names, field.default)
        elif number := re.fullmatch(r"([\d,.]+)( MiB)?(?: \(.*\))?", default):
            value = float(number.group(1).replace(",", "")) * (2**20 if number.group(2) else 1)
            assert value == field.default, (names, default, field.default)
        elif re.fullmatch(r"\w+", default):
            assert default == field.default, (names, default, field.default)


def test_every_rerank_variable_named_is_a_setting_or_read_where_the_page_says() -> None:
    settings = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    # Read elsewhere: the CPU probe's two, the CLI's token, the test suite's shared folder.
    others = {
        "RERANK_CPU_FLAGS": "server/rerank_triton_model/cpu_features.py",
        "RERANK_FORCE_PRECISION": "server/rerank_triton_model/cpu_features.py",
        "RERANK_TOKEN": "client/rerank_client/cli.py",
        "RERANK_TEST_SHARE": "tests/conftest.py",
    }
    named = {v for page in PAGES for v in re.findall(r"\bRERANK_[A-Z0-9_]*[A-Z0-9]\b", page.read_text())}
    for variable in named - settings:
        assert variable in others and variable in (ROOT / others[variable]).read_text(), variable


@pytest.mark.parametrize("base", ["deploy/k8s/base", "deploy/k8s/overlays/cpu"])
def test_the_overlay_the_deployment_page_shows_renders_every_component_with_its_images(
    base: str, tmp_path: Path
) -> None:
    """docs/deployment.md's `my-overlay/kustomization.yaml`, beside a copy of deploy/ (its paths are relative
    to the repository root), its placeholders filled: the real kustomize renders it, on the base or on the CPU
    overlay its comment offers, with every component and the images it names."""
    (block,) = fenced_blocks(ROOT / "docs" / "deployment.md", "yaml")
    assert "# my-overlay/kustomization.yaml" in block and "../deploy/k8s/base " in block
    block = block.replace("../deploy/k8s/base ", f"../{base} ")
    if base.endswith("/cpu"):  # the image name that overlay gives Triton's, as the block's comment says
        assert "name: rerank-triton                  # rerank-triton-cpu on ../deploy/k8s/overlays/cpu" in block
        block = block.replace("name: rerank-triton ", "name: rerank-triton-cpu ")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / "my-overlay").mkdir()
    (tmp_path / "my-overlay" / "kustomization.yaml").write_text(
        block.replace("<registry>", "registry.example").replace("<tag>", "1.2.3")
    )
    kubectl = Path(sys.executable).parent / "kubectl"
    done = subprocess.run(
        [str(kubectl), "kustomize", str(tmp_path / "my-overlay")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    kinds = set(re.findall(r"^kind: (\w+)$", done.stdout, re.M))
    assert {"ServiceMonitor", "PrometheusRule", "ScaledObject", "NetworkPolicy", "Deployment"} <= kinds, kinds
    assert "HorizontalPodAutoscaler" not in kinds  # queue-autoscaling replaces it
    images = set(re.findall(r"image: (\S+)", done.stdout))
    assert images == {"registry.example/rerank-frontend:1.2.3", "registry.example/rerank-triton:1.2.3"}, images


def test_the_test_commands_shown_select_their_sdks_tests() -> None:
    """`.venv/bin/python -m pytest tests/test_sdks.py -k go` (and `-k typescript`), as the SDK pages show them
    after `make sdk-deps`: collected as written, each selects that SDK's tests and only those."""
    commands = [(page, c) for page, c in shown_commands(r"python3?") if " -m pytest " in c]
    assert {page.name for page, _ in commands} >= {"sdk-go.md", "sdk-typescript.md"}, commands
    for page, command in commands:
        words = shlex.split(command)
        words = [str(ROOT / ".venv" / "bin" / "python"), *words[1:], "--collect-only", "-q", "-p", "no:cacheprovider"]
        done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{page.name}: {command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        selected = [line for line in done.stdout.splitlines() if "::" in line]
        keyword = words[words.index("-k") + 1]
        assert selected and all(keyword in line for line in selected), (command, selected)
