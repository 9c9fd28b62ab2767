"""The built-in demo model package: a small residual CNN trained on generated cell images.

Training is deterministic from a seed, so ``make demo-model`` rebuilds the same
model; the package shipped in ``models/demo/1`` is its output.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kernel.repository import MANIFEST

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_VERSION = 1


def ensure_demo_package(models: Path, force: bool = False, seed: int = 0) -> Path:
    """Returns the demo package's folder, training and exporting it first if missing."""
    from evaluation.cells import CLASS_NAMES  # noqa: PLC0415 - torch only when building
    from service.demo import DEMO_INPUT_SIZE, DEMO_MEAN, DEMO_STD, train_demo_model  # noqa: PLC0415
    from service.export import export_package  # noqa: PLC0415

    target = Path(models) / DEMO_NAME / str(DEMO_VERSION)
    if (target / MANIFEST).is_file() and not force:
        return target
    log.info("training the demo model (deterministic, seed %d)…", seed)
    started = time.perf_counter()
    # The shipped package's recipe, pinned here so that rebuilding reproduces it.
    model, accuracy = train_demo_model(seed=seed, train_images=8000, epochs=4, progress=True)
    train_seconds = time.perf_counter() - started
    report = export_package(
        model, name=DEMO_NAME, version=DEMO_VERSION,
        input_shape=(3, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE), mean=DEMO_MEAN, std=DEMO_STD,
        class_labels=CLASS_NAMES, repository=Path(models), head="fc", overwrite=True,
        metadata={"test_accuracy": accuracy, "train_seconds": round(train_seconds, 1),
                  "seed": seed, "dataset": "synthetic cells (evaluation.cells)"},
    )
    manifest = json.loads((report.path / MANIFEST).read_text())
    print(f"demo model: test accuracy {accuracy:.4f}, trained in {train_seconds:.0f} s, "
          f"ONNX Runtime vs PyTorch max abs diff {manifest['verification']['max_abs_diff']:.3g}")
    return report.path
