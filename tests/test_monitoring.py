"""The monitoring pieces of deploy/k8s/components, run by the real Prometheus tools (Debian's package, which
`make test` unpacks into the venv): `promtool check rules` and `promtool test rules` on the PrometheusRule, and a
Prometheus server scraping a running `rerank serve` (the frontend's metrics and its Triton's) in which every
expression of the rules, the alerts, the dashboard and the autoscaler must return series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rerank_client import RerankClient, RerankError
from rerank_server.observability import REJECT_REASONS, Metrics
from rerank_server.testing import free_port
from tests.conftest import Stack, frontend
from tests.texts import QUERY, text

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "deploy" / "k8s" / "components"
PROMETHEUS_RULE = COMPONENTS / "monitoring" / "prometheusrule.yaml"
DASHBOARD = COMPONENTS / "grafana-dashboard" / "rerank-dashboard.json"
SCALED_OBJECT = COMPONENTS / "queue-autoscaling" / "scaledobject.yaml"
ALERT_TESTS = Path(__file__).parent / "prometheus" / "alerts-test.yaml"
# The labels a ServiceMonitor gives the targets of the Service `rerank` in namespace `rerank` (the namespace
# the autoscaler's queries name): the test's scrape configuration gives the same.
TARGET_LABELS = {"namespace": "rerank", "pod": "rerank-0"}
JOB = "rerank"
# Grafana's variables, as "All" expands them (allValue), and a rate window that holds scrapes of this test.
DASHBOARD_VARIABLES = {"$namespace": ".*", "$job": ".*", "$__rate_interval": "1m"}
ALERT = re.compile(r"^(?P<value>.+?)\s*(?P<op>>|<|>=|<=)\s*(?P<threshold>[0-9.e+-]+)$", re.DOTALL)


def tool(name: str) -> Path:
    """Debian's prometheus/promtool: the copy `make test` unpacks into the venv, else one on PATH."""
    unpacked = Path(sys.prefix) / "prometheus" / "usr" / "bin" / name
    if unpacked.is_file():
        return unpacked
    found = shutil.which(name)
    assert found, f"no {name}: `make test` (or `make prometheus`) unpacks Debian's prometheus package into the venv"
    return Path(found)


def rule_groups() -> list[dict[str, Any]]:
    groups = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    assert isinstance(groups, list)
    return groups


def rules_file(folder: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file (what the operator hands Prometheus)."""
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return path


def rules(kind: str) -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if kind in rule]


def alert_parts(rule: dict[str, Any]) -> re.Match[str]:
    match = ALERT.match(" ".join(rule["expr"].split()))
    assert match, f"{rule['alert']}: not `<expression> <comparison> <number>`"
    return match


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expression = expression.replace(variable, value)
            assert "$" not in expression, f"{panel['title']}: a variable this test does not expand: {expression}"
            found.append(expression)
    return found


def autoscaler_queries() -> list[str]:
    scaled_object = yaml.safe_load(SCALED_OBJECT.read_text())
    return [t["metadata"]["query"] for t in scaled_object["spec"]["triggers"] if t["type"] == "prometheus"]


# --- promtool ---------------------------------------------------------------------------------------------------


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(tool("promtool")), "check", "rules", str(rules_file(tmp_path))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules('record')) + len(rules('alert'))} rules found" in done.stdout


def test_promtool_unit_tests_fire_every_alert(tmp_path: Path) -> None:
    rules_file(tmp_path)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    done = subprocess.run(
        [str(tool("promtool")), "test", "rules", ALERT_TESTS.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    quiet = {check["alertname"] for case in cases for check in case["alert_rule_test"] if not check["exp_alerts"]}
    alerts = {rule["alert"] for rule in rules("alert")}
    assert fired == alerts == quiet, "every alert needs a case where it fires and one where it does not"


def test_promtool_unit_tests_fail_when_a_threshold_moves(tmp_path: Path) -> None:
    """The unit tests can fail: the error-ratio alert at 20% no longer fires on 14% errors."""
    path = rules_file(tmp_path)
    moved = path.read_text().replace("ratio_rate5m > 0.05", "ratio_rate5m > 0.2")
    assert moved != path.read_text()
    path.write_text(moved)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    done = subprocess.run(
        [str(tool("promtool")), "test", "rules", ALERT_TESTS.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "alertname: RerankErrorRatioHigh" in done.stdout + done.stderr


def test_every_alert_compares_an_expression_with_a_threshold() -> None:
    """The form the live test below relies on to evaluate each alert's expression whether or not it fires."""
    for rule in rules("alert"):
        parts = alert_parts(rule)
        float(parts["threshold"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert {"summary", "description"} <= set(rule["annotations"])


def test_the_overload_reasons_are_every_reason_the_frontend_refuses_for() -> None:
    """rerank_rejected_total's reasons are exported at 0 from the start; the code may refuse for no other."""
    used = set()
    for path in (ROOT / "server" / "rerank_server").rglob("*.py"):
        # Counted directly, or through a connection's one-line helper (`_count("reason")`).
        used |= set(re.findall(r'(?:rejected\.labels\(reason=|self\._count\()"(\w+)"\)', path.read_text()))
    assert used == set(REJECT_REASONS)
    (overload,) = {
        rule["expr"] for rule in rules("record") if rule["record"] == "rerank:overload_refusals:ratio_rate5m"
    }
    (pattern,) = re.findall(r'reason=~"([^"]+)"', overload)
    assert set(pattern.split("|")) <= set(REJECT_REASONS)


# --- a real Prometheus scraping a real service -------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def series(self, expression: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expression)
        result = data["result"]
        return result if isinstance(result, list) else [result]


@pytest.fixture(scope="module")
def cached(stack: Stack, model_repository: Path) -> Iterator[Stack]:
    """A second frontend on the stack's Triton with the score cache on, so that its panels have series."""
    with frontend(stack, model_repository, "--score-cache-bytes=1000000") as served:
        yield served


@pytest.fixture(scope="module")
def prometheus(stack: Stack, cached: Stack) -> Iterator[Prometheus]:
    """Prometheus scraping the stack's frontend and Triton, and the cached frontend, every second, with the
    PrometheusRule's rules."""
    folder = Path(tempfile.mkdtemp(prefix="rerank-prometheus-"))
    urls = (stack.metrics_url, stack.triton_metrics_url, cached.metrics_url)
    targets = [urllib.parse.urlparse(url).netloc for url in urls if url]
    assert len(targets) == 3, "each frontend and Triton expose a metrics port"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file(folder))],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets, "labels": TARGET_LABELS}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(folder / "prometheus.log", "wb")  # noqa: SIM115 (closed after the process)
    process = subprocess.Popen(
        [
            str(tool("prometheus")),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus not ready:\n" + (folder / "prometheus.log").read_text()
            time.sleep(0.3)
        # A labelled counter's series starts at its first scraped value: calls made now create the series
        # (and Triton's), so that the calls a test makes after this scrape show as a rise.
        traffic(stack, cached)
        while not (
            server.series("rerank_calls_total")
            and server.series("nv_inference_request_success")
            and all(t["health"] == "up" for t in server.get("/api/v1/targets")["activeTargets"])
        ):
            assert time.monotonic() < deadline + 60, "no scrape:\n" + (folder / "prometheus.log").read_text()
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def traffic(stack: Stack, cached: Stack) -> None:
    """Calls of every kind the rules and panels look at: gRPC and HTTP, successes and a client error, and the
    same call twice on the cached frontend (a miss, then a hit)."""
    with RerankClient(stack.target, timeout=60) as client:
        for i in range(3):
            client.rerank(QUERY, [text(20, seed=i), text(40, seed=i + 10)])
        client.score([("a", "b")])
        with pytest.raises(RerankError):
            client.rerank("", ["x"])
    assert stack.http_url is not None
    answer = httpx.post(f"{stack.http_url}/v1/rerank", json={"query": QUERY, "documents": ["a", "b"]}, timeout=60)
    assert answer.status_code == 200, answer.text
    with RerankClient(cached.target, timeout=60) as client:
        first, again = (client.rerank(QUERY, [text(20, seed=90), text(30, seed=91)]) for _ in range(2))
    assert [r.logit for r in first.results] == [r.logit for r in again.results]


@pytest.mark.e2e
def test_prometheus_scrapes_the_frontend_and_triton(prometheus: Prometheus) -> None:
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    assert len(targets) == 3 and all(t["health"] == "up" for t in targets), targets
    assert {t["labels"]["job"] for t in targets} == {JOB}


@pytest.mark.e2e
def test_every_rule_dashboard_and_autoscaler_expression_returns_series(
    stack: Stack, cached: Stack, prometheus: Prometheus
) -> None:
    """No expression names a metric or label the service and its Triton do not export: each returns series.

    Alerts are evaluated with their comparison made `bool` (0 or 1 per series), so that a quiet alert still
    shows that its expression finds the metrics."""
    expressions = {f"record {rule['record']}": rule["expr"] for rule in rules("record")}
    expressions |= {f"recorded {rule['record']}": rule["record"] for rule in rules("record")}
    for rule in rules("alert"):
        parts = alert_parts(rule)
        expressions[f"alert {rule['alert']}"] = f"{parts['value']} {parts['op']} bool {parts['threshold']}"
    expressions |= {f"dashboard {i}": e for i, e in enumerate(dashboard_expressions())}
    expressions |= {f"autoscaler {i}": q for i, q in enumerate(autoscaler_queries())}
    assert len(expressions) > 30

    def calls_per_second() -> float:
        return sum(float(s["value"][1]) for s in prometheus.series("rerank:calls:rate5m"))

    traffic(stack, cached)
    empty: dict[str, str] = {}
    deadline = time.monotonic() + 90  # rates need two scrapes, recorded series an evaluation after them
    while True:
        empty = {name: e for name, e in expressions.items() if not prometheus.series(" ".join(e.split()))}
        if (not empty and calls_per_second() > 0) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, "expressions returning no series:\n" + "\n".join(f"{k}: {v}" for k, v in empty.items())

    loaded = [rule for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]]
    assert len(loaded) == len(rules("record")) + len(rules("alert"))
    assert all(rule["health"] == "ok" for rule in loaded), [r for r in loaded if r["health"] != "ok"]
    # The traffic above is in the numbers: calls counted, and no server-side errors.
    assert calls_per_second() > 0
    (errors,) = prometheus.series("rerank:call_errors:ratio_rate5m")
    assert float(errors["value"][1]) == 0


@pytest.mark.e2e
def test_a_misspelt_metric_returns_no_series(prometheus: Prometheus) -> None:
    """The check above can fail: a name the service does not export finds nothing."""
    assert prometheus.series("rerank_inflight_calls")
    assert not prometheus.series("rerank_inflight_call")


def test_every_frontend_metric_is_documented_in_the_operations_page() -> None:
    """An operator reads docs/operations.md for what /metrics holds: each family the frontend exports is named there."""
    page = (ROOT / "docs" / "operations.md").read_text()
    families = {family.name for family in Metrics().registry.collect()}
    assert len(families) >= 15
    # prometheus_client reports a counter's family without its _total suffix.
    missing = sorted(name for name in families if f"`{name}" not in page)
    assert not missing, f"metrics exported but not in docs/operations.md: {missing}"
