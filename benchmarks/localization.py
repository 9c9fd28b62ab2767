"""Does the map land on the object? Saliency mass inside the ground-truth object mask.

For each method, the fraction of a map's total mass that lies inside the object mask of the
synthetic cell dataset (``evaluation.cells``), averaged over images that hold an object
(class "blank" has none). Uniform noise scores the object's area fraction; a perfect map 1.0.

Runs on the demo model (``models/demo/1``) when it exists, else on a small model trained here
on generated cells in a few minutes (cached under the system temp folder). Methods: DE-CAM
(defaults: refinement 4 → 8, sparsity 0.8; with --variant-images N, its variants on N
images), RISE, occlusion, and Grad-CAM when its handler is registered.

    python -m benchmarks.localization [--images 50] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import Job
from saliency_service.evaluation.cells import CLASS_NAMES, TEST_CONFIG, CellConfig, generate
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import method_enum, method_name
from saliency_service.protocol.inputs import preprocess_pixels

RESULTS = Path(__file__).parent / "results" / "localization.json"
QUICK_SIZE = 64
QUICK_MEAN = (0.5, 0.5, 0.5)
QUICK_STD = (0.25, 0.25, 0.25)
BLANK = CLASS_NAMES.index("blank")


def quick_model_package(root: Path, size: int = QUICK_SIZE, train_images: int = 4000,
                        epochs: int = 4, seed: int = 0) -> Path:
    """Trains a small DemoResNet on generated cells and exports it (once; cached)."""
    import torch  # noqa: PLC0415 - only when there is no demo model to use

    from saliency_service.packaging.export import export_package  # noqa: PLC0415
    from saliency_service.zoo.architectures import DemoResNet  # noqa: PLC0415

    target = root / "cells_quick" / "1"
    if (target / "manifest.json").is_file():
        return target
    torch.manual_seed(seed)
    config = CellConfig(size=size, seed=0)
    data = generate(train_images, config)
    inputs = torch.from_numpy(preprocess_pixels(data.images, _spec(size)))
    labels = torch.from_numpy(data.labels)
    model = DemoResNet(num_classes=len(CLASS_NAMES), width=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (train_images // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(train_images)
        for start in range(0, train_images - 63, 64):
            index = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    model.eval()
    test = generate(1000, CellConfig(size=size, seed=1))
    with torch.no_grad():
        predicted = model(torch.from_numpy(preprocess_pixels(test.images, _spec(size))))
    accuracy = float((predicted.argmax(1).numpy() == test.labels).mean())
    print(f"  quick model test accuracy {accuracy:.3f}", flush=True)
    export_package(model, name="cells_quick", version=1, input_shape=(3, size, size),
                   mean=QUICK_MEAN, std=QUICK_STD, class_labels=CLASS_NAMES, repository=root,
                   head="fc", overwrite=True, metadata={"test_accuracy": accuracy})
    return target


def _spec(size: int) -> Any:
    from saliency_service.core.repository import InputSpec  # noqa: PLC0415

    return InputSpec(shape=(1, 3, size, size), mean=QUICK_MEAN, std=QUICK_STD)


def load_model(models: Path) -> ModelHandle:
    demo = models / "demo" / "1"
    folder = demo if (demo / "manifest.json").is_file() else quick_model_package(
        Path(tempfile.gettempdir()) / "saliency-bench-models")
    handle = ModelHandle(folder.parent.name, int(folder.name), folder)
    handle.load()
    if not handle.ready:
        raise SystemExit(f"model at {folder} failed to load: {handle.error}")
    return handle


def mass_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: Σ map over the object / Σ map (0 for an all-zero map)."""
    total = maps.reshape(maps.shape[0], -1).sum(axis=1)
    inside = (maps * masks).reshape(maps.shape[0], -1).sum(axis=1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def run_method(handle: ModelHandle, method: int, params: dict[str, Any], inputs: np.ndarray,
               targets: np.ndarray, logits: np.ndarray, seed: int = 0,
               batch: int = 8) -> tuple[np.ndarray, int, float, float | None]:
    """Maps for all inputs, in batches; returns (maps, forward passes, seconds, mean DE-CAM
    fitness or None)."""
    handler = registry.get(method_name(method))
    resolved = handler.params(None, {}, **params)
    maps, passes, fitness, started = [], 0, [], time.perf_counter()
    for start in range(0, inputs.shape[0], batch):
        part = slice(start, start + batch)
        job = Job(model=handle, inputs=inputs[part], targets=targets[part],
                  params=resolved, base_logits=logits[part], seed=seed)
        result = handler.explain(job)
        maps.append(result.maps)
        passes += job.cost.forward_passes
        if "best_fitness" in result.diagnostics:
            fitness.append(result.diagnostics["best_fitness"] * job.batch)
    mean_fitness = sum(fitness) / inputs.shape[0] if fitness else None
    return np.concatenate(maps), passes, time.perf_counter() - started, mean_fitness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--variant-images", type=int, default=0,
                        help="images for the DE-CAM grid/refinement variants (0 = skip them; "
                        "saliency_service/methods/decam.py quotes a run with 16)")
    parser.add_argument("--quick", action="store_true", help="a few images, smaller budgets")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    images = 12 if args.quick else args.images

    handle = load_model(args.models)
    spec = handle.spec().input
    config = CellConfig(size=spec.height, backgrounds=TEST_CONFIG.backgrounds,
                        seed=TEST_CONFIG.seed)
    data = generate(images * 2, config)
    keep = np.flatnonzero(data.labels != BLANK)[:images]
    inputs = preprocess_pixels(data.images[keep], spec)
    masks = data.masks[keep].astype(np.float32)
    (logits,) = handle.run(inputs)
    targets = data.labels[keep]  # explain the true class
    accuracy = float((logits.argmax(1) == targets).mean())
    area = float(masks.mean())

    # (label, method, params, images): refinement variants on a subset to bound the run time.
    variants = min(args.variant_images, 6) if args.quick else args.variant_images
    methods: list[tuple[str, int, dict[str, Any], int]] = [
        ("decam", pb.METHOD_DECAM, {}, images),
        ("rise", pb.METHOD_RISE, {"masks": 400} if args.quick else {}, images),
        ("occlusion", pb.METHOD_OCCLUSION, {"window": max(4, spec.height // 8),
                                            "stride": max(2, spec.height // 16)}, images),
        ("decam defaults (same subset)", pb.METHOD_DECAM, {}, variants),
        ("decam one stage", pb.METHOD_DECAM, {"refine": False}, variants),
        ("decam one stage, sparsity 0.3", pb.METHOD_DECAM, {"refine": False, "sparsity": 0.3},
         variants),
        ("decam grid 16, refine 4→8→16", pb.METHOD_DECAM, {"grid": 16}, variants),
        ("decam grid 16, one stage", pb.METHOD_DECAM, {"grid": 16, "refine": False}, variants),
    ]
    available = {method_enum(h.name) for h in registry.handlers() if h.available_for(handle)}
    if pb.METHOD_GRADCAM in available:
        methods.insert(0, ("gradcam", pb.METHOD_GRADCAM, {}, images))
    rows = []
    for label, method, params, count in methods:
        count = min(count, len(keep))
        if count == 0:
            continue
        maps, passes, seconds, fitness = run_method(
            handle, method, params, inputs[:count], targets[:count], logits[:count])
        scores = mass_inside(maps, masks[:count])
        rows.append({"method": label, "params": params, "images": count,
                     "mass_inside": float(scores.mean()),
                     "mass_inside_std": float(scores.std()),
                     "forward_passes_per_image": passes / count,
                     "seconds_per_image": seconds / count, "best_fitness": fitness})
        print(f"{label:28s} n={count:3d} mass inside {scores.mean():.3f} ± {scores.std():.3f}"
              f"   forward/image {passes / count:7.0f}   s/image {seconds / count:6.3f}"
              + (f"   fitness {fitness:.3f}" if fitness is not None else ""), flush=True)
    by_name = {row["method"]: row["mass_inside"] for row in rows}
    ratio = by_name["decam"] / by_name["gradcam"] if "gradcam" in by_name else None
    print(f"\nmodel {handle.name}/{handle.version} ({spec.height}×{spec.width}), "
          f"{len(keep)} images, accuracy {accuracy:.3f}, object area fraction {area:.3f}")
    if ratio is not None:
        print(f"DE-CAM / Grad-CAM mass inside: {ratio:.3f} (target >= 0.9)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": f"{handle.name}/{handle.version}", "input_size": spec.height,
        "images": len(keep), "accuracy": accuracy, "object_area_fraction": area,
        "decam_over_gradcam": ratio, "rows": rows, "quick": args.quick,
    }, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
