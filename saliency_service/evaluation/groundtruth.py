"""A ground-truth benchmark over many models: every method, scored where the answer is known.

Each task of ``evaluation.tasks`` (one object decides the class) is trained briefly on each
architecture of ``zoo.tiny`` (plain, residual, depthwise-separable, a ViT) and seed; trained
models are exported as packages and cached by (task, architecture, seed), with their test
accuracy. A model below ``min_accuracy`` is reported and left out of the method ranking.
The shipped demo model (on the synthetic cells, ``evaluation.cells``) and, when its data is
installed, a Fashion-MNIST model (deletion/insertion only: no ground truth) join them.

Per model and method (every method the package offers, at its defaults, plus the variants
``Plan.variants`` names, e.g. DE-CAM and RISE at about OpenVINO XAI AISE's 330 passes), on the
model's images, through the methods' real handlers in this process:

- relevance mass on the object and the pointing game (``evaluation.metrics``), beside the
  uniform map's scores (mass = pointing = the object's area fraction);
- deletion and insertion AUC (Petsiuk et al., RISE);
- forward and backward passes per image;
- on a subset of models, the sanity checks (Adebayo et al.): Spearman ρ of |map| against the
  maps of copies whose top blocks, top half and all blocks are randomized (a cascade of three
  steps, averaged), and against the map of a random other class; a method passes a test
  when ρ < ``sanity.PASS_BELOW``.

Summaries take one value per model (its images' mean) and give the mean across models with a
95 % percentile bootstrap interval over models, so a method that is good on one architecture
only shows a wide interval rather than a narrow one built from many images of one model.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from saliency_service.evaluation import metrics, sanity, tasks

DEFAULT_CACHE = Path.home() / ".cache" / "saliency-service" / "groundtruth"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
MIN_ACCURACY = 0.9
BOOTSTRAP_SAMPLES = 2000
AISE_PASSES = 330  # OpenVINO XAI's AISE budget per image, for the budget-matched variants
DEMO_TASK = "cells (demo)"
FASHION_TASK = "fashion-mnist"


@dataclass(frozen=True)
class Plan:
    """What one run trains and measures."""

    tasks: tuple[str, ...] = ("colour", "shape")
    architectures: tuple[str, ...] = ("plain", "residual")
    seeds: tuple[int, ...] = (0,)
    images: int = 4  # evaluated per model
    size: int = 48
    train_images: int = 2000
    epochs: int = 3
    min_accuracy: float = MIN_ACCURACY
    methods: tuple[str, ...] = ()  # () = every method a package offers
    # Extra (label, method, parameters) runs beside the defaults.
    variants: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()
    sanity_models: int = 0  # models given the sanity checks (each of a new task and family)
    sanity_images: int = 4
    demo: bool = False
    demo_images: int = 8
    fashion: bool = False
    fashion_images: int = 8
    cache: Path = DEFAULT_CACHE
    threads: int = 1
    batch: int = 8
    progress: bool = True


SMALL = Plan()
FULL = Plan(tasks=tuple(tasks.TASKS), architectures=("plain", "residual", "depthwise", "vit"),
            images=8, train_images=2000, epochs=3, sanity_models=4, sanity_images=3,
            demo=True, demo_images=6, fashion=True, variants=(
                ("decam @330", "decam", (("max_forward_passes", AISE_PASSES),)),
                ("rise @330", "rise", (("masks", AISE_PASSES - 1),)),
                ("smoothgrad noise 0.05", "smoothgrad", (("noise_level", 0.05),)),
                ("smoothgrad noise 0.3", "smoothgrad", (("noise_level", 0.3),)),
                ("vargrad noise 0.05", "vargrad", (("noise_level", 0.05),)),
                ("vargrad noise 0.3", "vargrad", (("noise_level", 0.3),)),
            ))


# ---- models ----------------------------------------------------------------------------------


@dataclass
class Model:
    """One trained (or shipped) model and the images it is scored on."""

    key: str
    task: str
    architecture: str
    seed: int
    package: Path  # the package folder (…/<name>/1)
    accuracy: float
    images: np.ndarray  # uint8 N×H×W×C
    labels: np.ndarray
    masks: np.ndarray | None  # bool N×H×W, None without ground truth
    rebuild: Callable[[], Any] | None = None  # the torch module, for the sanity checks


def _log(plan: Plan, text: str) -> None:
    if plan.progress:
        print(text, file=sys.stderr, flush=True)


def task_model(plan: Plan, task: str, architecture: str, seed: int) -> Model:
    """The (task, architecture, seed) model from the cache, trained and exported first when
    it is not there."""
    import torch  # noqa: PLC0415 - training and export only

    from saliency_service.zoo.tiny import ARCHITECTURES  # noqa: PLC0415

    key = f"{task}-{architecture}-s{seed}-{plan.size}px"
    folder = Path(plan.cache) / key
    package = folder / key / "1"
    classes = len(tasks.TASKS[task])
    build = ARCHITECTURES[architecture]

    def make() -> torch.nn.Module:
        if architecture == "vit":
            return build(classes, size=plan.size)
        return build(classes)

    def rebuild() -> torch.nn.Module:
        module = make()
        module.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
        return module.eval()

    info_path = folder / "info.json"
    test = tasks.generate(task, plan.images, tasks.TaskConfig(size=plan.size, seed=1000 + seed))
    training = {"train_images": plan.train_images, "epochs": plan.epochs}
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("training") == training and (package / "manifest.json").is_file():
        accuracy = float(info["test_accuracy"])
        _log(plan, f"model {key}: cached, test accuracy {accuracy:.3f}")
    else:
        started = time.perf_counter()
        train = tasks.generate(task, plan.train_images, tasks.TaskConfig(size=plan.size,
                                                                         seed=seed))
        module = train_module(make, train.images, train.labels, seed, plan.epochs,
                              plan.threads)
        held = tasks.generate(task, 500, tasks.TaskConfig(size=plan.size, seed=2000 + seed))
        accuracy = module_accuracy(module, held.images, held.labels)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), folder / "weights.pt")
        export(module, key, plan.size, tasks.TASKS[task], folder, accuracy)
        info_path.write_text(json.dumps({"test_accuracy": accuracy, "task": task,
                                         "architecture": architecture, "seed": seed,
                                         "training": training}) + "\n")
        _log(plan, f"model {key}: trained in {time.perf_counter() - started:.0f} s, "
             f"test accuracy {accuracy:.3f}")
    return Model(key, task, architecture, seed, package, accuracy, test.images, test.labels,
                 test.masks, rebuild)


def preprocess(images: np.ndarray) -> Any:
    """uint8 N×H×W×3 → the normalized float tensor the task models take."""
    import torch  # noqa: PLC0415

    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def train_module(make: Callable[[], Any], images: np.ndarray, labels: np.ndarray, seed: int,
                 epochs: int, threads: int, batch_size: int = 64) -> Any:
    """AdamW with a one-cycle schedule, no augmentation (flips would turn a 45° stripe into
    a 135° one); deterministic from ``seed`` for a given thread count."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812

    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = make()
            inputs, targets = preprocess(images), torch.from_numpy(labels)
            steps = epochs * (len(images) // batch_size)
            optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=5e-4)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                           total_steps=steps, pct_start=0.25)
            order = torch.Generator().manual_seed(seed)
            module.train()
            for _ in range(epochs):
                permutation = torch.randperm(len(images), generator=order)
                for step in range(len(images) // batch_size):
                    index = permutation[step * batch_size:(step + 1) * batch_size]
                    loss = F.cross_entropy(module(inputs[index]), targets[index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
    finally:
        torch.set_num_threads(caller_threads)
    return module.eval()


def module_accuracy(module: Any, images: np.ndarray, labels: np.ndarray) -> float:
    import torch  # noqa: PLC0415

    with torch.no_grad():
        predicted = module(preprocess(images)).argmax(1).numpy()
    return float((predicted == labels).mean())


def export(module: Any, name: str, size: int, labels: Sequence[str], repository: Path,
           accuracy: float | None = None) -> Path:
    """Exports a task model as ``repository/name/1`` (model.onnx + manifest)."""
    from saliency_service.packaging.export import export_package  # noqa: PLC0415

    for parameter in module.parameters():
        parameter.requires_grad_(False)
    export_package(module, name=name, version=1, input_shape=(3, size, size), mean=MEAN,
                   std=STD, class_labels=list(labels), repository=repository,
                   scale_modules=module.scale_modules(), cam_layer=module.cam_layer,
                   head=module.head, verify_inputs=2, overwrite=True,
                   metadata={} if accuracy is None else {"test_accuracy": accuracy})
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    return repository / name / "1"


def demo_model(plan: Plan, models: Path) -> Model | None:
    """The shipped demo package on the synthetic cells (objects only: blank has none)."""
    from saliency_service.evaluation.cells import CLASS_NAMES, TEST_CONFIG, CellConfig, generate  # noqa: PLC0415

    package = models / "demo" / "1"
    if not (package / "manifest.json").is_file():
        _log(plan, f"demo model: not found at {package}, skipped")
        return None
    manifest = json.loads((package / "manifest.json").read_text())
    size = int(manifest["input"]["shape"][2])
    data = generate(plan.demo_images * 3, CellConfig(size=size, backgrounds=TEST_CONFIG.backgrounds,
                                                      seed=TEST_CONFIG.seed))
    keep = np.flatnonzero(data.labels != CLASS_NAMES.index("blank"))[:plan.demo_images]
    accuracy = float(manifest.get("metadata", {}).get("test_accuracy", 1.0))
    return Model("demo", DEMO_TASK, "demo resnet", 0, package, accuracy, data.images[keep],
                 data.labels[keep], data.masks[keep])


def fashion_model(plan: Plan) -> Model | None:
    """A Fashion-MNIST model (cached; trained briefly) on the installed test set, without
    ground truth; None when the data is not installed."""
    from saliency_service.evaluation import fashion_mnist  # noqa: PLC0415

    try:
        test = fashion_mnist.load("test", count=plan.fashion_images)
    except fashion_mnist.DatasetMissing:
        _log(plan, "fashion-mnist: data not installed, skipped")
        return None
    import torch  # noqa: PLC0415

    from saliency_service.zoo.architectures import FashionResNet  # noqa: PLC0415
    from saliency_service.zoo.fashion import preprocess as fashion_preprocess  # noqa: PLC0415

    key = "fashion-mnist-residual-s0"
    folder = Path(plan.cache) / key
    package = folder / key / "1"
    info_path = folder / "info.json"
    if info_path.is_file() and (package / "manifest.json").is_file():
        accuracy = float(json.loads(info_path.read_text())["test_accuracy"])
        _log(plan, f"model {key}: cached, test accuracy {accuracy:.3f}")
    else:
        from saliency_service.packaging.export import export_package  # noqa: PLC0415
        from saliency_service.zoo.training import accuracy as batch_accuracy  # noqa: PLC0415
        from saliency_service.zoo.training import train_classifier  # noqa: PLC0415

        train = fashion_mnist.load("train", count=12000)
        module = train_classifier(lambda: FashionResNet(width=8), train.images, train.labels,
                                  fashion_preprocess, seed=0, epochs=2, progress=False,
                                  vertical_flips=False, threads=plan.threads)
        held = fashion_mnist.load("test", count=2000, start=5000)
        accuracy = batch_accuracy(module, lambda s, n: (held.images[s:s + n],
                                                        held.labels[s:s + n]),
                                  len(held.labels), fashion_preprocess)
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        export_package(module, name=key, version=1, input_shape=(1, 28, 28),
                       mean=[0.286], std=[0.353], class_labels=fashion_mnist.CLASS_NAMES,
                       repository=folder,
                       scale_modules=module.scale_modules(), cam_layer=module.cam_layer,
                       head="fc", verify_inputs=2, overwrite=True,
                       metadata={"test_accuracy": accuracy})
        info_path.write_text(json.dumps({"test_accuracy": accuracy}) + "\n")
        _log(plan, f"model {key}: trained, test accuracy {accuracy:.3f}")
    del torch
    return Model(key, FASHION_TASK, "fashion resnet", 0, package, accuracy, test.images,
                 test.labels, None)


# ---- running methods -------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodRun:
    """One row of the method list: a label, the registered method and parameter overrides."""

    label: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()


def method_runs(plan: Plan, handle: Any) -> list[MethodRun]:
    """The methods this package offers (at their defaults) and the plan's variants."""
    from saliency_service.methods import registry  # noqa: PLC0415

    offered = [h.name for h in registry.handlers() if h.available_for(handle)]
    chosen = [m for m in offered if not plan.methods or m in plan.methods]
    runs = [MethodRun(name, name) for name in chosen]
    runs += [MethodRun(label, method, params) for label, method, params in plan.variants
             if method in offered]
    return runs


@dataclass
class Maps:
    maps: np.ndarray
    forward_passes: float  # per image
    backward_passes: float
    seconds: float  # per image


def explain(handle: Any, run: MethodRun, inputs: np.ndarray, targets: np.ndarray,
            batch: int, seed: int = 0) -> Maps:
    """Maps of ``inputs`` (normalized N×C×H×W) for ``targets`` through the method's handler."""
    from saliency_service.core.request import Job  # noqa: PLC0415
    from saliency_service.methods import registry  # noqa: PLC0415

    handler = next(h for h in registry.handlers() if h.name == run.method)
    params = handler.params(None, {}, **dict(run.params))
    (logits,) = handle.run(inputs)
    out, forward, backward = [], 0, 0
    started = time.perf_counter()
    for begin in range(0, len(inputs), batch):
        part = slice(begin, begin + batch)
        job = Job(model=handle, inputs=inputs[part], targets=np.asarray(targets[part], np.int64),
                  params=params, base_logits=logits[part], seed=seed)
        out.append(handler.explain(job).maps)
        forward += job.cost.forward_passes
        backward += job.cost.backward_passes
    count = max(len(inputs), 1)
    return Maps(np.concatenate(out), forward / count, backward / count,
                (time.perf_counter() - started) / count)


def load_handle(package: Path) -> Any:
    from saliency_service.core.repository import ModelHandle  # noqa: PLC0415

    handle = ModelHandle(package.parent.name, int(package.name), package)
    handle.load()
    if not handle.ready:
        raise RuntimeError(f"model at {package} failed to load: {handle.error}")
    return handle


def score(maps: np.ndarray, model: Model, classifier: metrics.OnnxClassifier,
          ) -> dict[str, float]:
    """Image means of the ground-truth and faithfulness metrics of ``maps``."""
    pictures = model.images.astype(np.float32) / 255.0
    if pictures.shape[-1] != classifier.session.get_inputs()[0].shape[1]:
        pictures = pictures.mean(axis=-1, keepdims=True)
    values: dict[str, float] = {
        "deletion": _mean(metrics.deletion_auc(pictures, maps, model.labels, classifier)),
        "insertion": _mean(metrics.insertion_auc(pictures, maps, model.labels, classifier)),
    }
    if model.masks is not None:
        values["mass"] = _mean(metrics.relevance_mass(maps, model.masks))
        values["pointing"] = _mean(metrics.pointing_game(maps, model.masks))
        values["uniform"] = float(model.masks.mean())
        values["zero_maps"] = float((maps.reshape(len(maps), -1).max(axis=1) <= 0).mean())
    return values


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


# ---- sanity checks ---------------------------------------------------------------------------


def randomized_packages(model: Model, root: Path) -> list[Path]:
    """Copies of ``model`` with its top block, top half of blocks and all blocks randomized
    (each parameter tensor redrawn from N(its mean, its std), as
    ``packaging.randomized`` does), exported as packages under ``root``."""
    import torch  # noqa: PLC0415

    assert model.rebuild is not None
    blocks = [name for name, child in model.rebuild().named_children()
              if any(True for _ in child.parameters())]
    top_down = list(reversed(blocks))
    steps = sorted({1, max(1, len(top_down) // 2), len(top_down)})
    packages = []
    for step in steps:
        module = model.rebuild()
        chosen = set(top_down[:step])
        with torch.no_grad():
            for index, (name, parameter) in enumerate(module.named_parameters()):
                if name.split(".")[0] not in chosen:
                    continue
                generator = torch.Generator().manual_seed(step * 7919 + index)
                std = float(parameter.std()) if parameter.numel() > 1 else 0.0
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std
                                + float(parameter.mean()))
        manifest = json.loads((model.package / "manifest.json").read_text())
        packages.append(export(module, f"{model.key}-random{step}", model.images.shape[1],
                               manifest.get("class_labels", []), root))
    return packages


def sanity_rows(plan: Plan, model: Model, handle: Any, runs: list[MethodRun],
                ) -> list[dict[str, Any]]:
    """ρ against randomized models (cascade mean) and against a random other class."""
    from saliency_service.protocol.inputs import preprocess_pixels  # noqa: PLC0415

    count = min(plan.sanity_images, len(model.images))
    spec = handle.spec().input
    inputs = preprocess_pixels(model.images[:count], spec)
    targets = model.labels[:count]
    classes = handle.run(inputs[:1])[0].shape[1]
    others = sanity.random_targets(targets, classes)
    root = Path(plan.cache) / model.key / "randomized"
    if root.exists():
        shutil.rmtree(root)
    handles = [load_handle(p) for p in randomized_packages(model, root)]
    rows = []
    for run in runs:
        if run.label != run.method:  # the variants differ in cost, not in what they read
            continue
        original = explain(handle, run, inputs, targets, plan.batch).maps
        cascade = [float(np.nanmean(sanity.spearman_abs(
            original, explain(h, run, inputs, targets, plan.batch).maps))) for h in handles]
        logit = float(np.nanmean(sanity.spearman_abs(
            original, explain(handle, run, inputs, others, plan.batch).maps)))
        rho = float(np.nanmean(cascade))
        rows.append({"model": model.key, "method": run.label, "randomization_rho": rho,
                     "random_logit_rho": logit,
                     "passes": bool(rho < sanity.PASS_BELOW and logit < sanity.PASS_BELOW)})
        _log(plan, f"  sanity {model.key} {run.label}: cascade ρ̄ {rho:.2f}, "
             f"random-logit ρ {logit:.2f}")
    return rows


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    plan: dict[str, Any]
    models: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    sanity: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan, "models": self.models, "rows": self.rows,
                "sanity": self.sanity, "summary": summarize(self)}


def run(plan: Plan, models_dir: Path = Path("models"),
        checkpoint: Callable[[Results], None] | None = None) -> Results:
    """Trains (or loads) every model of ``plan`` and scores every method on it.

    ``checkpoint`` gets the results so far after each model, so a run that fails late
    still leaves every finished model's rows on disk.
    """
    from saliency_service.protocol.inputs import preprocess_pixels  # noqa: PLC0415

    results = Results(plan={k: (str(v) if isinstance(v, Path) else v)
                            for k, v in asdict(plan).items()})
    def models() -> Iterator[Model]:
        """One at a time, each trained (when not cached) just before it is scored."""
        for task in plan.tasks:
            for architecture in plan.architectures:
                for seed in plan.seeds:
                    yield task_model(plan, task, architecture, seed)
        if plan.demo and (demo := demo_model(plan, models_dir)) is not None:
            yield demo
        if plan.fashion and (fashion := fashion_model(plan)) is not None:
            yield fashion

    sanity_left = plan.sanity_models
    checked: set[str] = set()  # tasks and architectures already given the sanity checks
    for model in models():
        included = model.accuracy >= plan.min_accuracy
        results.models.append({"model": model.key, "task": model.task,
                               "architecture": model.architecture, "seed": model.seed,
                               "test_accuracy": model.accuracy, "included": included})
        if not included:
            _log(plan, f"model {model.key}: test accuracy {model.accuracy:.3f} is below "
                 f"{plan.min_accuracy}: scored but left out of the ranking")
        handle = load_handle(model.package)
        classifier = metrics.OnnxClassifier.from_package(model.package, intra_op_threads=1)
        inputs = preprocess_pixels(model.images, handle.spec().input)
        runs = method_runs(plan, handle)
        for method_run in runs:
            maps = explain(handle, method_run, inputs, model.labels, plan.batch)
            values = score(maps.maps, model, classifier)
            row = {"model": model.key, "task": model.task, "architecture": model.architecture,
                   "included": included, "method": method_run.label,
                   "images": len(model.images), "forward_passes": maps.forward_passes,
                   "backward_passes": maps.backward_passes,
                   "seconds_per_image": maps.seconds, **values}
            results.rows.append(row)
            _log(plan, f"  {model.key} {method_run.label}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in values.items())
                + f", {maps.forward_passes:.0f} fwd + {maps.backward_passes:.0f} bwd /image")
        # One model per task and architecture, so the checks span tasks and families.
        if (sanity_left > 0 and model.rebuild is not None and included
                and not {model.task, model.architecture} & checked):
            sanity_left -= 1
            checked |= {model.task, model.architecture}
            results.sanity += sanity_rows(plan, model, handle, runs)
        if checkpoint is not None:
            checkpoint(results)
    return results


# ---- summaries -------------------------------------------------------------------------------


def bootstrap_interval(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``values`` (one per model)."""
    array = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    if array.size == 0:
        return math.nan, math.nan
    if array.size == 1:
        return float(array[0]), float(array[0])
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, (samples, array.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


METRICS = ("mass", "uniform", "pointing", "deletion", "insertion", "forward_passes",
           "backward_passes", "zero_maps")


def summarize(results: Results) -> dict[str, Any]:
    """Per method across included models (mean and bootstrap interval), per task whether
    each method beats the uniform map, and the sanity pass rate."""
    rows = [r for r in results.rows if r["included"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    per_method: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"models": len(mine)}
        for name in (*METRICS, "beats_uniform"):
            if name == "beats_uniform":
                values = [r["mass"] - r["uniform"] for r in mine if "mass" in r]
            else:
                values = [r[name] for r in mine if name in r]
            finite = [v for v in values if math.isfinite(v)]
            if not finite:
                continue
            low, high = bootstrap_interval(finite)
            entry[name] = {"mean": float(np.mean(finite)), "low": low, "high": high,
                           "models": len(finite)}
        checks = [s for s in results.sanity if s["method"] == method]
        if checks:
            entry["sanity_pass_rate"] = float(np.mean([s["passes"] for s in checks]))
            entry["sanity_models"] = len(checks)
        per_method[method] = entry
    per_task: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        per_task[task] = {}
        for method in methods:
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            entry = {"models": len(mine),
                     **{name: float(np.nanmean([r[name] for r in mine]))
                        for name in ("mass", "uniform", "pointing", "deletion", "insertion",
                                     "forward_passes")
                        if name in mine[0]}}
            if "mass" in entry:
                difference = [r["mass"] - r["uniform"] for r in mine]
                low, high = bootstrap_interval(difference)
                entry["beats_uniform"] = ("yes" if low > 0 else "no" if high < 0
                                          else "unclear") if len(mine) > 1 else (
                    "yes" if difference[0] > 0 else "no")
            per_task[task][method] = entry
    excluded = [m for m in results.models if not m["included"]]
    return {"per_method": per_method, "per_task": per_task, "excluded_models": excluded}


def _cell(entry: dict[str, Any] | None, digits: int = 2) -> str:
    if not entry:
        return "–"
    return (f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, "
            f"{entry['high']:.{digits}f}]")


def _number(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """The mean of a summary entry, or – when no model has the metric."""
    return f"{entry['mean']:.{digits}f}" if entry else "–"


def markdown(document: dict[str, Any], command: str) -> str:
    """The results as Markdown: the per-method table, then per task, then the models."""
    summary = document["summary"]
    lines = [f"# Ground-truth benchmark (`{command}`)", "",
             "Per method: the mean across models (one value per model: its images' mean) and "
             "a 95 % bootstrap interval over models. Mass = share of the map on the deciding "
             "object; pointing = the map's maximum on it; uniform = both for a flat map (the "
             "object's area fraction); deletion (lower is better) and insertion (higher) AUC; "
             "passes per image; sanity = share of the checked models on which the method "
             "passes both the randomization cascade and the random-logit test.", "",
             "| method | models | mass | pointing | uniform | mass − uniform | deletion | "
             "insertion | forward | backward | all-zero maps | sanity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, entry in summary["per_method"].items():
        sane = (f"{entry['sanity_pass_rate']:.2f} ({entry['sanity_models']})"
                if "sanity_pass_rate" in entry else "–")
        lines.append(
            f"| {method} | {entry['models']} | {_cell(entry.get('mass'))} | "
            f"{_cell(entry.get('pointing'))} | {_cell(entry.get('uniform'), 3)} | "
            f"{_cell(entry.get('beats_uniform'))} | {_cell(entry.get('deletion'))} | "
            f"{_cell(entry.get('insertion'))} | "
            f"{entry.get('forward_passes', {}).get('mean', math.nan):.0f} | "
            f"{entry.get('backward_passes', {}).get('mean', math.nan):.0f} | "
            f"{_number(entry.get('zero_maps'))} | {sane} |")
    lines += ["", "## Per task: mass (pointing), and whether the mass beats the uniform map",
              "", "yes / no: the bootstrap interval over the task's models of mass − uniform "
              "lies above / below 0; unclear: it contains 0. Tasks without ground truth show "
              "deletion / insertion.", ""]
    task_names = list(summary["per_task"])
    lines += ["| method | " + " | ".join(task_names) + " |",
              "|---|" + "---|" * len(task_names)]
    methods = list(summary["per_method"])
    for method in methods:
        cells = []
        for task in task_names:
            entry = summary["per_task"][task].get(method)
            if entry is None:
                cells.append("–")
            elif "mass" in entry:
                cells.append(f"{entry['mass']:.2f} ({entry['pointing']:.2f}) "
                             f"{entry['beats_uniform']}")
            else:
                cells.append(f"del {entry['deletion']:.2f} / ins {entry['insertion']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    uniform = [f"{summary['per_task'][t][methods[0]]['uniform']:.3f}"
               if "uniform" in summary["per_task"][t].get(methods[0], {}) else "–"
               for t in task_names]
    lines.append("| *uniform map* | " + " | ".join(uniform) + " |")
    lines += decam_goal(summary)
    lines += ["", "## Models", "", "| model | task | architecture | test accuracy | ranked |",
              "|---|---|---|---|---|"]
    for model in document["models"]:
        lines.append(f"| {model['model']} | {model['task']} | {model['architecture']} | "
                     f"{model['test_accuracy']:.3f} | {'yes' if model['included'] else 'no'} |")
    return "\n".join(lines) + "\n"


def decam_goal(summary: dict[str, Any]) -> list[str]:
    """Per task: DE-CAM's pointing against Grad-CAM's, its mass against occlusion's, and the
    330-pass variants against RISE at the same budget, with each one's passes per image."""
    per_task = {task: entry for task, entry in summary["per_task"].items()
                if "decam" in entry and "mass" in entry["decam"]}
    if not per_task:
        return []
    lines = ["", "## DE-CAM against Grad-CAM, occlusion and RISE, per task", "",
             "Goal: DE-CAM's pointing ≥ Grad-CAM's and mass ≥ occlusion's; at about 330 "
             "passes (OpenVINO XAI AISE's budget) ahead of RISE at the same budget. Cells: "
             "mass / pointing (forward passes per image).", "",
             "| task | decam | gradcam | occlusion | decam @330 | rise @330 | pointing ≥ "
             "Grad-CAM | mass ≥ occlusion | @330 mass ≥ RISE @330 |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(entry: dict[str, Any] | None) -> str:
        if not entry or "mass" not in entry:
            return "–"
        return (f"{entry['mass']:.2f} / {entry['pointing']:.2f} "
                f"({entry['forward_passes']:.0f})")

    def at_least(first: dict[str, Any] | None, second: dict[str, Any] | None,
                 name: str) -> str:
        if not first or not second or name not in first or name not in second:
            return "–"
        return "yes" if first[name] >= second[name] else "**no**"

    for task, entry in per_task.items():
        decam, budget = entry.get("decam"), entry.get("decam @330")
        lines.append(
            f"| {task} | {cell(decam)} | {cell(entry.get('gradcam'))} | "
            f"{cell(entry.get('occlusion'))} | {cell(budget)} | {cell(entry.get('rise @330'))} "
            f"| {at_least(decam, entry.get('gradcam'), 'pointing')} | "
            f"{at_least(decam, entry.get('occlusion'), 'mass')} | "
            f"{at_least(budget, entry.get('rise @330'), 'mass')} |")
    return lines


def with_overrides(plan: Plan, **changes: Any) -> Plan:
    return replace(plan, **{k: v for k, v in changes.items() if v is not None})


def write_run(out: Path, full: bool = False, models: Path = Path("models"),
              cache: Path | None = None, images: int | None = None, progress: bool = True,
              ) -> Path:
    """Runs the small (or ``full``) plan and writes ``out/groundtruth.json`` and ``.md``;
    returns the Markdown file's path (``saliency evaluate --dataset groundtruth``)."""
    plan = with_overrides(FULL if full else SMALL, cache=cache, images=images,
                          progress=progress)
    document = run(plan, models).to_json()
    out.mkdir(parents=True, exist_ok=True)
    (out / "groundtruth.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    command = "saliency evaluate --dataset groundtruth" + (" --full" if full else "")
    path = out / "groundtruth.md"
    path.write_text(markdown(document, command))
    return path
