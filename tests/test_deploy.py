"""The shipping files (docker/, .dockerignore, deploy/k8s/), checked without a cluster or a Docker engine.

Kubernetes objects are rendered the way `kustomize build` would for the features used here (resources,
configMapGenerator, JSON 6902 patches, images) and validated against the Kubernetes API schemas that
kubernetes-validate ships (offline, strict: unknown fields fail). The RERANK_* names of the ConfigMap, the
compose file and the Dockerfiles must be settings of the frontend, the probes must ask the frontend's health
service names on the ports the Service publishes, and the images must stay slim and non-root.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rerank_server.app import HEALTH_SERVICES, LIVENESS_SERVICE, RERANK_SERVICE
from rerank_server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
SETTINGS = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
HEAVY_PACKAGES = ("torch", "onnxruntime", "onnx", "transformers", "nvidia-pytriton", "sentence-transformers")
KUSTOMIZATIONS = sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


# --- kustomize, for what these manifests use -------------------------------------------------------------------


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, equals, value = line.partition("=")
            assert equals, f"{path}: {line!r} is not KEY=VALUE"
            values[key] = value
    return values


def split_image(image: str) -> tuple[str, str | None]:
    name, colon, tag = image.rpartition(":")
    return (name, tag) if colon and "/" not in tag else (image, None)


def pod_containers(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for obj in objects:
        if obj["kind"] == "Deployment":
            spec = obj["spec"]["template"]["spec"]
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


def json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """RFC 6902 add, remove, replace and test, as kustomize applies them."""
    for operation in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        target: Any = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) and last != "-" else last
        op = operation["op"]
        if op == "test":
            assert target[key] == operation["value"], f"patch test failed at {operation['path']}"
        elif op == "remove":
            del target[key]
        elif op == "replace":
            assert (0 <= key < len(target)) if isinstance(target, list) else key in target, operation["path"]
            target[key] = copy.deepcopy(operation["value"])
        elif op == "add" and isinstance(target, list):
            target.insert(len(target) if key == "-" else key, copy.deepcopy(operation["value"]))
        elif op == "add":
            target[key] = copy.deepcopy(operation["value"])
        else:
            raise AssertionError(f"this test does not apply patch operation {op!r}")


def targets(objects: list[dict[str, Any]], selector: dict[str, str]) -> list[dict[str, Any]]:
    def api(obj: dict[str, Any]) -> tuple[str, str]:
        group, _, version = obj["apiVersion"].rpartition("/")
        return group, version

    return [
        obj
        for obj in objects
        if obj["kind"] == selector.get("kind", obj["kind"])
        and obj["metadata"]["name"] == selector.get("name", obj["metadata"]["name"])
        and api(obj)[0] == selector.get("group", api(obj)[0])
        and api(obj)[1] == selector.get("version", api(obj)[1])
    ]


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` makes (generated ConfigMaps keep their names, without the hash)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images"}
    assert not unsupported, f"{folder}: extend render() in this test for {unsupported}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        objects += render(path) if path.is_dir() else yaml_documents(path)
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for name in generator.get("envs", []):
            data.update(env_file(folder / name))
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        metadata = {"name": generator["name"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for patch in kustomization.get("patches", []):
        matched = targets(objects, patch["target"])
        assert matched, f"{folder}: patch {patch['path']} matches no object"
        for obj in matched:
            json_patch(obj, yaml.safe_load((folder / patch["path"]).read_text()))
    for image in kustomization.get("images", []):
        used = [c for c in pod_containers(objects) if split_image(c["image"])[0] == image["name"]]
        assert used, f"{folder}: images entry {image['name']!r} names no container's image"
        for container in used:
            name, tag = split_image(container["image"])
            tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
    return objects


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


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


def frontend_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    frontend = container(one(objects, "Deployment"), "frontend")
    env: dict[str, str] = {}
    for source in frontend.get("envFrom", []):
        (config_map,) = targets(objects, {"kind": "ConfigMap", "name": source["configMapRef"]["name"]})
        env.update(config_map["data"])
    env.update({e["name"]: e["value"] for e in frontend.get("env", []) if "value" in e})
    return env


def setting(env: dict[str, str], name: str) -> Any:
    """The frontend's value of a setting under this environment (its default when unset)."""
    return getattr(Settings.load(None, env), name)


def prestop_sleep(c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S / "base")


# --- Kubernetes -------------------------------------------------------------------------------------------------


def test_both_kustomizations_are_found() -> None:
    assert [p.relative_to(K8S).as_posix() for p in KUSTOMIZATIONS] == ["base", "overlays/cpu"]


def test_every_object_validates_against_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(obj["kind"] for obj in rendered)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}")


def test_validation_rejects_an_unknown_field_and_a_wrong_type(base: list[dict[str, Any]]) -> None:
    """The validation above can fail: strict schemas, real types."""
    misspelt = copy.deepcopy(one(base, "Deployment"))
    frontend = container(misspelt, "frontend")
    frontend["readinessprobe"] = frontend.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(one(base, "Service"))
    wrong_type["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_every_manifest_file_is_used_by_its_kustomization() -> None:
    """A manifest nobody lists is never deployed (and never validated)."""
    for folder in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used = {"kustomization.yaml"}
        used |= {r for r in kustomization.get("resources", []) if not (folder / r).is_dir()}
        used |= {p["path"] for p in kustomization.get("patches", [])}
        used |= {e for g in kustomization.get("configMapGenerator", []) for e in g.get("envs", [])}
        present = {p.name for p in folder.iterdir() if p.is_file()}
        assert present == used, f"{folder}: unused {present - used}, missing {used - present}"


def test_the_patch_helper_applies_rfc6902() -> None:
    document: dict[str, Any] = {"a": [{"name": "x"}, 2], "b": {"c/d": 1}}
    json_patch(
        document,
        [
            {"op": "test", "path": "/a/0/name", "value": "x"},
            {"op": "replace", "path": "/a/1", "value": 3},
            {"op": "add", "path": "/a/-", "value": 4},
            {"op": "remove", "path": "/b/c~1d"},
        ],
    )
    assert document == {"a": [{"name": "x"}, 3, 4], "b": {}}
    with pytest.raises(AssertionError, match="patch test failed"):
        json_patch(document, [{"op": "test", "path": "/a/0/name", "value": "y"}])


def test_gpu_in_the_base_and_none_in_the_cpu_overlay(base: list[dict[str, Any]]) -> None:
    triton = container(one(base, "Deployment"), "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu = render(K8S / "overlays" / "cpu")
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    deployment = one(cpu, "Deployment")
    assert container(deployment, "triton")["image"] == container(deployment, "model-files")["image"]
    assert split_image(container(deployment, "triton")["image"])[0] == "rerank-triton-cpu"
    assert container(deployment, "frontend")["image"] == container(one(base, "Deployment"), "frontend")["image"]


def test_configmap_names_only_real_settings_with_valid_values(rendered: list[dict[str, Any]]) -> None:
    config_map = one(rendered, "ConfigMap")
    assert config_map["data"], "the ConfigMap is empty"
    assert sorted(set(config_map["data"]) - SETTINGS) == [], "not settings of rerank_server.settings.Settings"
    settings = Settings.load(None, config_map["data"])  # types and combination checked like `rerank serve`
    assert settings.triton_url is not None
    assert settings.model_repository is not None or settings.tokenizer is not None


def test_the_setting_name_check_would_catch_drift() -> None:
    assert "RERANK_TRITON_URL" in SETTINGS
    assert "RERANK_SHUTDOWN_GRACE_S" in SETTINGS
    assert "RERANK_TRITON_ADDRESS" not in SETTINGS


def test_probes_ask_the_health_service_names_on_the_service_ports(rendered: list[dict[str, Any]]) -> None:
    deployment, service = one(rendered, "Deployment"), one(rendered, "Service")
    frontend, triton = container(deployment, "frontend"), container(deployment, "triton")
    port = setting(frontend_env(rendered), "port")
    assert frontend["readinessProbe"]["grpc"]["service"] == RERANK_SERVICE == "rerank.v1.RerankService"
    # Liveness must not follow Triton: an outage should unready pods, not restart healthy frontends.
    assert frontend["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    for probe in ("startupProbe", "readinessProbe"):
        assert frontend[probe]["grpc"]["service"] in HEALTH_SERVICES
        assert container_port(frontend, frontend[probe]["grpc"]["port"]) == port

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
        "http": ("frontend", Settings.http_port),
        "metrics": ("frontend", 9090),
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
    # The init container copies the repository (less the ONNX graphs) where the frontend looks for the tokenizer.
    init = container(deployment, "model-files")
    assert init["image"] == triton["image"]
    assert "tar -C /models" in init["command"][-1]
    repository = str(setting(env, "model_repository"))
    assert f"-C {repository} -xf" in init["command"][-1]
    mounts = {m["name"]: m["mountPath"] for m in container(deployment, "frontend")["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {"shared": mounts["shared"]}
    assert repository.startswith(mounts["shared"] + "/")


def test_shutdown_and_startup_timing(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = frontend_env(rendered)
    frontend, triton = container(deployment, "frontend"), container(deployment, "triton")
    drain = prestop_sleep(frontend) + setting(env, "shutdown_grace_s")
    assert prestop_sleep(triton) > drain, "Triton must answer until the frontend has drained"
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep(triton)
    assert pod["terminationGracePeriodSeconds"] > drain
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
    hpa, pdb = one(rendered, "HorizontalPodAutoscaler"), one(rendered, "PodDisruptionBudget")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rerank"}
    assert deployment["metadata"]["name"] == "rerank"
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "ContainerResource":
            resource = metric["containerResource"]
            assert resource["name"] in container(deployment, resource["container"])["resources"]["requests"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "a drain must leave a pod serving"


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
    (install,) = pip_installs(path)
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

        def run() -> int:
            env = {"RERANK_PORT": str(port), "PATH": str(Path(sys.executable).parent)}
            return subprocess.run([sys.executable, *command[1:]], env=env, timeout=60, capture_output=True).returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        servicer.set(RERANK_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        assert run() == 0
        servicer.set(RERANK_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run() != 0
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
    (run,) = [s for s in steps if s.keyword == "RUN" and "pip install" in s.arguments]
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
