"""The shipped model packages, trained on data the machine has: ``demo`` and ``fashion``.

Training is deterministic from a seed, so ``make demo-model`` and ``make fashion-model``
rebuild the same models; the packages shipped in ``models/demo/1`` and ``models/fashion/1``
are their output. ``ensure_package`` is the one recipe: train, export, record how it went.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saliency_service.core.repository import MANIFEST

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_VERSION = 1
FASHION_NAME = "fashion"
FASHION_VERSION = 1


def ensure_package(models: Path, name: str, version: int, train: Callable[[], tuple[Any, float]],
                   *, input_shape: tuple[int, int, int], mean: Sequence[float],
                   std: Sequence[float], class_labels: Sequence[str], dataset: str, seed: int,
                   force: bool = False) -> Path:
    """Returns ``models/name/version``, training (``train() → (module, test accuracy)``) and
    exporting it first if it is missing or ``force``."""
    from saliency_service.packaging.export import export_package  # noqa: PLC0415 - torch only when building

    target = Path(models) / name / str(version)
    if (target / MANIFEST).is_file() and not force:
        return target
    log.info("training the %s model (deterministic, seed %d)…", name, seed)
    started = time.perf_counter()
    model, accuracy = train()
    train_seconds = time.perf_counter() - started
    report = export_package(
        model, name=name, version=version, input_shape=input_shape, mean=mean, std=std,
        class_labels=class_labels, repository=Path(models), head="fc", overwrite=True,
        metadata={"test_accuracy": accuracy, "train_seconds": round(train_seconds, 1),
                  "seed": seed, "dataset": dataset},
    )
    manifest = json.loads((report.path / MANIFEST).read_text())
    print(f"{name} model: test accuracy {accuracy:.4f}, trained in {train_seconds:.0f} s, "
          f"ONNX Runtime vs PyTorch max abs diff {manifest['verification']['max_abs_diff']:.3g}")
    return report.path


def ensure_demo_package(models: Path, force: bool = False, seed: int = 0) -> Path:
    """Returns the demo package's folder, training and exporting it first if missing."""
    from saliency_service.evaluation.cells import CLASS_NAMES  # noqa: PLC0415 - torch only when building
    from saliency_service.zoo.demo import DEMO_INPUT_SIZE, DEMO_MEAN, DEMO_STD, train_demo_model  # noqa: PLC0415

    # The shipped package's recipe, pinned here so that rebuilding reproduces it.
    return ensure_package(
        models, DEMO_NAME, DEMO_VERSION,
        lambda: train_demo_model(seed=seed, train_images=8000, epochs=4, progress=True),
        input_shape=(3, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE), mean=DEMO_MEAN, std=DEMO_STD,
        class_labels=CLASS_NAMES, dataset="synthetic cells (evaluation.cells)", seed=seed,
        force=force)


def ensure_fashion_package(models: Path, force: bool = False, seed: int = 0) -> Path:
    """Returns the Fashion-MNIST package's folder, training and exporting it first if missing
    (which needs Debian's ``dataset-fashion-mnist``)."""
    from saliency_service.evaluation import fashion_mnist  # noqa: PLC0415
    from saliency_service.zoo.fashion import FASHION_MEAN, FASHION_STD, train_fashion_model  # noqa: PLC0415

    return ensure_package(
        models, FASHION_NAME, FASHION_VERSION,
        lambda: train_fashion_model(seed=seed, train_images=60000, epochs=2, progress=True),
        input_shape=(1, fashion_mnist.SIZE, fashion_mnist.SIZE), mean=FASHION_MEAN,
        std=FASHION_STD, class_labels=fashion_mnist.CLASS_NAMES,
        dataset="Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 training images",
        seed=seed, force=force)
