"""``saliency evaluate``: score every method a served model offers, and what each one costs.

Draws synthetic cell images with ground truth (``evaluation.cells``) or takes Fashion-MNIST test
photographs (``--dataset fashion-mnist``: no ground truth, so faithfulness only), asks the
running service for a map per method over gRPC, scores each map (``evaluation.metrics`` and
``evaluation.road``: ground truth against the cells' heatmaps and masks, faithfulness against
the model's ONNX Runtime session), runs the sanity checks (``evaluation.sanity``) and writes

- ``results.csv``: one row per image × method, with its cost (passes per image, ms per image);
- ``maps/<run>/<method>.npz``: the maps themselves;
- ``summary.md``: method × metric means, cost, the cost/quality Pareto front, and the papers'
  directional claims checked with paired bootstrap intervals;
- ``examples.png`` (maps beside the ground truth) and ``cost_quality.png`` (with the front);
- ``sanity.csv`` and ``sanity_checks.png``: the randomization and random-logit tests.

A re-run with the same model, configuration and method reuses every row already in
``results.csv`` (keyed by run, method and image index) and only computes what is missing.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from saliency_service.evaluation import fashion_mnist, metrics, road, sanity
from saliency_service.evaluation.cells import (
    CLASS_NAMES,
    HELD_OUT_CONFIG,
    TEST_CONFIG,
    CellBatch,
    CellConfig,
)
from saliency_service.evaluation.cells import generate as generate_cells

CONFIGS = {"test": TEST_CONFIG, "held_out": HELD_OUT_CONFIG}
DATASETS = ("cells", "fashion-mnist")
# Evaluated beside the defaults under "all": AbsoluteGrad is Guided AbsoluteGrad with p = 0,
# the ablation behind the paper's main claim (https://arxiv.org/abs/2404.15564).
EXTRA_VARIANTS = {"guided_absolutegrad": ({"quantile": "0"},)}
PIXEL_GRADIENT_METHODS = ("vanilla_gradient", "input_x_gradient", "smoothgrad", "vargrad",
                          "integrated_gradients", "guided_backprop", "guided_absolutegrad")

GROUND_TRUTH_COLUMNS = (
    "fiveband_pixel_accuracy", "fiveband_precision", "fiveband_recall", "fiveband_fpr",
    "soft_pixel_accuracy_mean", "soft_precision_mean", "soft_recall_mean", "soft_fpr_mean",
    "soft_pixel_accuracy_best", "soft_precision_best", "soft_recall_best", "soft_fpr_best",
    "pointing_game", "relevance_mass", "relevance_rank",
)
FAITHFULNESS_COLUMNS = ("rcap", "deletion_auc", "insertion_auc", "road_morf", "road_lerf")
KEY_COLUMNS = ("run", "method", "index", "params")
COLUMNS = (*KEY_COLUMNS, "label", "target", "predicted", "background", "forward_passes",
           "backward_passes", "ms", "truncated", *FAITHFULNESS_COLUMNS, *GROUND_TRUTH_COLUMNS)

# Columns of the summary table: (csv column, heading, higher is better).
SUMMARY_METRICS = (
    ("rcap", "RCAP ↑", True),
    ("deletion_auc", "deletion ↓", False),
    ("insertion_auc", "insertion ↑", True),
    ("road_morf", "ROAD MoRF ↓", False),
    ("road_lerf", "ROAD LeRF ↑", True),
    ("fiveband_precision", "5-band prec ↑", True),
    ("fiveband_recall", "5-band rec ↑", True),
    ("soft_precision_mean", "soft prec μ ↑", True),
    ("soft_recall_mean", "soft rec μ ↑", True),
    ("soft_pixel_accuracy_best", "soft acc u ↑", True),
    ("pointing_game", "pointing ↑", True),
    ("relevance_mass", "mass ↑", True),
    ("relevance_rank", "rank ↑", True),
)


@dataclass(frozen=True)
class Variant:
    """A method with optional non-default parameters, reported as its own row."""

    method: str
    params: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        if not self.params:
            return self.method
        return f"{self.method}[{','.join(f'{k}={v}' for k, v in self.params)}]"

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``"rise"`` or ``"guided_absolutegrad:quantile=0,samples=10"``."""
        method, _, rest = text.strip().partition(":")
        params = []
        for item in filter(None, rest.split(",")):
            name, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"method parameter {item!r} must look like name=value")
            params.append((name.strip(), value.strip()))
        return cls(method.strip().lower(), tuple(params))


def select_variants(spec: str, offered: list[str]) -> list[Variant]:
    """``--methods``: comma-separated "all" (every offered method plus ``EXTRA_VARIANTS``)
    and method names, each optionally with parameters: ``all,rise:masks=500,cells=5,occlusion``
    (an item ``name=value`` continues the previous method's parameters; ``-name`` drops a
    method, e.g. ``all,-decam``).
    """
    texts: list[str] = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in item and ":" not in item and texts:
            texts[-1] += ("," if ":" in texts[-1] else ":") + item
        else:
            texts.append(item)
    chosen: list[Variant] = []
    dropped = {text[1:].strip().lower() for text in texts if text.startswith("-")}
    for text in texts:
        if text.startswith("-"):
            continue
        if text == "all":
            for name in offered:
                chosen.append(Variant(name))
                for params in EXTRA_VARIANTS.get(name, ()):
                    chosen.append(Variant(name, tuple(params.items())))
            continue
        variant = Variant.parse(text)
        if variant.method not in offered:
            raise SystemExit(f"method {variant.method!r} is not offered by the model; "
                             f"offered: {', '.join(offered)}")
        chosen.append(variant)
    unique = [v for v in dict.fromkeys(chosen) if v.method not in dropped]
    if not unique:
        raise SystemExit("--methods selected nothing")
    return unique


@dataclass
class Options:
    server: str = "localhost:50051"
    model: str = "demo"
    models: Path = Path("models")
    images: int = 200
    size: int | None = None
    config: str = "test"
    methods: str = "all"
    out: Path = Path("report")
    batch: int = 8
    seed: int = 0
    timeout: float = 600.0
    target: str = "label"
    examples: int = 6
    progress: bool = True
    fill: bool = True  # False: only summarize what the cache already holds
    deadline: float = 0.0  # seconds of filling before writing the report (0 = no limit)
    dataset: str = "cells"
    road_images: int = 50  # ROAD on the first N images (a sparse solve per removal share)
    sanity_images: int = 16  # sanity checks on the first N images (0 = off)
    sanity_methods: str = ""  # default: the --methods selection


@dataclass
class Run:
    """Everything fixed for one evaluation: what is scored and where the cache lives."""

    options: Options
    key: str
    config: CellConfig
    variants: list[Variant]
    engines: dict[str, str]
    defaults: dict[str, dict[str, str]]
    version: int
    map_size: tuple[int, int]
    cells: CellBatch
    errors: dict[str, str] = field(default_factory=dict)
    class_names: tuple[str, ...] = CLASS_NAMES
    package: Path = Path()

    @property
    def sanity_key(self) -> str:
        return f"{self.key}-sanity{self.options.sanity_images}"


# ---- the work ------------------------------------------------------------------------------


def run(options: Options) -> Path:
    """Fills the cache for every (method, image) not yet scored, then writes the report.

    Returns the path of ``summary.md``.
    """
    from saliency_service.client.client import SaliencyClient  # noqa: PLC0415 - grpc only when evaluating

    options.out.mkdir(parents=True, exist_ok=True)
    with SaliencyClient(options.server, timeout=options.timeout) as client:
        info = client.get_model(options.model)
        if not info.status.ready:
            raise SystemExit(f"model {options.model!r} is not ready: {info.status.error}")
        version = int(info.status.version)
        offered = [m.name for m in info.methods]
        engines = {m.name: m.engine for m in info.methods}
        defaults = {m.name: dict(m.defaults) for m in info.methods}
        variants = select_variants(options.methods, offered)
        package = options.models / options.model / str(version)
        if not (package / "model.onnx").is_file():
            raise SystemExit(f"{package}/model.onnx not found: --models must point at the "
                             "repository the server loads (the metrics run the same ONNX model)")
        classifier = metrics.OnnxClassifier.from_package(package, batch_size=64)
        images, class_names = load_images(options)
        if options.target == "label" and len(info.class_labels) != len(class_names):
            raise SystemExit(f"model {options.model!r} has {len(info.class_labels)} classes, "
                             f"{options.dataset} has {len(class_names)}: use --target predicted")
        config = CONFIGS[options.config]
        if options.size:
            config = dataclasses.replace(config, size=options.size)
        manifest = json.loads((package / "manifest.json").read_text())
        weights = manifest.get("files", {}).get("model.onnx", {}).get("sha256", "")[:8]
        source = (f"{options.config}-{config.size}px-seed{config.seed}"
                  if options.dataset == "cells" else "fashion_mnist-test")
        key = (f"{source}-{options.model}-v{version}-{weights}-target_{options.target}")
        state = Run(options, key, config, variants, engines, defaults, version,
                    tuple(int(d) for d in info.input.shape[2:4]),  # type: ignore[arg-type]
                    images, class_names=class_names, package=package)
        if options.fill:
            _fill(client, classifier, state)
            if options.sanity_images > 0 and "(run)" not in state.errors:  # not past --deadline
                _sanity(state, select_variants(options.sanity_methods or options.methods,
                                               offered), len(info.class_labels))
    return write_report(state)


def load_images(options: Options) -> tuple[CellBatch, tuple[str, ...]]:
    """The evaluated images: generated cells, or Fashion-MNIST's first test photographs (no
    ground truth: empty masks, so the ground-truth scores are NaN, as for a blank cell)."""
    if options.dataset == "cells":
        config = CONFIGS[options.config]
        if options.size:
            config = dataclasses.replace(config, size=options.size)
        return generate_cells(options.images, config), CLASS_NAMES
    if options.dataset != "fashion-mnist":
        raise SystemExit(f"--dataset must be one of {', '.join(DATASETS)}")
    try:
        data = fashion_mnist.load("test", options.images)
    except fashion_mnist.DatasetMissing as exc:
        raise SystemExit(f"error: {exc}") from exc
    blank = np.zeros(data.images.shape[:3], np.float32)
    return (CellBatch(data.images, data.labels, blank, blank.astype(bool)),
            fashion_mnist.CLASS_NAMES)


def _sanity(state: Run, variants: list[Variant], classes: int) -> None:
    """The sanity checks on the first ``--sanity-images`` images, unless already in
    ``sanity.csv`` for this run (model weights, images and count are in the key)."""
    options = state.options
    path = options.out / "sanity.csv"
    done = {r["method"] for r in sanity.read_rows(path) if r["run"] == state.sanity_key}
    if all(v.label in done for v in variants):
        return
    count = min(options.sanity_images, len(state.cells.labels))
    pixels = state.cells.images[:count]
    labels = state.cells.labels[:count]

    def explain_with(address: str) -> sanity.Explain:
        from saliency_service.client.client import SaliencyClient  # noqa: PLC0415

        def explain(model: str, variant: Any, images: np.ndarray,
                    targets: np.ndarray) -> np.ndarray:
            maps = []
            with SaliencyClient(address, timeout=options.timeout) as client:
                for begin in range(0, len(images), options.batch):
                    part = slice(begin, begin + options.batch)
                    result = client.explain(model, variant.method, seed=options.seed,
                                            params=params_message(variant), tensor=images[part],
                                            target=[int(t) for t in targets[part]])
                    maps.append(np.asarray(result.maps, np.float32))
            return np.concatenate(maps)

        return explain

    rows = sanity.run_checks(state.package, options.model, variants, pixels, labels, classes,
                             explain_with, state.sanity_key, options.seed, options.progress)
    sanity.write_rows(path, state.sanity_key, rows)


def _fill(client: Any, classifier: metrics.OnnxClassifier, state: Run) -> None:
    """Computes and appends the rows still missing from ``results.csv``.

    Work goes round by round: one batch of images through every method, then the next batch.
    A run cut short (or a slow method's ``--deadline``) thus leaves every method scored on the
    same first images, which is what the paired comparisons need.
    """
    from tqdm import tqdm  # noqa: PLC0415

    options = state.options
    csv_path = options.out / "results.csv"
    done = {tuple(r[k] for k in KEY_COLUMNS) for r in read_rows(csv_path)}
    todo = {v: [i for i in range(options.images)
                if (state.key, v.label, str(i), effective_params(state, v)) not in done]
            for v in state.variants}
    total = sum(len(indices) for indices in todo.values())
    bar = tqdm(total=total, desc="evaluate", unit="map", file=sys.stderr,
               disable=not options.progress or total == 0)
    caches = {v: MapCache(options.out / "maps" / state.key / f"{slug(v.label)}.npz")
              for v in todo}
    stop_at = time.monotonic() + options.deadline if options.deadline else math.inf
    for begin in range(0, options.images, options.batch):
        for variant, indices in todo.items():
            batch = [i for i in indices if begin <= i < begin + options.batch]
            if not batch or variant.label in state.errors:
                continue
            if time.monotonic() > stop_at:
                state.errors.setdefault("(run)", f"--deadline reached at image {begin}")
                bar.close()
                return
            bar.set_postfix_str(variant.label)
            try:
                rows, maps = _score_batch(client, classifier, state, variant, batch)
            except Exception as exc:  # noqa: BLE001 - one failing method must not stop the rest
                state.errors[variant.label] = _describe(exc)
                print(f"{variant.label}: {state.errors[variant.label]}", file=sys.stderr)
                continue
            caches[variant].add(batch, maps)  # the map is saved before its row is written
            append_rows(csv_path, rows)
            bar.update(len(batch))
    bar.close()


def effective_params(state: Run, variant: Variant) -> str:
    """The parameters a method ran with (server defaults, then the variant's), as the cache key:
    a row computed under other defaults is computed again."""
    merged = dict(state.defaults.get(variant.method, {}))
    merged.update(dict(variant.params))
    return json.dumps(merged, sort_keys=True)


def _describe(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return f"{type(exc).__name__}: {exc}"


def _score_batch(client: Any, classifier: metrics.OnnxClassifier, state: Run,
                 variant: Variant, indices: list[int]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """One Explain request for ``indices``, then every metric on its maps."""
    options, cells = state.options, state.cells
    pixels = cells.images[indices]
    height, width = state.map_size
    kwargs: dict[str, Any] = {}
    if pixels.shape[1:3] == (height, width):
        kwargs["tensor"] = pixels  # raw uint8 pixels, preprocessed by the server
    else:
        kwargs["images"] = [png_bytes(p) for p in pixels]  # the server resizes
    if options.target == "label":
        kwargs["target"] = [int(cells.labels[i]) for i in indices]
    result = client.explain(options.model, variant.method, seed=options.seed,
                            params=params_message(variant), **kwargs)
    maps = np.asarray(result.maps, np.float32)
    targets = np.asarray(result.targets, np.int64)
    cost = result.cost
    count = len(indices)
    scores = score_maps(maps, pixels, cells.heatmaps[indices], cells.masks[indices], targets,
                        classifier, road_on=np.asarray(indices) < options.road_images)
    predicted = [int(p.top[0].index) if p.top else -1 for p in result.response.predictions]
    rows = []
    for j, index in enumerate(indices):
        row: dict[str, Any] = {
            "run": state.key, "method": variant.label, "index": index,
            "params": effective_params(state, variant),
            "label": int(cells.labels[index]), "target": int(targets[j]),
            "predicted": predicted[j] if j < len(predicted) else -1,
            "background": int(cells.backgrounds[index]) if cells.backgrounds is not None else -1,
            "forward_passes": cost.forward_passes / count,
            "backward_passes": cost.backward_passes / count,
            "ms": cost.wall_seconds * 1000.0 / count, "truncated": int(cost.truncated),
        }
        row.update({name: float(values[j]) for name, values in scores.items()})
        rows.append(row)
    return rows, maps


def score_maps(maps: np.ndarray, pixels: np.ndarray, heatmaps: np.ndarray, masks: np.ndarray,
               targets: np.ndarray, model: metrics.Probabilities,
               road_on: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every metric, at the maps' resolution (images, heatmaps and masks are resized to it).

    ROAD is scored where ``road_on`` (default: every image) and NaN elsewhere: it solves a
    sparse system per image and removal share.
    """
    height, width = maps.shape[1:]
    if pixels.shape[1:3] != (height, width):
        from saliency_service.protocol.images import resize_uint8  # noqa: PLC0415 - the server's own resize

        pixels = np.stack([resize_uint8(p, height, width) for p in pixels])
    images = pixels.astype(np.float32) / 255.0
    heatmaps = metrics.resize_nearest(heatmaps, height, width)
    masks = metrics.resize_nearest(masks, height, width)
    has_object = masks.reshape(len(masks), -1).any(axis=1)
    out: dict[str, np.ndarray] = {
        "rcap": metrics.rcap(images, maps, targets, model),
        "deletion_auc": metrics.deletion_auc(images, maps, targets, model),
        "insertion_auc": metrics.insertion_auc(images, maps, targets, model),
    }
    chosen = np.ones(len(maps), bool) if road_on is None else np.asarray(road_on, bool)
    for name in ("road_morf", "road_lerf"):
        out[name] = np.full(len(maps), np.nan)
    if chosen.any():
        scores = road.road(images[chosen], maps[chosen], np.asarray(targets)[chosen], model)
        for name in ("road_morf", "road_lerf"):
            out[name][chosen] = scores[name]
    hard = metrics.five_band(maps, heatmaps)
    soft = metrics.soft_five_band(maps, heatmaps)
    ground = {f"fiveband_{k}": v for k, v in hard.items()}
    ground.update({f"soft_{k}": v for k, v in soft.items()})
    ground["pointing_game"] = metrics.pointing_game(maps, masks)
    ground["relevance_mass"] = metrics.relevance_mass(maps, masks)
    ground["relevance_rank"] = metrics.relevance_rank(maps, masks)
    # A blank image has no evidence to point at: ground-truth scores are undefined there.
    out.update({k: np.where(has_object, v, np.nan) for k, v in ground.items()})
    return out


def params_message(variant: Variant) -> Any:
    """The method's params message with the variant's fields set (None for defaults)."""
    from saliency_service.protocol.method_params import ParamError  # noqa: PLC0415
    from saliency_service.protocol.method_params import params_message as message_of  # noqa: PLC0415

    try:
        return message_of(variant.method, dict(variant.params))
    except ParamError as exc:
        raise SystemExit(str(exc)) from exc


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


class MapCache:
    """All maps of one (run, method), by image index, in one ``.npz`` rewritten per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.maps: dict[int, np.ndarray] = {}
        if path.is_file():
            with np.load(path) as data:
                self.maps = dict(zip(data["indices"].tolist(), data["maps"], strict=True))

    def add(self, indices: Iterable[int], maps: np.ndarray) -> None:
        for index, item in zip(indices, maps, strict=True):
            self.maps[int(index)] = item.astype(np.float16)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        order = sorted(self.maps)
        partial = self.path.with_suffix(".partial.npz")
        np.savez(partial, indices=np.asarray(order, np.int64),
                 maps=np.stack([self.maps[i] for i in order]))
        partial.replace(self.path)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{**{k: "" for k in COLUMNS}, **row} for row in csv.DictReader(handle)]


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    new = not path.is_file()
    if not new:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != COLUMNS:  # written by another version: rewrite with today's columns
            old = read_rows(path)
            path.unlink()
            append_rows(path, [{k: r.get(k, "") for k in COLUMNS} for r in old])
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                             for k, v in row.items()})


# ---- the report ----------------------------------------------------------------------------


@dataclass
class MethodSummary:
    label: str
    engine: str
    images: int
    forward: float
    backward: float
    p50_ms: float
    means: dict[str, float]


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) if r.get(name, "") != "" else np.nan for r in rows])


def summarize(rows: list[dict[str, str]], variants: list[Variant],
              engines: dict[str, str]) -> list[MethodSummary]:
    out = []
    for variant in variants:
        mine = [r for r in rows if r["method"] == variant.label]
        if not mine:
            continue
        means = {name: float(np.nanmean(_column(mine, name)))
                 if np.isfinite(_column(mine, name)).any() else math.nan
                 for name, _, _ in SUMMARY_METRICS}
        out.append(MethodSummary(
            label=variant.label, engine=engines.get(variant.method, "?"), images=len(mine),
            forward=float(np.mean(_column(mine, "forward_passes"))),
            backward=float(np.mean(_column(mine, "backward_passes"))),
            p50_ms=float(np.median(_column(mine, "ms"))), means=means))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both lower cost (x) and higher quality (y)."""
    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = any(
            (c <= cost and q >= quality) and (c < cost or q > quality)
            for j, (c, q) in enumerate(points) if j != i
        )
        if not dominated and math.isfinite(quality):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def paired_difference(rows: list[dict[str, str]], first: str, second: str, metric: str,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float, int]:
    """Mean of first − second over images both scored, with a 95 % paired bootstrap interval."""
    by_index = {}
    for r in rows:
        if r["method"] in (first, second) and r.get(metric, "") != "":
            by_index.setdefault(int(r["index"]), {})[r["method"]] = float(r[metric])
    pairs = np.array([[v[first], v[second]] for v in by_index.values()
                      if first in v and second in v])
    if len(pairs) == 0:
        return math.nan, math.nan, math.nan, 0
    diff = pairs[:, 0] - pairs[:, 1]
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high), len(diff)


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def claims(rows: list[dict[str, str]], labels: set[str], ground_truth: bool = True) -> list[str]:
    """The papers' directional claims, each checked on these images with its numbers
    (without ``ground_truth``, only those on faithfulness)."""
    lines: list[str] = []

    def compare(first: str, second: str, metric: str, relation: str) -> str | None:
        if first not in labels or second not in labels:
            missing = [m for m in (first, second) if m not in labels]
            lines.append(f"- {first} {relation} {second} on {metric}: not evaluated "
                         f"({', '.join(missing)} not offered or failed).")
            return None
        mean, low, high, n = paired_difference(rows, first, second, metric)
        if n == 0:
            lines.append(f"- {first} {relation} {second} on {metric}: not evaluated "
                         "(no image scored by both).")
            return None
        a = float(np.nanmean(_column([r for r in rows if r["method"] == first], metric)))
        b = float(np.nanmean(_column([r for r in rows if r["method"] == second], metric)))
        if relation == ">":
            verdict = ("holds" if low > 0 else "does not hold (difference not above 0)"
                       if high >= 0 else "does not hold (reversed)")
        elif relation == "≥":
            verdict = "holds" if high >= 0 and mean >= -0.01 else "does not hold"
        else:  # comparable: the interval within ±10 % of the reference
            margin = 0.1 * abs(b)
            verdict = ("holds" if low >= -margin and high <= margin
                       else "does not hold (differs by more than 10 %)")
        lines.append(f"- {first} ({_fmt(a)}) {relation} {second} ({_fmt(b)}) on {metric}: "
                     f"**{verdict}** — paired difference {_fmt(mean)} "
                     f"[95 % CI {_fmt(low)}, {_fmt(high)}], n = {n}.")
        return verdict

    lines.append("Guided AbsoluteGrad (Huang & Liu, arXiv 2404.15564):")
    compare("guided_absolutegrad", "smoothgrad", "rcap", ">")
    compare("guided_absolutegrad", "guided_absolutegrad[quantile=0]", "rcap", ">")
    lines.append("")
    lines.append("FastCAM (Mundhenk et al., arXiv 1911.11293) and DE-CAM against Grad-CAM:")
    faithfulness_or_truth = ("rcap", "relevance_rank") if ground_truth else ("rcap",)
    for metric in faithfulness_or_truth:
        compare("fastcam", "gradcam", metric, "≥")
    for metric in faithfulness_or_truth:
        compare("decam", "gradcam", metric, "≈")
    if not ground_truth:
        return lines
    lines.append("")
    lines.append("Vanilla gradient has the best five-band precision among pixel-gradient "
                 "methods (Tjoa & Guan, arXiv 2009.02899):")
    present = sorted(label for label in labels if label.split("[")[0] in PIXEL_GRADIENT_METHODS)
    for metric in ("fiveband_precision", "soft_precision_mean"):
        means = {label: float(np.nanmean(_column([r for r in rows if r["method"] == label],
                                                 metric))) for label in present}
        if "vanilla_gradient" not in means or len(means) < 2:
            lines.append(f"- {metric}: not evaluated (needs vanilla_gradient and another "
                         f"pixel-gradient method; have {', '.join(present) or 'none'}).")
            continue
        ranked = sorted(means, key=lambda k: -means[k] if math.isfinite(means[k]) else math.inf)
        best = ranked[0]
        verdict = "holds" if best == "vanilla_gradient" else f"does not hold (best: {best})"
        listing = ", ".join(f"{k} {_fmt(means[k])}" for k in ranked)
        lines.append(f"- {metric}: **{verdict}** — {listing}.")
    return lines


def write_report(state: Run) -> Path:
    """``summary.md`` and the figures, from the rows of this run in ``results.csv``."""
    options = state.options
    current = {v.label: effective_params(state, v) for v in state.variants}
    latest: dict[tuple[str, str], dict[str, str]] = {}
    for r in read_rows(options.out / "results.csv"):
        if r["run"] == state.key and current.get(r["method"]) == r["params"]:
            latest[(r["method"], r["index"])] = r  # the last row written wins
    rows = list(latest.values())
    summaries = summarize(rows, state.variants, state.engines)
    points = [(s.p50_ms, s.means["rcap"]) for s in summaries]
    front = pareto_front(points)
    config = state.config
    shown = [(name, heading) for name, heading, _ in SUMMARY_METRICS
             if any(math.isfinite(s.means[name]) for s in summaries)]
    ground_truth = options.dataset == "cells"
    if ground_truth:
        images_text = (f"Up to {options.images} synthetic cell images (n per method below; "
                       f"`{options.config}` configuration: {config.size}×{config.size} px, "
                       f"backgrounds {', '.join(config.backgrounds)}, seed {config.seed})")
    else:
        images_text = (f"The first {options.images} Fashion-MNIST test photographs (n per "
                       "method below; real images with no ground truth, so faithfulness only)")
    lines = [
        f"# Saliency methods on {options.model} v{state.version}: quality and cost",
        "",
        f"{images_text}; maps scored at {state.map_size[0]}×{state.map_size[1]}; explained "
        f"class: {'the true label' if options.target == 'label' else 'the prediction'}. "
        f"ROAD on the first {options.road_images} images. "
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Cost is per image as the server reports it (forward passes include the prediction; "
        "p50 ms is request wall time over its batch of "
        f"{options.batch}). Means over images; ground-truth metrics skip blank images.",
        "",
        "| method | engine | n | fwd/img | bwd/img | p50 ms | "
        + " | ".join(h for _, h in shown) + " |",
        "|" + "---|" * (6 + len(shown)),
    ]
    for s in summaries:
        cells_text = [f"{s.label}{' ★' if summaries.index(s) in front else ''}", s.engine,
                      str(s.images), _fmt(s.forward, 1), _fmt(s.backward, 1), _fmt(s.p50_ms, 1)]
        cells_text += [_fmt(s.means[name]) for name, _ in shown]
        lines.append("| " + " | ".join(cells_text) + " |")
    lines += ["", "★ = on the cost (p50 ms) vs RCAP Pareto front: "
              + ", ".join(summaries[i].label for i in front) + ".", ""]
    for label, error in state.errors.items():
        lines.append(f"- {label}: {error}" if label == "(run)" else f"- {label} failed: {error}")
    if state.errors:
        lines.append("")
    sanity_rows = [r for r in sanity.read_rows(options.out / "sanity.csv")
                   if r["run"] == state.sanity_key]
    lines += sanity.section(sanity_rows)
    lines += ["## The papers' claims, checked here", ""]
    lines += claims(rows, {s.label for s in summaries}, ground_truth)
    lines += ["", "## Definitions", "",
              "- RCAP (Huang & Liu): mean over the top 30 %, 25 %, …, 5 % of pixels of "
              "hit rate × softmax probability of the explained class on the image keeping only "
              "those pixels (the rest black). Strict `>` at each quantile, so a flat map scores 0.",
              "- Deletion / insertion: area under the class probability while 10 %, 20 %, … of "
              "the pixels, most salient first, turn black / replace a Gaussian-blurred "
              f"(σ = {metrics.INSERTION_BLUR_SIGMA:g} px) copy.",
              "- ROAD (Rong et al., arXiv 2202.00449): mean class probability after removing "
              f"{', '.join(f'{f:.0%}' for f in road.ROAD_FRACTIONS)} of the pixels, most "
              "relevant first (MoRF) or least relevant first (LeRF), each removed pixel filled "
              "by noisy linear imputation from its neighbours (no black holes that show the "
              "removed shape).",
              "- Five-band (Tjoa & Guan): map / max|map| and ground truth banded at "
              "±0.3, ±0.7; precision and recall with the authors' TP/FP/FN. Soft: thresholds "
              "move 0.02 toward 0 for 11 steps; μ = mean over steps, u = the step with the best "
              "pixel accuracy.",
              "- Pointing game: the maximum lies on the object; mass: share of the map on the "
              "object; rank: share of the top-|object| pixels on the object.",
              "", "Figures: `examples.png`, `cost_quality.png`"
              + (", `sanity_checks.png`." if sanity_rows else "."), ""]
    summary_path = options.out / "summary.md"
    summary_path.write_text("\n".join(lines))
    _figures(state, summaries)
    sanity.figure(sanity_rows, options.out / "sanity_checks.png")
    return summary_path


def _figures(state: Run, summaries: list[MethodSummary]) -> None:
    import matplotlib  # noqa: PLC0415 - plotting only when writing the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out = state.options.out
    cells = state.cells
    examples = [i for i in range(len(cells.labels))
                if cells.masks[i].any() or state.options.dataset != "cells"]
    examples = examples[:state.options.examples]
    height, width = state.map_size
    rows = 2 + len(summaries)
    figure, axes = plt.subplots(rows, max(len(examples), 1),
                                figsize=(1.4 * max(len(examples), 1) + 1.6, 1.4 * rows),
                                squeeze=False)
    for column, index in enumerate(examples):
        image = cells.images[index]
        axes[0, column].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        axes[0, column].set_title(state.class_names[int(cells.labels[index])], fontsize=7)
        axes[1, column].imshow(cells.heatmaps[index], cmap="magma", vmin=0, vmax=1)
    for row, summary in enumerate(summaries, start=2):
        cache = MapCache(out / "maps" / state.key / f"{slug(summary.label)}.npz")
        for column, index in enumerate(examples):
            item = cache.maps.get(index)
            if item is not None:
                axes[row, column].imshow(item.astype(np.float32), cmap="magma", vmin=0, vmax=1)
    names = ["image", "ground truth", *[s.label for s in summaries]]
    for row, name in enumerate(names):
        axes[row, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"maps at {height}×{width} beside the ground truth", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "examples.png", dpi=110)
    plt.close(figure)

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5))
    panel_metrics = (("rcap", "RCAP (faithfulness) ↑"),
                     ("relevance_rank", "relevance rank (ground truth) ↑"))
    for panel, (metric, title) in zip(panels, panel_metrics, strict=True):
        points = [(s.p50_ms, s.means[metric]) for s in summaries]
        on_front = pareto_front(points)
        xs = [max(p[0], 1e-3) for p in points]
        ys = [p[1] for p in points]
        panel.scatter(xs, ys, c=["tab:red" if i in on_front else "tab:blue"
                                 for i in range(len(points))])
        for x, y, s in zip(xs, ys, summaries, strict=True):
            panel.annotate(s.label, (x, y), fontsize=6, xytext=(3, 3),
                           textcoords="offset points")
        if on_front:
            panel.plot([xs[i] for i in on_front], [ys[i] for i in on_front], "r--", lw=1,
                       label="Pareto front")
            panel.legend(fontsize=7)
        panel.set_xscale("log")
        panel.set_xlabel("p50 ms per image (log)")
        panel.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "cost_quality.png", dpi=110)
    plt.close(figure)
