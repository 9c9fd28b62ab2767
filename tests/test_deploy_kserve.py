"""deploy/kserve/: the InferenceService with this service as its explainer, and the
ServingRuntime for model packages, validated offline: KServe's resources against their CRD
schemas (vendored in tests/fixtures/kserve/, closed as the API server's strict field
validation closes them), their pods' parts against the Kubernetes schemas, and the
explainer's arguments against the server's own flag parser."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from saliency_service.cli import build_parser
from saliency_service.serving import config as config_module
from saliency_service.serving.kserve_explainer import manifest_of, remote_spec

ROOT = Path(__file__).resolve().parents[1]
KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = ROOT / "tests" / "fixtures" / "kserve"
# The oldest Kubernetes the manifests claim (docs/deployment.md) and the newest schemas.
K8S_VERSIONS = ("1.30", "1.37")
# Ports Knative's queue-proxy holds in every KServe pod (serverless mode).
QUEUE_PROXY_PORTS = {8012, 8013, 8022, 9090, 9091}
# KServe's fields of a model (PredictorExtensionSpec) beside those of a container.
MODEL_FIELDS = {"modelFormat", "protocolVersion", "runtime", "runtimeVersion", "storageUri",
                "storage"}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def documents() -> dict[str, dict[str, Any]]:
    """Every resource in deploy/kserve/ by ``kind/name``."""
    found = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others, as
    ``kubectl apply`` (strict field validation) refuses an unknown field."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate_crd(document: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError where the vendored CRD schema refuses it."""
    vendored = json.loads((SCHEMAS / f"{document['kind'].lower()}.schema.json").read_text())
    assert document["apiVersion"] == vendored["apiVersion"]
    jsonschema.validate(document, closed(vendored["openAPIV3Schema"]))


def validate_pod(spec: dict[str, Any]) -> None:
    """A pod's spec against the Kubernetes schemas (strict) of each claimed version."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def pod_of(component: dict[str, Any]) -> dict[str, Any]:
    """An InferenceService component's pod: its containers (a ``model`` as the container
    KServe makes of it) and volumes."""
    containers = list(component.get("containers", []))
    if "model" in component:
        model = {k: v for k, v in component["model"].items() if k not in MODEL_FIELDS}
        containers.append({"name": "kserve-container", "image": "runtime", **model})
    return {"containers": containers, **({"volumes": component["volumes"]}
                                         if "volumes" in component else {})}


def test_every_resource_validates() -> None:
    found = documents()
    assert set(found) == {"InferenceService/flowers", "ConfigMap/flowers-explainer",
                          "ServingRuntime/saliency-package", "InferenceService/demo"}
    for document in found.values():
        if document["apiVersion"].startswith("serving.kserve.io/"):
            validate_crd(document)
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(document, version, strict=True)
    for component in ("predictor", "explainer"):
        validate_pod(pod_of(found["InferenceService/flowers"]["spec"][component]))
    validate_pod(pod_of(found["InferenceService/demo"]["spec"]["predictor"]))
    validate_pod({"containers": found["ServingRuntime/saliency-package"]["spec"]["containers"]})


def test_the_vendored_schemas_do_catch_mistakes() -> None:
    found = documents()
    misspelt = copy.deepcopy(found["InferenceService/flowers"])
    misspelt["spec"]["explainer"]["timeoutSeconds"] = misspelt["spec"]["explainer"].pop("timeout")
    with pytest.raises(jsonschema.ValidationError, match="timeoutSeconds"):
        validate_crd(misspelt)
    wrong_type = copy.deepcopy(found["InferenceService/flowers"])
    wrong_type["spec"]["predictor"]["model"]["modelFormat"] = "onnx"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(wrong_type)
    runtime = copy.deepcopy(found["ServingRuntime/saliency-package"])
    runtime["spec"]["supportedModelFormats"][0]["autoselect"] = True
    with pytest.raises(jsonschema.ValidationError, match="autoselect"):
        validate_crd(runtime)
    container = copy.deepcopy(found["InferenceService/flowers"]["spec"]["explainer"])
    container["containers"][0]["readinesProbe"] = container["containers"][0].pop(
        "readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod(pod_of(container))


def controller_config(container: dict[str, Any], appended: list[str]) -> config_module.Config:
    """The settings ``saliency serve`` starts with in ``container``: its env, its args and
    what KServe's controller appends."""
    environ = {e["name"]: e["value"] for e in container.get("env", [])}
    args = build_parser().parse_args(["serve", *container.get("args", []), *appended])
    return config_module.from_sources(args, environ=environ)


def test_explainer_starts_with_the_controllers_arguments_and_explains_the_predictor() -> None:
    found = documents()
    isvc = found["InferenceService/flowers"]
    explainer = isvc["spec"]["explainer"]
    (container,) = explainer["containers"]
    assert container["image"] == f"saliency-service:{VERSION}"
    name = isvc["metadata"]["name"]
    # explainer_custom.go: --model_name, --predictor_host <isvc>-predictor.<namespace>,
    # --http_port 8080, --workers <containerConcurrency>.
    config = controller_config(container, [
        "--model_name", name, "--predictor_host", f"{name}-predictor.default",
        "--http_port", "8080", "--workers", str(explainer["containerConcurrency"])])
    assert config.http_port == 8080 and config.max_inflight == explainer["containerConcurrency"]
    assert config.predictor_protocol == "v2"
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == config.predictor_protocol
    assert not {config.port, config.metrics_port} & QUEUE_PROXY_PORTS
    assert config.http_port not in {config.port, config.metrics_port}
    # The explanation's time: far beyond KServe's default of 60 s.
    assert explainer["timeout"] >= 300
    # The manifest file comes from the ConfigMap, mounted where the flag says.
    mount = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    folder, file_name = config.predictor_manifest.rsplit("/", 1)
    volume = {v["name"]: v for v in explainer["volumes"]}[mount[folder]]
    config_map = found[f"ConfigMap/{volume['configMap']['name']}"]
    given = json.loads(config_map["data"][file_name])
    spec = remote_spec(config, given["remote"])
    assert spec.url == f"http://{name}-predictor.default" and spec.model == name
    assert spec.binary_data
    # With metadata as Triton answers it for the predictor's model, the package is whole.
    metadata = {"name": name, "platform": "onnxruntime_onnx",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}]}
    manifest = manifest_of(config, given, metadata)
    assert manifest.input.shape == (-1, 3, 224, 224) and manifest.input.layout == "NCHW"
    assert manifest.input.name == "input" and manifest.logits_output == "logits"
    assert len(manifest.class_labels) == 5 and manifest.input.std[0] == pytest.approx(0.229)
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == config.http_port and probe["path"] == "/readyz"


def test_serving_runtime_serves_packages_from_kserves_model_folder() -> None:
    found = documents()
    runtime = found["ServingRuntime/saliency-package"]["spec"]
    (container,) = runtime["containers"]
    assert container["image"] == f"saliency-service:{VERSION}"
    config = controller_config(container, [])
    assert str(config.models) == "/mnt/models"  # where KServe's storage initializer copies
    assert config.http_port == 8080 and not config.predictor_host
    assert not {config.port, config.metrics_port} & QUEUE_PROXY_PORTS
    assert runtime["protocolVersions"] == ["v1"]  # KServe V1 :predict and :explain
    formats = {f["name"] for f in runtime["supportedModelFormats"]}
    predictor = found["InferenceService/demo"]["spec"]["predictor"]
    assert predictor["model"]["modelFormat"]["name"] in formats
    assert predictor["model"]["runtime"] == found["ServingRuntime/saliency-package"][
        "metadata"]["name"]
    assert predictor["timeout"] >= 300
