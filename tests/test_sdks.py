"""The TypeScript and Go SDKs (client/typescript, client/go) against a real stack.

The session's `stack` serves the tiny `reranker`; one more frontend on its Triton (`secure`) has mTLS, a
bearer token and a small max_total_tokens. Each SDK's own suite (`node --test`, `go test`) runs the shared
CASES and writes its answers, which must be the Python SDK's: the same rankings, counts and texts, logits
and scores within 1e-6, the same request ids on errors. The suites also check each error class
(INVALID_ARGUMENT with its field violations, DEADLINE_EXCEEDED, UNAUTHENTICATED, UNAVAILABLE,
RESOURCE_EXHAUSTED), TLS, the token and the retries. The
Quick starts of docs/sdk-typescript.md and docs/sdk-go.md run as written, from a packed copy of the SDK, and
every other `ts` and `go` block of those pages and of the SDKs' READMEs compiles.

What they need (node_modules from `npm ci`, Debian's Go packages) is installed by `make sdk-deps`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rerank_client import RerankClient, RerankError, from_stream_error, stream_request
from rerank_client.pb import rerank_pb2
from tests.certs import Authority
from tests.conftest import Stack, frontend, wait_for
from tests.test_operations import sample, scrape
from tests.texts import QUERY, mixed_documents, text

ROOT = Path(__file__).resolve().parent.parent
TYPESCRIPT = ROOT / "client" / "typescript"
GO = ROOT / "client" / "go"
DOCS = ROOT / "docs"
TOKEN = "sdk-test-token"
TOLERANCE = 1e-6
# Small enough that a few long documents pass it (RESOURCE_EXHAUSTED), large enough for every other call.
SECURE_MAX_TOTAL_TOKENS = 2048

_DOCUMENTS = mixed_documents()
SERVED_MODEL = "reranker"  # the name `stack` serves its model by (conftest's MODELS)
# The requests every SDK answers; options use the Python SDK's keyword names (each suite maps them).
CASES: dict[str, list[Any]] = {
    "rerank": [
        {"query": QUERY, "documents": _DOCUMENTS, "options": {}},
        {
            "query": QUERY,
            "documents": [*_DOCUMENTS[:4], _DOCUMENTS[0]],
            "options": {"top_n": 3, "return_documents": True},
        },
        {
            "query": QUERY,
            "documents": _DOCUMENTS,
            "options": {"truncation": "chunk", "max_length": 48, "chunk_overlap": 8},
        },
        {"query": QUERY, "documents": _DOCUMENTS[:6], "options": {"truncation": "end", "max_length": 24, "top_n": 0}},
        {"query": QUERY, "documents": _DOCUMENTS[:5], "options": {"model": SERVED_MODEL}},
    ],
    "score": [
        {"pairs": [[QUERY, d] for d in _DOCUMENTS], "options": {}},
        {
            "pairs": [[text(5, seed=i), text(60, seed=i + 50)] for i in range(4)],
            "options": {"truncation": "chunk", "max_length": 32},
        },
    ],
    "stream": [
        {
            "id": f"s{i}",
            "query": text(6, seed=100 + i),
            "documents": _DOCUMENTS[i : i + 4],
            "options": {"return_documents": i % 2 == 0},
        }
        for i in range(6)
    ]
    + [
        {"id": "bad", "query": "", "documents": ["a document"], "options": {}},
        {"id": "unknown-model", "query": QUERY, "documents": ["a document"], "options": {"model": "no-such-model"}},
    ],
    # Request ids of a rerank the server refuses (an empty query): each error's code, fields and request id.
    # Echoed as given; "" (none) gets the server's own; the others are refused before sending.
    "request_id": ["parity-1", "a b~" * 32, "", "x" * 129, "id\n", "caf\u00e9"],
}
# An id the server made (a uuid4's hex): the answers hold this instead, the same for every SDK.
SERVERS_OWN_ID = "<the server's own>"


def _usage(usage: rerank_pb2.Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "truncated_documents": usage.truncated_documents,
        "model_inputs": usage.model_inputs,
    }


def _rerank_answer(response: rerank_pb2.RerankResponse) -> dict[str, Any]:
    results = [
        {
            "index": r.index,
            "score": r.score,
            "logit": r.logit,
            "document": r.document if r.HasField("document") else None,
            "windows": r.windows,
            "truncated": r.truncated,
        }
        for r in response.results
    ]
    return {"model": response.model, "results": results, "usage": _usage(response.usage)}


def _model_info(info: rerank_pb2.GetModelInfoResponse) -> dict[str, Any]:
    limits = info.limits
    return {
        "model": info.model,
        "max_length": info.max_length,
        "precision": info.precision,
        "triton_model_name": info.triton_model_name,
        "triton_model_version": info.triton_model_version,
        "tokenizer": info.tokenizer,
        "limits": {
            "max_documents": limits.max_documents,
            "max_total_tokens": limits.max_total_tokens,
            "max_query_tokens": limits.max_query_tokens,
            "max_message_bytes": limits.max_message_bytes,
            "default_chunk_overlap": limits.default_chunk_overlap,
        },
    }


def python_answers(target: str) -> dict[str, Any]:
    """The Python SDK's answers to CASES, in the shape the other SDKs' suites write theirs."""
    with RerankClient(target, timeout=60) as client:
        rerank = [_rerank_answer(client.rerank(c["query"], c["documents"], **c["options"])) for c in CASES["rerank"]]
        score = []
        for c in CASES["score"]:
            response = client.score([tuple(p) for p in c["pairs"]], **c["options"])
            scores = [
                {"score": s.score, "logit": s.logit, "windows": s.windows, "truncated": s.truncated}
                for s in response.scores
            ]
            score.append({"model": response.model, "scores": scores, "usage": _usage(response.usage)})
        stream: dict[str, Any] = {}
        requests = [stream_request(c["id"], c["query"], c["documents"], **c["options"]) for c in CASES["stream"]]
        for answer in client.rerank_stream(requests):
            if answer.HasField("error"):
                error = from_stream_error(answer.error)
                fields = [v.field for v in error.field_violations]
                stream[answer.id] = {"error": {"code": error.code.value[0], "fields": fields}}
            else:
                stream[answer.id] = {"response": _rerank_answer(answer.response)}
        info = client.model_info()
        models = client.list_models()
        request_ids = []
        for request_id in CASES["request_id"]:
            try:
                client.rerank("", ["a document"], request_id=request_id)
            except RerankError as error:
                fields = [v.field for v in error.field_violations]
                request_ids.append({"code": error.code.value[0], "fields": fields, "request_id": error.request_id})
    list_models = {"default_model": models.default_model, "models": [_model_info(m) for m in models.models]}
    answers = {"rerank": rerank, "score": score, "stream": stream, "request_id": request_ids}
    return {**answers, "model_info": _model_info(info), "list_models": list_models}


def servers_own_ids(answers: dict[str, Any]) -> dict[str, Any]:
    """The answers with every id the server made itself as SERVERS_OWN_ID (each call gets another)."""
    made = re.compile(r"[0-9a-f]{32}")
    request_ids = [
        {**a, "request_id": SERVERS_OWN_ID if made.fullmatch(a["request_id"] or "") else a["request_id"]}
        for a in answers["request_id"]
    ]
    return {**answers, "request_id": request_ids}


def assert_same(expected: Any, actual: Any, path: str = "answers") -> None:
    """Equal, floats within TOLERANCE (wherever the expected value is a float), lists in the same order
    (so a ranking must be the same ranking)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{path}: keys {actual!r} vs {expected!r}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{path}: {actual!r} vs {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, int | float) and not isinstance(actual, bool), f"{path}: {actual!r}"
        assert math.isclose(actual, expected, rel_tol=0, abs_tol=TOLERANCE), f"{path}: {actual} vs {expected}"
    else:
        assert type(actual) is type(expected) and actual == expected, f"{path}: {actual!r} vs {expected!r}"


def test_the_comparison_holds_rankings_exactly_and_floats_within_the_tolerance() -> None:
    answer = {"results": [{"index": 2, "logit": 0.5, "document": None}, {"index": 0, "logit": -1.25, "document": "d"}]}
    close = {
        "results": [{"index": 2, "logit": 0.5000004, "document": None}, {"index": 0, "logit": -1.25, "document": "d"}]
    }
    assert_same(answer, close)
    swapped = {"results": list(reversed(answer["results"]))}
    off = {"results": [{"index": 2, "logit": 0.500002, "document": None}, answer["results"][1]]}
    missing = {"results": [{"index": 2, "logit": 0.5}, answer["results"][1]]}
    for wrong in (swapped, off, missing, {"results": answer["results"][:1]}):
        with pytest.raises(AssertionError):
            assert_same(answer, wrong)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command; fail with its output when it fails; return its output."""
    done = subprocess.run(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-12000:]}"
    return done.stdout


def docs_block(page: str, language: str) -> str:
    """The one fenced `language` block of the page's section "## Quick start"."""
    body = (DOCS / page).read_text().split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(rf"```{language}\n(.*?)```", body, re.S)
    return block


def fenced_blocks(page: Path, language: str) -> list[str]:
    """Every fenced `language` block of a Markdown file."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def printed_best(output: str) -> tuple[int, float, float, int]:
    """The last line a docs snippet printed: index, score, logit and input tokens of the best result."""
    index, score, logit, tokens = output.strip().splitlines()[-1].split()
    return int(index), float(score), float(logit), int(tokens)


def assert_best_of_quick_start(output: str, target: str) -> None:
    """The snippet printed the best result of the call it makes, as the Python SDK gets it."""
    index, score, logit, tokens = printed_best(output)
    with RerankClient(target, timeout=60) as client:
        expected = client.rerank("what is the capital of China?", ["Beijing", "The weather is nice today"], top_n=1)
    best = expected.results[0]
    assert index == best.index
    assert math.isclose(score, best.score, abs_tol=TOLERANCE) and math.isclose(logit, best.logit, abs_tol=TOLERANCE)
    assert tokens == expected.usage.input_tokens > 0


# -- the stack --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("sdk-pki")
    ca = Authority(folder, "ca")
    return {"ca": ca.issued, "server": ca.issue("server", server=True), "client": ca.issue("client", server=False)}


@pytest.fixture(scope="module")
def secure(stack: Stack, model_repository: Path, pki: dict[str, Any]) -> Iterator[Stack]:
    from rerank_client import tls_credentials

    args = (
        f"--tls-cert-file={pki['server'].cert}",
        f"--tls-key-file={pki['server'].key}",
        f"--tls-client-ca-file={pki['ca'].cert}",
        f"--auth-token={TOKEN}",
        f"--max-total-tokens={SECURE_MAX_TOTAL_TOKENS}",
    )
    credentials = tls_credentials(pki["ca"].cert, pki["client"].cert, pki["client"].key)
    with frontend(stack, model_repository, *args, credentials=credentials) as served:
        yield served


@pytest.fixture(scope="module")
def sdk_env(
    stack: Stack, secure: Stack, pki: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The environment the SDK suites read (see the head of client/typescript/test/sdk.test.ts)."""
    cases = tmp_path_factory.mktemp("sdk-cases") / "cases.json"
    cases.write_text(json.dumps(CASES))
    return dict(
        os.environ,
        RERANK_TARGET=stack.target,
        RERANK_SDK_CASES=str(cases),
        # The server certificate names localhost, not 127.0.0.1.
        RERANK_SECURE_TARGET=f"localhost:{secure.target.rsplit(':', 1)[1]}",
        RERANK_TLS_CA=str(pki["ca"].cert),
        RERANK_TLS_CERT=str(pki["client"].cert),
        RERANK_TLS_KEY=str(pki["client"].key),
        RERANK_TOKEN=TOKEN,
    )


@pytest.fixture(scope="module")
def expected(stack: Stack) -> dict[str, Any]:
    answers = python_answers(stack.target)
    # The cases reach the error paths.
    assert answers["stream"]["bad"]["error"]["fields"] == ["query"]
    assert answers["stream"]["unknown-model"]["error"] == {"code": 5, "fields": ["model"]}
    answers = servers_own_ids(answers)
    answered = [{"code": 3, "fields": ["query"], "request_id": i} for i in ("parity-1", "a b~" * 32, SERVERS_OWN_ID)]
    refused = {"code": 3, "fields": ["request_id"], "request_id": None}
    assert answers["request_id"] == [*answered, refused, refused, refused]
    return answers


# -- TypeScript -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def npm() -> str:
    found = shutil.which("npm")
    assert found and (TYPESCRIPT / "node_modules" / ".bin" / "tsc").exists(), "run make sdk-deps (node, npm ci)"
    return found


@pytest.mark.e2e
def test_typescript_sdk_answers_like_the_python_sdk(
    npm: str, sdk_env: dict[str, str], expected: dict[str, Any], tmp_path: Path
) -> None:
    answers = tmp_path / "answers.json"
    # Build (type-checks the package, its tests and its example), then run the suite on the built package.
    run([npm, "run", "--silent", "build"], TYPESCRIPT)
    run([npm, "run", "--silent", "build:test"], TYPESCRIPT)
    output = run(["node", "--test", "build/test/"], TYPESCRIPT, dict(sdk_env, RERANK_SDK_ANSWERS=str(answers)))
    assert re.search(r"^# fail 0$", output, re.M) and not re.search(r"^# pass 0$", output, re.M), output
    assert_same(expected, servers_own_ids(json.loads(answers.read_text())))


@pytest.fixture(scope="module")
def ts_project(npm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/sdk-typescript.md's install steps: the SDK packed, and the tarball installed in a new ES module
    project."""
    folder = tmp_path_factory.mktemp("ts-project")
    packed = run([npm, "pack", "--silent", "--pack-destination", str(folder)], TYPESCRIPT).strip().splitlines()[-1]
    project = folder / "project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "quick-start", "private": True, "type": "module"}))
    run([npm, "install", "--prefer-offline", "--no-audit", "--no-fund", str(folder / packed)], project)
    return project


def tsc(project: Path, files: list[str], **options: Any) -> None:
    """Compile `files` of the project as a strict project would, with the SDK's own TypeScript and Node types."""
    tsconfig = {
        "compilerOptions": {
            "target": "ES2022",
            "module": "NodeNext",
            "moduleResolution": "NodeNext",
            "strict": True,
            # The strictest optional fields: settings read from the environment must type-check under it.
            "exactOptionalPropertyTypes": True,
            "typeRoots": [str(TYPESCRIPT / "node_modules" / "@types")],
            "types": ["node"],
            **options,
        },
        "files": files,
    }
    (project / "tsconfig.json").write_text(json.dumps(tsconfig))
    run([str(TYPESCRIPT / "node_modules" / ".bin" / "tsc"), "-p", "."], project)


@pytest.mark.e2e
def test_typescript_docs_quick_start_runs_as_written(ts_project: Path, stack: Stack) -> None:
    """docs/sdk-typescript.md's Quick start, compiled with tsc in the project that installed the tarball, and run."""
    snippet = docs_block("sdk-typescript.md", "ts").replace("localhost:50051", stack.target)
    (ts_project / "main.ts").write_text(snippet)
    tsc(ts_project, ["main.ts"])
    assert_best_of_quick_start(run(["node", "main.js"], ts_project, timeout=120), stack.target)


TS_SNIPPET_PAGES = (DOCS / "sdk-typescript.md", TYPESCRIPT / "README.md")


def ts_module(block: str) -> str:
    """A `ts` block as a module of its own; a fragment that uses a `client` it does not make gets one declared."""
    makes_client = re.search(r"\b(?:const|let|var|using)\s+client\b", block)
    declared = "" if makes_client else 'declare const client: import("@rerank-service/client").RerankClient;\n'
    return f"{declared}{block}\nexport {{}};\n"


@pytest.mark.e2e
def test_typescript_docs_snippets_type_check(ts_project: Path) -> None:
    """Every `ts` block of the guide and of the package's README, type-checked against the packed SDK."""
    folder = ts_project / "snippets"
    folder.mkdir()
    files = []
    for page in TS_SNIPPET_PAGES:
        blocks = fenced_blocks(page, "ts")
        assert blocks, page
        for i, block in enumerate(blocks):
            name = f"{page.parent.name}-{page.stem}-{i}.ts"
            (folder / name).write_text(ts_module(block))
            files.append(f"snippets/{name}")
    assert len(files) >= 5
    tsc(ts_project, files, noEmit=True)


def run_script(project: Path, name: str, source: str, *args: str, timeout: float = 120) -> str:
    """A Node module written into the project that installed the SDK's tarball, run; its output."""
    (project / name).write_text(textwrap.dedent(source))
    return run(["node", name, *args], project, timeout=timeout)


def server_calls(stack: Stack, rpc: str, code: str) -> float:
    return sample(scrape(stack.metrics_url), "rerank_calls_total", rpc=rpc, code=code)


# An endless stream of requests, one every 20 ms, counting those the SDK has taken: only the caller ends it.
TS_ENDLESS_REQUESTS = """
    import { RerankClient, streamRequest } from "@rerank-service/client";

    // Each message a fraction of a second of the tiny model's work: the server has messages in hand when the
    // stream ends (an idle stream it may count OK).
    const documents = Array.from({ length: 32 }, (_, i) => `document ${i} `.repeat(50));
    export const pulled = { count: 0 };
    export async function* endless() {
      for (let i = 0; ; i++) {
        pulled.count += 1;
        yield streamRequest(`m${i}`, "a query", documents);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
    // Pinged as often as the server allows (10 s): a test can outlast the interval in seconds.
    export const client = new RerankClient(process.argv[2], { timeoutMs: 60_000, keepaliveMs: 10_000 });
"""


@pytest.mark.e2e
def test_typescript_stream_left_early_is_cancelled_on_the_server(ts_project: Path, stack: Stack) -> None:
    """A `break` out of rerankStream's loop cancels the call: the SDK stops taking requests, the server
    counts the stream CANCELLED with the process and its connection still up, and once the client is closed
    the process ends. (connect's iterable has no return(): the stream stayed open, its requests sent and
    answered, until its deadline, and the deadline's timer kept Node running until then.)"""
    (ts_project / "endless.mjs").write_text(textwrap.dedent(TS_ENDLESS_REQUESTS))
    (ts_project / "left_early.mjs").write_text(
        textwrap.dedent(
            """
            import { client, endless, pulled } from "./endless.mjs";

            let answers = 0;
            for await (const _ of client.rerankStream(endless())) {
              if (++answers === 1) break;
            }
            const atBreak = pulled.count;
            await new Promise((resolve) => setTimeout(resolve, 1000));
            console.log(JSON.stringify({ atBreak, later: pulled.count }));
            // Up, the connection too, until the test has read the server's metrics (it closes stdin).
            await new Promise((resolve) => process.stdin.on("end", resolve).resume());
            client.close();
            """
        )
    )
    before = server_calls(stack, "RerankStream", "CANCELLED")
    script = subprocess.Popen(
        ["node", "left_early.mjs", stack.target],
        cwd=ts_project,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killer = threading.Timer(90, script.kill)
    killer.start()
    try:
        assert script.stdout is not None and script.stdin is not None
        line = script.stdout.readline()
        assert line.startswith("{"), line + script.stdout.read()
        pulled = json.loads(line)
        assert pulled["later"] <= pulled["atBreak"] + 1, f"requests still taken after the break: {pulled}"
        wait_for(
            lambda: (
                server_calls(stack, "RerankStream", "CANCELLED") > before
                and sample(scrape(stack.metrics_url), "rerank_inflight_calls") == 0
            ),
            "the stream cancelled on the server",
            timeout_s=15,
        )
        script.stdin.close()
        assert script.wait(20) == 0, script.stdout.read()  # well before the stream's deadline (60 s)
    finally:
        killer.cancel()
        script.kill()
        script.wait()


@pytest.mark.e2e
def test_typescript_client_closed_with_calls_in_flight_leaves_the_process_running(
    ts_project: Path, stack: Stack
) -> None:
    """close() with a rerank call and a stream in flight: both fail CancelledError, and the process lives on.
    (connect-node armed its keepalive ping again as the destroyed session's streams closed; an interval later
    it pinged that session, and Node's ERR_HTTP2_INVALID_SESSION, thrown in a timer, ended the process.)"""
    (ts_project / "endless.mjs").write_text(textwrap.dedent(TS_ENDLESS_REQUESTS))
    source = """
        import { client, endless } from "./endless.mjs";

        // Seconds of work: still in flight when the client closes.
        const documents = Array.from({ length: 300 }, (_, i) => `document number ${i} `.repeat(40));
        const rerank = client.rerank("a query", documents);
        const stream = (async () => {
          for await (const _ of client.rerankStream(endless())) {
            // answers until the client closes
          }
        })();
        setTimeout(() => client.close(), 300);
        const outcomes = await Promise.allSettled([rerank, stream]);
        const shown = (o) => (o.status === "rejected" ? `${o.reason.name} ${o.reason.code}` : o.status);
        console.log(outcomes.map(shown).join(", "));
        // Past the keepalive interval (10 s).
        await new Promise((resolve) => setTimeout(resolve, 11_500));
        console.log("still running");
    """
    output = run_script(ts_project, "closed_in_flight.mjs", source, stack.target, timeout=90)
    assert output.splitlines() == ["CancelledError 1, CancelledError 1", "still running"], output


@pytest.mark.e2e
def test_typescript_retries_that_are_not_an_integer_and_pings_the_server_refuses_are_refused(
    ts_project: Path,
) -> None:
    """`retries: NaN` (`Number(process.env.RERANK_RETRIES)` unset) never reached the last attempt: a call
    was retried until its deadline (and without one, for ever). The constructor refuses it, as it refuses a
    fraction or Infinity; a negative count is none, and a count past 4 is 4, as in the Python SDK. A
    keepalive under the 10 s the server accepts (it would close the connection: too_many_pings) is refused
    too."""
    source = """
        import { RerankClient } from "@rerank-service/client";

        function tried(name, options) {
          try {
            new RerankClient("127.0.0.1:1", options).close();
            console.log(name, "accepted");
          } catch (error) {
            console.log(name, error.name);
          }
        }
        for (const retries of [Number.NaN, 2.5, Infinity, -1, 0, 10]) tried(retries, { retries });
        for (const keepaliveMs of [Number.NaN, 9_999, 10_000]) tried(`keepalive ${keepaliveMs}`, { keepaliveMs });
    """
    output = run_script(ts_project, "retries.mjs", source)
    refused = [f"{n} RangeError" for n in ("NaN", "2.5", "Infinity")]
    keepalive = ["keepalive NaN RangeError", "keepalive 9999 RangeError", "keepalive 10000 accepted"]
    assert output.splitlines() == [*refused, "-1 accepted", "0 accepted", "10 accepted", *keepalive], output


# -- Go ---------------------------------------------------------------------------------------------------

GO_MODULE = re.search(r"^module (\S+)$", (GO / "go.mod").read_text(), re.M).group(1)  # type: ignore[union-attr]
# Debian's golang-google-grpc-dev and friends, built in GOPATH mode (there is no module proxy here).
GO_SYSTEM_PATH = Path("/usr/share/gocode")


@pytest.fixture(scope="module")
def go_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A GOPATH holding this module at its import path, after Debian's packages (GO111MODULE=off)."""
    go = shutil.which("go")
    assert go and (GO_SYSTEM_PATH / "src" / "google.golang.org" / "grpc").exists(), "run make sdk-deps (Go packages)"
    gopath = tmp_path_factory.mktemp("gopath")
    link = gopath / "src" / GO_MODULE
    link.parent.mkdir(parents=True)
    link.symlink_to(GO)
    return dict(os.environ, GOPATH=f"{gopath}{os.pathsep}{GO_SYSTEM_PATH}", GO111MODULE="off", GOFLAGS="")


@pytest.mark.e2e
def test_go_sdk_answers_like_the_python_sdk(
    go_env: dict[str, str], sdk_env: dict[str, str], expected: dict[str, Any], tmp_path: Path
) -> None:
    package_dir = Path(go_env["GOPATH"].split(os.pathsep)[0]) / "src" / GO_MODULE
    assert run(["gofmt", "-l", "."], GO) == "", "run gofmt -w client/go"
    run(["go", "vet", "./..."], package_dir, go_env)
    answers = tmp_path / "answers.json"
    env = {**sdk_env, **go_env, "RERANK_SDK_ANSWERS": str(answers)}
    output = run(["go", "test", "-count=1", "-v", "./rerank/"], package_dir, env)
    assert re.search(r"^ok\s", output, re.M) and "--- PASS: TestSharedCases" in output, output
    assert_same(expected, servers_own_ids(json.loads(answers.read_text())))


@pytest.mark.e2e
def test_go_docs_quick_start_runs_as_written(go_env: dict[str, str], stack: Stack) -> None:
    """docs/sdk-go.md's snippet, a main package importing the module, built and run."""
    snippet = docs_block("sdk-go.md", "go").replace("localhost:50051", stack.target)
    program = Path(go_env["GOPATH"].split(os.pathsep)[0]) / "src" / "quickstart"
    program.mkdir()
    (program / "main.go").write_text(snippet)
    assert_best_of_quick_start(run(["go", "run", "."], program, go_env, timeout=300), stack.target)


GO_SNIPPET_PAGES = (DOCS / "sdk-go.md", GO / "README.md")
# The packages a fragment may call, by the name it calls them (context and rerank are always imported).
GO_IMPORTS = {
    "errors": "errors",
    "fmt": "fmt",
    "io": "io",
    "log": "log",
    "os": "os",
    "time": "time",
    "grpc": "google.golang.org/grpc",
    "codes": "google.golang.org/grpc/codes",
    "status": "google.golang.org/grpc/status",
    "rerankv1": f"{GO_MODULE}/gen/rerank/v1",
}
# Go's strings and comments, both emptied (a string is matched first, so "dns:///" is no comment): what is
# left is what a fragment calls.
_GO_STRING_OR_COMMENT = re.compile(r'("(?:[^"\\\n]|\\.)*"|`[^`]*`)|//[^\n]*|/\*.*?\*/', re.S)


def go_file(block: str) -> str:
    """A `go` block as a file: a program as it is; a fragment as the body of a function returning error, with
    `ctx` and `client` declared at package level (a fragment may make its own) and the packages it calls."""
    if block.startswith("package "):
        return block
    code = _GO_STRING_OR_COMMENT.sub(lambda m: '""' if m.group(1) else "", block)
    used = [path for name, path in GO_IMPORTS.items() if re.search(rf"\b{name}\.", code)]
    imports = "".join(f'\t"{path}"\n' for path in sorted(["context", *used, f"{GO_MODULE}/rerank"]))
    return (
        f"package snippet\n\nimport (\n{imports})\n\n"
        "var (\n\tctx    = context.Background()\n\tclient *rerank.Client\n)\n\n"
        f"func snippet() error {{\n{textwrap.indent(block, chr(9))}\treturn nil\n}}\n"
    )


def test_a_go_fragment_imports_what_it_calls_not_what_its_comments_name() -> None:
    fragment = 'log.Println(fmt.Sprint("os.Exit")) // errors.Is(err, ...)\n'
    source = go_file(fragment)
    assert '\t"log"\n' in source and '\t"fmt"\n' in source
    assert '"os"' not in source and '"errors"' not in source
    assert go_file("package main\n") == "package main\n"


@pytest.mark.e2e
def test_go_docs_snippets_compile(go_env: dict[str, str]) -> None:
    """Every `go` block of the guide and of the module's README, as gofmt writes it, compiled and vetted
    against the module."""
    src = Path(go_env["GOPATH"].split(os.pathsep)[0]) / "src"
    count = 0
    for page in GO_SNIPPET_PAGES:
        blocks = fenced_blocks(page, "go")
        assert blocks, page
        for i, block in enumerate(blocks):
            folder = src / "snippets" / f"{page.parent.name}_{page.stem.replace('-', '_')}_{i}"
            folder.mkdir(parents=True)
            (folder / "main.go").write_text(go_file(block))
            count += 1
    assert count >= 5
    assert run(["gofmt", "-l", "snippets"], src) == "", "a go block is not as gofmt writes it"
    run(["go", "vet", "./snippets/..."], src, go_env)
