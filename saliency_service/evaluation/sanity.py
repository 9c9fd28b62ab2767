"""Sanity checks for saliency maps (Adebayo et al., https://arxiv.org/abs/1810.03292).

A map that explains the model must change when the model does. Three tests, each comparing a
method's maps on the same images and targets with the original model's. A "layer" is one of the
model's top-level modules in forward order (``stem``, ``layer1`` … ``fc``), read off the ONNX
node names that carry each node's module path (``/layer3/layer3.1/conv2/Conv``, as
``saliency export`` and torch.onnx write them); a step redraws every parameterized module
inside it:

- cascading randomization: the top layer's weights, then the top two, … down to every layer,
  redrawn (``saliency_service.packaging.randomized``);
- independent randomization: one layer at a time;
- random logit: the original model, explaining a random other class.

Similarity (per image, then averaged): Spearman rank correlation of |map| (the paper's main
measure), SSIM (Wang et al. 2004, an 11-tap Gaussian window with σ = 1.5 on maps min-max scaled
to [0, 1], computed as torchmetrics' ``structural_similarity_index_measure``), and the top-k
intersection (the share of the top 10 % pixels the two maps have in common). A method **passes** the
randomization test when its Spearman correlation, averaged over the cascade's steps (from the
top layer alone to every layer), is below ``PASS_BELOW``: a map that stays the same while the
top layers are redrawn (Guided Backprop's known failure) cannot explain those layers' decision,
even if it changes once the first convolution is redrawn too. It passes the random-logit test
when the mean correlation with the map of a random other class is below ``PASS_BELOW``.

The randomized copies are real packages, served by a local ``SaliencyServer`` over a temporary
repository beside a copy of the original, so the maps come out of the same code path as any.
"""

from __future__ import annotations

import csv
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import correlate1d, sobel

from saliency_service.evaluation.metrics import _order

PASS_BELOW = 0.5
TOP_SHARE = 0.1
SSIM_SIGMA = 1.5
SSIM_TAPS = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
RANDOM_LOGIT_SEED = 1810
TESTS = ("cascading", "independent", "random_logit")
COLUMNS = ("run", "method", "test", "step", "layers", "images", "spearman", "ssim", "topk")

Explain = Callable[[str, Any, np.ndarray, np.ndarray], np.ndarray]
"""(model name, variant, uint8 pixels N×H×W×C, targets N) → float maps N×H×W."""


# ---- similarity ----------------------------------------------------------------------------


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as scipy's rankdata."""
    order = np.argsort(values, axis=-1, kind="stable")
    ranks = np.empty(values.shape, np.float64)
    for row, (vals, idx) in enumerate(zip(values, order, strict=True)):
        sorted_vals = vals[idx]
        # Boundaries of runs of equal values; each run gets the mean of its positions.
        starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
        ends = np.r_[starts[1:], len(vals)]
        mean_rank = (starts + ends - 1) / 2.0
        ranks[row, idx] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman_abs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of |map| per image (NaN where a map is constant)."""
    a = _ranks(np.abs(np.asarray(first, np.float64)).reshape(len(first), -1))
    b = _ranks(np.abs(np.asarray(second, np.float64)).reshape(len(second), -1))
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def _minmax(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, np.float64)
    low = maps.reshape(len(maps), -1).min(axis=1).reshape(-1, 1, 1)
    span = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1) - low
    return np.divide(maps - low, span, out=np.zeros_like(maps), where=span > 0)


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(SSIM_TAPS) - (SSIM_TAPS - 1) / 2
    window = np.exp(-(offsets ** 2) / (2 * SSIM_SIGMA ** 2))
    return window / window.sum()


def ssim(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Mean structural similarity per image of min-max scaled maps (data range 1).

    Local means, variances (clamped at 0) and covariance under the Gaussian window, the image
    mirrored at its border, averaged over every pixel, as torchmetrics does.
    """
    x, y = _minmax(first), _minmax(second)
    window = _gaussian_window()

    def blur(values: np.ndarray) -> np.ndarray:
        out = correlate1d(values, window, axis=1, mode="mirror")
        return correlate1d(out, window, axis=2, mode="mirror")

    mu_x, mu_y = blur(x), blur(y)
    var_x = np.clip(blur(x * x) - mu_x ** 2, 0.0, None)
    var_y = np.clip(blur(y * y) - mu_y ** 2, 0.0, None)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.reshape(len(index), -1).mean(axis=1)


def topk_intersection(first: np.ndarray, second: np.ndarray, share: float = TOP_SHARE,
                      ) -> np.ndarray:
    """Share of the top ``share`` pixels of |first| that are also among the top of |second|."""
    flat = np.asarray(first).reshape(len(first), -1)
    k = max(1, round(share * flat.shape[1]))
    top_a = _order(np.abs(first))[:, :k]
    top_b = _order(np.abs(second))[:, :k]
    return np.array([len(np.intersect1d(a, b)) / k for a, b in zip(top_a, top_b, strict=True)])


def similarities(first: np.ndarray, second: np.ndarray) -> dict[str, np.ndarray]:
    return {"spearman": spearman_abs(first, second), "ssim": ssim(first, second),
            "topk": topk_intersection(first, second)}


def edge_maps(images: np.ndarray) -> np.ndarray:
    """A map that ignores the model: the Sobel gradient magnitude of the image (the control
    that must fail every test; Adebayo et al. compare Guided Backprop with it)."""
    gray = np.asarray(images, np.float64).mean(axis=-1)
    magnitude = np.hypot(sobel(gray, axis=1), sobel(gray, axis=2))
    return _minmax(magnitude)


# ---- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVariant:
    """One served copy: ``test`` and ``step`` place it on the curve."""

    name: str
    test: str
    step: int
    layers: tuple[str, ...]


def plan(model: str, layers: list[str]) -> list[ModelVariant]:
    """Cascading from the top layer down, then each layer alone (the top one is cascade 1)."""
    top_down = list(reversed(layers))
    variants = [ModelVariant(f"{model}-cascade-{k}", "cascading", k, tuple(top_down[:k]))
                for k in range(1, len(top_down) + 1)]
    for step, layer in enumerate(top_down, start=1):
        name = variants[0].name if step == 1 else f"{model}-only-{layer}"
        variants.append(ModelVariant(name, "independent", step, (layer,)))
    return variants


def random_targets(targets: np.ndarray, classes: int, seed: int = RANDOM_LOGIT_SEED) -> np.ndarray:
    """A uniformly drawn class other than each target."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, classes, size=len(targets))
    return (np.asarray(targets) + shift) % classes


def build_repository(package: Path, model: str, root: Path, seed: int = 0,
                     progress: bool = True) -> tuple[list[ModelVariant], list[str]]:
    """The original package and every randomized copy ``plan`` needs, under ``root``."""
    from saliency_service.packaging.randomized import layers, randomize_package  # noqa: PLC0415 - torch

    shutil.copytree(package, root / model / "1")
    names = layers(package)
    variants = plan(model, names)
    made: set[str] = set()
    for variant in variants:
        if variant.name in made:
            continue
        if progress:
            print(f"sanity checks: randomizing {', '.join(variant.layers)} → {variant.name}",
                  file=sys.stderr)
        randomize_package(package, root, variant.name, variant.layers, seed)
        made.add(variant.name)
    return variants, names


def run_checks(package: Path, model: str, methods: list[Any], pixels: np.ndarray,
               targets: np.ndarray, classes: int, explain_with: Callable[[str], Explain],
               key: str, seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Every test for every method; returns the rows of ``sanity.csv``.

    ``explain_with(address)`` gives the function that asks the server at ``address``.
    """
    from saliency_service.serving.background import local_server  # noqa: PLC0415 - the server only here

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="saliency-sanity-") as folder:
        root = Path(folder)
        variants, layers = build_repository(package, model, root, seed, progress)
        with local_server(root, max_batch=max(16, len(pixels))) as server:
            explain = explain_with(server.address)
            others = random_targets(targets, classes)
            for method in methods:
                label = getattr(method, "label", str(method))
                if progress:
                    print(f"sanity checks: {label}", file=sys.stderr)
                original = explain(model, method, pixels, targets)
                cache: dict[str, np.ndarray] = {}
                for variant in variants:
                    if variant.name not in cache:
                        cache[variant.name] = explain(variant.name, method, pixels, targets)
                    rows.append(_row(key, label, variant.test, variant.step, variant.layers,
                                     similarities(original, cache[variant.name])))
                rows.append(_row(key, label, "random_logit", 0, (),
                                 similarities(original, explain(model, method, pixels, others))))
    rows += control_rows(key, pixels, len(layers))
    return rows


def control_rows(key: str, pixels: np.ndarray, steps: int) -> list[dict[str, Any]]:
    """The edge detector's rows: the model is ignored, so every similarity is exactly 1."""
    edges = edge_maps(pixels.astype(np.float64) / 255.0)
    same = similarities(edges, edges)
    rows = [_row(key, "edge detector (control)", test, step, (), same)
            for test in ("cascading", "independent") for step in range(1, steps + 1)]
    rows.append(_row(key, "edge detector (control)", "random_logit", 0, (), same))
    return rows


def _row(key: str, label: str, test: str, step: int, layers: tuple[str, ...],
         values: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"run": key, "method": label, "test": test, "step": step, "layers": "+".join(layers),
            "images": int(np.isfinite(values["spearman"]).sum()),
            **{name: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
               for name, v in values.items()}}


def write_rows(path: Path, key: str, rows: list[dict[str, Any]]) -> None:
    """Replaces this run's rows in ``sanity.csv``, keeping other runs'."""
    kept = [r for r in read_rows(path) if r["run"] != key]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in [*kept, *rows]:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---- the report section --------------------------------------------------------------------


def verdict(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return "**passes**" if value < PASS_BELOW else "**fails**"


def cascade_mean(rows: list[dict[str, str]], method: str) -> float:
    """Spearman ρ averaged over the cascade's steps: the reading of the randomization test."""
    values = [float(r["spearman"]) for r in rows if r["method"] == method
              and r["test"] == "cascading" and r["spearman"] not in ("", "nan")]
    return float(np.mean(values)) if values else math.nan


def section(rows: list[dict[str, str]]) -> list[str]:
    """The report's "Sanity checks" section: one line per method, the curve as a figure."""
    if not rows:
        return []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    steps = max(int(r["step"]) for r in rows if r["test"] == "cascading")
    cascade_layers = {int(r["step"]): r["layers"] for r in rows
                      if r["test"] == "cascading" and r["layers"]}
    images = max(int(r["images"] or 0) for r in rows)

    def get(method: str, test: str, step: int, column: str) -> float:
        for r in rows:
            if r["method"] == method and r["test"] == test and int(r["step"]) == step:
                return float(r[column]) if r[column] not in ("", "nan") else math.nan
        return math.nan

    full = cascade_layers.get(steps, "").replace("+", ", ")
    lines = ["## Sanity checks (Adebayo et al., arXiv 1810.03292)", "",
             f"Maps on {images} images from the original model against maps from copies with "
             f"randomized weights (cascading from the top layer down to all {steps}: {full}; "
             "and each layer alone), and against maps of a random other class. Similarity: "
             "Spearman ρ of |map|, SSIM, top-10 % intersection. Randomization passes when ρ "
             f"averaged over the cascade's steps (ρ̄) is below {PASS_BELOW}; random logit "
             f"when ρ is below {PASS_BELOW}. The edge detector ignores the model: it is the "
             "control that must fail.", "",
             "| method | cascade ρ̄ | ρ, all layers | SSIM, all | top-k, all | randomization "
             "| random-logit ρ | SSIM | top-k | random logit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        mean_rho = cascade_mean(rows, method)
        logit = get(method, "random_logit", 0, "spearman")
        lines.append(
            f"| {method} | {_fmt(mean_rho)} | {_fmt(get(method, 'cascading', steps, 'spearman'))} "
            f"| {_fmt(get(method, 'cascading', steps, 'ssim'))} | "
            f"{_fmt(get(method, 'cascading', steps, 'topk'))} | {verdict(mean_rho)} | "
            f"{_fmt(logit)} | {_fmt(get(method, 'random_logit', 0, 'ssim'))} | "
            f"{_fmt(get(method, 'random_logit', 0, 'topk'))} | {verdict(logit)} |")
    for test, title, prefix in (("cascading", "after each cascade step (top layer first)", "+"),
                                ("independent", "with one layer randomized alone", "")):
        names = {int(r["step"]): r["layers"].split("+")[-1] for r in rows
                 if r["test"] == test and r["layers"]}
        lines += ["", f"Spearman ρ {title}:", "",
                  "| method | " + " | ".join(f"{prefix}{names.get(s, s)}"
                                            for s in range(1, steps + 1)) + " |",
                  "|---|" + "---|" * steps]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(
                _fmt(get(method, test, s, "spearman")) for s in range(1, steps + 1)) + " |")
    lines += ["", "Figure: `sanity_checks.png` (ρ and SSIM over the cascade and per layer).", ""]
    return lines


def figure(rows: list[dict[str, str]], path: Path) -> None:
    """ρ and SSIM over the cascade, and ρ for each layer alone, one line per method."""
    if not rows:
        return
    import matplotlib  # noqa: PLC0415 - plotting only when writing the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = (("cascading", "spearman", "cascading: Spearman ρ of |map|"),
              ("cascading", "ssim", "cascading: SSIM"),
              ("independent", "spearman", "one layer at a time: Spearman ρ"))
    figure_, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    for axis, (test, column, title) in zip(axes, panels, strict=True):
        chosen = sorted((r for r in rows if r["test"] == test), key=lambda r: int(r["step"]))
        ticks = list(dict.fromkeys((int(r["step"]), r["layers"].split("+")[-1] or str(r["step"]))
                                   for r in chosen if r["method"] != "edge detector (control)"))
        for index, method in enumerate(methods):
            mine = [r for r in chosen if r["method"] == method]
            control = method.startswith("edge")
            axis.plot([int(r["step"]) for r in mine],
                      [float(r[column]) if r[column] else math.nan for r in mine],
                      ":" if control else "-o", color="k" if control else plt.cm.tab20(index % 20),
                      label=method, markersize=3, lw=1.2)
        axis.axhline(PASS_BELOW, color="grey", lw=0.8, ls="--")
        axis.set_xticks([s for s, _ in ticks])
        axis.set_xticklabels([("+" if test == "cascading" else "") + name for _, name in ticks],
                             fontsize=7, rotation=30)
        axis.set_title(title, fontsize=9)
        axis.set_ylim(-0.5, 1.05)
    axes[0].set_ylabel("similarity to the original model's maps")
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure_.tight_layout()
    figure_.savefig(path, dpi=110)
    plt.close(figure_)


def _fmt(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.2f}"
