"""Do SMOE Scale and FastCAM find the object as well as Grad-CAM? Scored on the cell dataset.

For each test image (blank ones excluded: they have no object) the map of the true class is
scored against the ground truth of ``evaluation.cells``: relevance mass inside the object
mask and on the discriminative part, the pointing game, and (when ``evaluation.metrics`` is
importable) deletion/insertion AUC. The paper (https://arxiv.org/abs/1911.11293) reports
FastCAM ≥ Grad-CAM.

    .venv/bin/python -m benchmarks.multiscale_cells [--count 300] [--quick]

Uses the demo package ``models/demo/1``; without it, trains a small stand-in DemoResNet on
the cells (a few minutes on two cores) and says so in the output.
Writes ``benchmarks/results/multiscale_cells.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import in_process_core
from saliency_service.core.request import CostCounter, Job, RequestState
from saliency_service.evaluation import cells
from saliency_service.methods import registry
from saliency_service.methods._utils.resize import upsample
from saliency_service.methods.base import scale_by_max
from saliency_service.methods.cam import grad_cam
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import Core, method_enum
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.protocol.inputs import preprocess_pixels

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "multiscale_cells.json"
TEST_SEED = 1


def stand_in_package(root: Path, size: int = 64, count: int = 3000, epochs: int = 6) -> Path:
    """Trains a small DemoResNet on the cells and exports it to ``root/demo/1``."""
    from saliency_service.packaging.export import export_package  # noqa: PLC0415
    from saliency_service.zoo.architectures import DemoResNet  # noqa: PLC0415

    torch.manual_seed(0)
    data = cells.generate(count, cells.CellConfig(size=size, seed=0))
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    x = torch.from_numpy(preprocess_pixels(data.images, _spec(size, mean, std)))
    y = torch.from_numpy(data.labels)
    model = DemoResNet(num_classes=len(cells.CLASS_NAMES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(count)
        for start in range(0, count, 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        print(f"  stand-in epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", file=sys.stderr,
              flush=True)
    model.eval()
    export_package(model, name="demo", version=1, input_shape=(3, size, size), mean=mean,
                   std=std, class_labels=cells.CLASS_NAMES, repository=root, head="fc",
                   scale_modules=model.scale_modules(), cam_layer=model.cam_layer)
    return root / "demo" / "1"


def _spec(size: int, mean: list[float], std: list[float]) -> Any:
    from saliency_service.core.repository import InputSpec  # noqa: PLC0415

    return InputSpec(shape=(-1, 3, size, size), mean=tuple(mean), std=tuple(std))


def grad_cam_maps(core: Core, handle: Any, inputs: np.ndarray, targets: np.ndarray
                  ) -> tuple[np.ndarray, str]:
    """Grad-CAM maps from the service when registered, else the autograd fallback."""
    if pb.METHOD_GRADCAM in {method_enum(h.name) for h in registry.handlers()}:
        return explain(core, pb.METHOD_GRADCAM, inputs, targets), "saliency_service.methods.cam"
    job = Job(model=handle, inputs=inputs, targets=targets, params={})
    cam = grad_cam(job, handle.spec().cam_output)
    return scale_by_max(upsample(cam, *inputs.shape[2:])), "autograd (multiscale)"


def explain(core: Core, method: int, inputs: np.ndarray, targets: np.ndarray,
            model: str = "demo") -> np.ndarray:
    request = pb.ExplainRequest(model=model, method=method,
                                input=pb.Input(tensor=array_to_tensor(inputs)),
                                target=pb.Target(per_item=pb.ClassIndices(
                                    indices=targets.tolist())))
    reply = core.explain(request, RequestState(), CostCounter())
    return tensor_to_array(reply.saliency)


def ground_truth_scores(maps: np.ndarray, heatmaps: np.ndarray, masks: np.ndarray
                        ) -> dict[str, float]:
    relevance = np.clip(maps.astype(np.float64), 0, None).reshape(len(maps), -1)
    total = np.maximum(relevance.sum(axis=1), 1e-12)
    inside = masks.reshape(len(masks), -1)
    part = (heatmaps >= cells.DISCRIMINATIVE_VALUE).reshape(len(heatmaps), -1)
    peak = relevance.argmax(axis=1)
    return {
        "mass_in_object": float(((relevance * inside).sum(1) / total).mean()),
        "mass_on_discriminative_part": float(((relevance * part).sum(1) / total).mean()),
        "pointing_game": float(inside[np.arange(len(peak)), peak].mean()),
        "object_area_share": float(inside.mean()),
    }


def faithfulness(package: Path, pixels: np.ndarray, maps: np.ndarray,
                 targets: np.ndarray) -> dict[str, float]:
    try:
        from saliency_service.evaluation import metrics  # noqa: PLC0415
    except ImportError:
        return {}
    classifier = metrics.OnnxClassifier.from_package(package)
    images = pixels.astype(np.float32) / 255.0
    return {"deletion_auc": float(np.mean(metrics.deletion_auc(images, maps, targets,
                                                                classifier))),
            "insertion_auc": float(np.mean(metrics.insertion_auc(images, maps, targets,
                                                                  classifier)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="60 images, no AUC metrics")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    count = 60 if args.quick else args.count
    temp = tempfile.TemporaryDirectory()
    models = args.models
    stand_in = not (models / "demo" / "1" / "manifest.json").is_file()
    if stand_in:
        print("models/demo/1 not found: training a stand-in DemoResNet", file=sys.stderr)
        models = Path(temp.name)
        stand_in_package(models)
    core = in_process_core(models, max_batch=16)
    handle = core.repository.get("demo")
    size = handle.spec().input.height
    data = cells.generate(count, cells.CellConfig(size=size, seed=TEST_SEED))
    keep = data.masks.reshape(count, -1).any(axis=1)
    pixels, targets = data.images[keep], data.labels[keep]
    heatmaps, masks = data.heatmaps[keep], data.masks[keep]
    inputs = preprocess_pixels(pixels, handle.spec().input)
    accuracy = float((handle.run(inputs)[0].argmax(1) == targets).mean())
    results: dict[str, dict[str, float]] = {}
    grad_cam_source = ""
    for name, method in (("smoe_scale", pb.METHOD_SMOE_SCALE), ("fastcam", pb.METHOD_FASTCAM),
                         ("gradcam", pb.METHOD_GRADCAM)):
        started = time.perf_counter()
        parts = []
        for begin in range(0, len(inputs), 16):
            chunk, chunk_targets = inputs[begin:begin + 16], targets[begin:begin + 16]
            if method == pb.METHOD_GRADCAM:
                maps, grad_cam_source = grad_cam_maps(core, handle, chunk, chunk_targets)
            else:
                maps = explain(core, method, chunk, chunk_targets)
            parts.append(maps)
        maps = np.concatenate(parts)
        scores = ground_truth_scores(maps, heatmaps, masks)
        scores["seconds_per_image"] = (time.perf_counter() - started) / len(inputs)
        if not args.quick:
            scores.update(faithfulness(handle.path, pixels, maps, targets))
        results[name] = scores
        print(f"  {name} done", file=sys.stderr, flush=True)
    columns = sorted({k for scores in results.values() for k in scores})
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores.get(c, float('nan')):.3f}"
                                                  for c in columns) + " |")
    lines.append(f"\n{len(inputs)} non-blank test images ({size}×{size}, seed {TEST_SEED}); "
                 f"model {'STAND-IN (no models/demo/1)' if stand_in else 'models/demo/1'}, "
                 f"accuracy {accuracy:.3f}; Grad-CAM from {grad_cam_source}; maps of the true "
                 "class. deletion AUC: lower is better; all others: higher is better.")
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "multiscale_cells", "images": len(inputs), "size": size,
        "stand_in_model": stand_in, "accuracy": accuracy, "grad_cam": grad_cam_source,
        "results": results, "table": lines}, indent=2) + "\n")
    temp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
