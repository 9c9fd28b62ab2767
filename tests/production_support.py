"""Shared pieces of the production tests: a slow model, metric scraping, RSS, requests."""

from __future__ import annotations

import shutil
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor
from saliency_service.serving.server import SERVICE_NAME

SLOW_SHAPE = (3, 64, 64)
_lock = threading.Lock()
_slow_root: Path | None = None


class SlowCNN(nn.Module):
    """Full-resolution 32-channel convolutions: ~0.1 GFLOP per 64×64 image, so an occlusion
    request takes a second or so and overload and draining can be observed."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layer1 = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU())
        self.layer2 = nn.Sequential(
            nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU()
        )
        self.layer3 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(x)))).flatten(1))


def slow_repository(base: Path, tiny_repository: Path) -> Path:
    """A repository with the ``slow`` model and a copy of ``tiny`` (exported once)."""
    global _slow_root
    with _lock:
        if _slow_root is None:
            root = base / "slow-models"
            export_package(
                SlowCNN(),
                name="slow",
                version=1,
                input_shape=SLOW_SHAPE,
                mean=[0.5] * 3,
                std=[0.25] * 3,
                class_labels=["a", "b", "c", "d"],
                repository=root,
                head="fc",
            )
            shutil.copytree(tiny_repository / "tiny", root / "tiny")
            _slow_root = root
        return _slow_root


def slow_request(batch: int = 1, stride: int = 4, seed: int = 0) -> pb.ExplainRequest:
    """Occlusion on the slow model: 13×13 = 169 windows per image at stride 4."""
    inputs = np.random.default_rng(seed).normal(size=(batch, *SLOW_SHAPE)).astype(np.float32)
    request = pb.ExplainRequest(
        model="slow", method=pb.METHOD_OCCLUSION, input=pb.Input(tensor=array_to_tensor(inputs))
    )
    request.occlusion.window = 16
    request.occlusion.stride = stride
    return request


def tiny_request(
    method: int, batch: int = 1, seed: int = 0, shape: tuple[int, ...] = (3, 32, 32)
) -> pb.ExplainRequest:
    inputs = np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)
    return pb.ExplainRequest(
        model="tiny", method=method, input=pb.Input(tensor=array_to_tensor(inputs))
    )


def scrape(metrics_port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` as {(sample name, labels): value}."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent, as Prometheus treats a series not yet created)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def readiness(channel: grpc.Channel, timeout: float = 10.0) -> int:
    """The readiness status (``saliency.v1.Explainer`` in the health service) on ``channel``."""
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status
