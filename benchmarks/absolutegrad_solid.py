"""Why Guided AbsoluteGrad puts no mass on a solid object that decides the class.

Three generated tasks on a grey noise texture, 32×32, where one square of 6–8 pixels at a
random place decides the class: ``solid`` (its colour: red, green or blue), ``faint_solid``
(the same colours at 30 % contrast to the grey) and ``striped`` (black and white; the stripes'
orientation decides). A 3-layer CNN is trained on each in seconds on one
core (seeded), exported, and explained through the service's handlers on held-out images
(the true class). Per method: relevance mass inside the object (a uniform map scores the
object's area), the pointing game, and for Guided AbsoluteGrad the authors' own algorithm on
the same noise (``tests/guided_absolutegrad_reference.py``). Then the mechanism: the gradients'
variance over the noisy samples inside and outside the object, how much of the object passes
the variance guide's quantile, how often the first layer's ReLUs flip under the noise, a
sweep of noise_level × quantile, and the guide's dependence on the logits' scale.

    python -m benchmarks.absolutegrad_solid [--images 12] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from benchmarks.common import QUICK_RESULTS, write_json
from saliency_service.core.repository import ModelHandle, Repository
from saliency_service.core.request import Job
from saliency_service.methods import registry
from saliency_service.methods.noise import noise_sigmas
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import method_enum, method_name
from tests.guided_absolutegrad_reference import handler_noise, reference_per_image

SIZE = 32
MEAN, STD = 0.5, 0.25
TASKS = ("solid", "faint_solid", "striped")
FAINT_CONTRAST = 0.3
COLOURS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
SEED = 0
EXPLAIN_SEED = 3
METHODS: list[tuple[str, int, dict[str, Any]]] = [
    ("vanilla_gradient", pb.METHOD_VANILLA_GRADIENT, {}),
    ("smoothgrad", pb.METHOD_SMOOTHGRAD, {}),
    ("vargrad", pb.METHOD_VARGRAD, {}),
    ("guided_absolutegrad", pb.METHOD_GUIDED_ABSOLUTEGRAD, {}),
    ("absolutegrad (quantile 0)", pb.METHOD_GUIDED_ABSOLUTEGRAD, {"quantile": 0.0}),
    ("gradcam", pb.METHOD_GRADCAM, {}),
]
NOISE_LEVELS = (0.05, 0.15, 0.3, 0.6, 1.0)
QUANTILES = (0.0, 0.5, 0.85, 0.95, 1.0)
LOGIT_SCALES = (1.0, 100.0)


def generate(task: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized N×3×S×S images, their classes and the object masks (N×S×S)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(0.5 + 0.12 * rng.normal(size=(count, SIZE, SIZE, 3)), 0, 1)
    labels = rng.integers(0, 3, count)
    masks = np.zeros((count, SIZE, SIZE), bool)
    for index in range(count):
        side = int(rng.integers(6, 9))
        top, left = (int(v) for v in rng.integers(0, SIZE - side, 2))
        if task in ("solid", "faint_solid"):
            contrast = FAINT_CONTRAST if task == "faint_solid" else 1.0
            colour = 0.5 + contrast * (COLOURS[labels[index]] - 0.5)
            patch = np.broadcast_to(colour, (side, side, 3))
        else:
            rows, cols = np.mgrid[0:side, 0:side]
            phase = (rows, cols, rows + cols)[labels[index]]
            patch = np.repeat(((phase // 2) % 2).astype(np.float32)[..., None], 3, axis=2)
        pixels[index, top:top + side, left:left + side] = patch
        masks[index, top:top + side, left:left + side] = True
    images = ((pixels.astype(np.float32) - MEAN) / STD).transpose(0, 3, 1, 2).copy()
    return images, labels.astype(np.int64), masks


class SmallCNN(nn.Module):
    """Three ReLU convolutions, global average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.fc(self.pool(x).flatten(1))


def train(task: str, steps: int) -> tuple[SmallCNN, dict[str, float]]:
    """Adam on 3,000 generated images, batch 64, one thread, seeded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        images, labels, _ = generate(task, 3000, SEED)
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        model = SmallCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        started = time.perf_counter()
        for _ in range(steps):
            index = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    test_images, test_labels, _ = generate(task, 500, SEED + 100)
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_images)).argmax(1).numpy()
    return model, {"train_seconds": seconds, "final_loss": float(loss.detach()),
                   "test_accuracy": float((predicted == test_labels).mean())}


def export(model: SmallCNN, task: str, root: Path) -> ModelHandle:
    export_package(model, name=task, version=1, input_shape=(3, SIZE, SIZE), mean=[MEAN] * 3,
                   std=[STD] * 3, class_labels=("0", "1", "2"), repository=root, head="fc")
    repository = Repository(root)
    repository.load_all()
    return repository.get(task)


def scores(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Mean relevance mass inside the object and the pointing-game hit rate."""
    maps = np.maximum(np.asarray(maps, np.float64), 0.0)
    totals = maps.reshape(len(maps), -1).sum(axis=1)
    inside = (maps * masks).reshape(len(maps), -1).sum(axis=1)
    mass = np.where(totals > 0, inside / np.where(totals > 0, totals, 1.0), 0.0)
    peaks = maps.reshape(len(maps), -1).argmax(axis=1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(maps)), peaks]
    return {"mass": float(mass.mean()), "mass_per_image": [round(float(m), 4) for m in mass],
            "pointing": float(hits.mean())}


def explain(handle: ModelHandle, method: int, params: dict[str, Any], images: np.ndarray,
            labels: np.ndarray) -> np.ndarray:
    handler = registry.get(method_name(method))
    job = Job(model=handle, inputs=images, targets=labels, params=handler.params(**params),
              base_logits=handle.run(images)[0], seed=EXPLAIN_SEED)
    return handler.explain(job).maps


def noisy_gradients(model: nn.Module, image: np.ndarray, target: int, sigma: float,
                    draws: list[torch.Tensor]) -> torch.Tensor:
    """S×C×H×W gradients of the target logit at image + σ·z for the given draws."""
    noisy = (torch.from_numpy(image[None]) + sigma * torch.cat(draws)).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(noisy)[:, target].sum(), noisy)
    return grad


def mechanism(model: SmallCNN, images: np.ndarray, labels: np.ndarray, masks: np.ndarray,
              samples: int, quantile: float = 0.85, noise_level: float = 0.15) -> dict[str, float]:
    """Inside versus outside the object, on the handler's own noise, at the defaults."""
    draws = handler_noise(EXPLAIN_SEED, images.shape, samples)
    sigmas = noise_sigmas(images, noise_level)
    found: dict[str, list[float]] = {key: [] for key in (
        "gradient_ratio", "variance_ratio", "object_above_quantile", "outside_above_quantile",
        "guide_inside", "guide_outside", "relu_flip_interior", "relu_flip_background",
        "preactivation_interior", "preactivation_background")}
    for index, image in enumerate(images):
        grad = noisy_gradients(model, image, int(labels[index]), float(sigmas[index]),
                               draws[index])
        variance = grad.var(dim=0)
        channels = variance.shape[0]
        threshold = torch.quantile(variance.reshape(channels, -1), quantile, dim=1).view(-1, 1, 1)
        guide = torch.where(variance > threshold, torch.ones_like(variance), variance)
        inside = torch.from_numpy(masks[index])
        interior = inside.clone()
        interior[1:] &= inside[:-1]
        interior[:-1] &= inside[1:]
        interior[:, 1:] &= inside[:, :-1]
        interior[:, :-1] &= inside[:, 1:]
        found["gradient_ratio"].append(float(grad.abs()[:, :, inside].mean()
                                             / grad.abs()[:, :, ~inside].mean()))
        found["variance_ratio"].append(float(variance[:, inside].mean()
                                             / variance[:, ~inside].mean()))
        above = variance > threshold
        found["object_above_quantile"].append(float(above[:, inside].float().mean()))
        found["outside_above_quantile"].append(float(above[:, ~inside].float().mean()))
        found["guide_inside"].append(float(guide[:, inside].mean()))
        found["guide_outside"].append(float(guide[:, ~inside].mean()))
        with torch.no_grad():
            clean = model.conv1(torch.from_numpy(image[None]))[0]
            noisy = model.conv1(torch.from_numpy(image[None]) + float(sigmas[index])
                                * torch.cat(draws[index]))
        flips = ((noisy > 0) != (clean > 0)).float().mean(dim=(0, 1))
        found["relu_flip_interior"].append(float(flips[interior].mean()))
        found["relu_flip_background"].append(float(flips[~inside].mean()))
        found["preactivation_interior"].append(float(clean.abs()[:, interior].median()))
        found["preactivation_background"].append(float(clean.abs()[:, ~inside].median()))
    return {key: float(np.mean(values)) for key, values in found.items()}


def scaled(model: SmallCNN, factor: float) -> SmallCNN:
    """The same classifier with its logits multiplied by ``factor`` (same predictions)."""
    copied = copy.deepcopy(model)
    copied.fc.weight.mul_(factor)
    copied.fc.bias.mul_(factor)
    return copied


def run_task(task: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model, training = train(task, args.steps)
    print(f"{task}: trained in {training['train_seconds']:.1f} s, "
          f"test accuracy {training['test_accuracy']:.3f}", flush=True)
    handle = export(model, task, root)
    images, labels, masks = generate(task, args.images, SEED + 1)
    area = float(masks.mean())
    methods: dict[str, Any] = {}
    for name, method, params in METHODS:
        if method not in {method_enum(h.name) for h in registry.handlers()}:
            continue
        methods[name] = scores(explain(handle, method, params, images, labels), masks)
    samples = 20
    _, reference = reference_per_image(model, images, labels, EXPLAIN_SEED, samples, 0.85, 0.15)
    methods["guided_absolutegrad (authors' code)"] = scores(reference, masks)
    ours = explain(handle, pb.METHOD_GUIDED_ABSOLUTEGRAD, {}, images, labels)
    reference_error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    sweep: dict[str, dict[str, float]] = {}
    for level in args.noise_levels:
        for quantile in args.quantiles:
            found = scores(explain(handle, pb.METHOD_GUIDED_ABSOLUTEGRAD,
                                   {"noise_level": level, "quantile": quantile},
                                   images, labels), masks)
            sweep[f"noise_level={level} quantile={quantile}"] = {
                "mass": found["mass"], "pointing": found["pointing"]}
    logit_scale: dict[str, float] = {}
    base_maps = None
    for factor in LOGIT_SCALES:
        _, maps = reference_per_image(scaled(model, factor), images, labels, EXPLAIN_SEED,
                                      samples, 0.85, 0.15)
        logit_scale[f"x{factor:g} mass"] = scores(maps, masks)["mass"]
        if base_maps is None:
            base_maps = maps
        else:
            logit_scale[f"x{factor:g} max map change"] = float(np.abs(maps - base_maps).max())
    return {"training": training, "object_area": area, "methods": methods,
            "ours_vs_authors_max_relative_error": reference_error,
            "mechanism": mechanism(model, images, labels, masks, samples),
            "sweep": sweep, "logit_scale": logit_scale}


def print_task(task: str, result: dict[str, Any]) -> None:
    print(f"\n{task}: object area {result['object_area']:.3f} (a uniform map's mass)")
    for name, found in result["methods"].items():
        print(f"  {name:38s} mass {found['mass']:.3f}  pointing {found['pointing']:.2f}")
    print(f"  ours vs authors' code: max relative error "
          f"{result['ours_vs_authors_max_relative_error']:.1e}")
    for key, value in result["mechanism"].items():
        print(f"  {key:30s} {value:.4g}")
    print("  sweep (mass / pointing):")
    for key, found in result["sweep"].items():
        print(f"    {key:32s} {found['mass']:.3f} / {found['pointing']:.2f}")
    for key, value in result["logit_scale"].items():
        print(f"  logits {key}: {value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200, help="training steps (batch 64)")
    parser.add_argument("--quick", action="store_true", help="4 images, a small sweep")
    parser.add_argument("--out", type=Path, help="results folder")
    args = parser.parse_args()
    args.noise_levels, args.quantiles = NOISE_LEVELS, QUANTILES
    if args.quick:
        args.images, args.noise_levels, args.quantiles = 4, (0.15,), (0.0, 0.85)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.absolutegrad_solid"
                   + (" --quick" if args.quick else ""),
        "images": args.images, "steps": args.steps, "tasks": {}}
    with tempfile.TemporaryDirectory() as folder:
        for task in TASKS:
            results["tasks"][task] = run_task(task, args, Path(folder))
            print_task(task, results["tasks"][task])
    out = args.out or (QUICK_RESULTS if args.quick else None)
    print(f"\nwrote {write_json('absolutegrad_solid', results, out)}")


if __name__ == "__main__":
    main()
