"""Defaults from the ground-truth benchmark's models: the noise level of SmoothGrad, VarGrad and
Guided AbsoluteGrad, and DE-CAM's grid × population at equal forward-pass budgets.

Each setting is scored on the same images of every ranked model of the benchmark (cached,
trained first when missing; ``saliency_service.evaluation.groundtruth``) and the demo model:
relevance mass and pointing per model, and the paired difference to today's default with a
95 % bootstrap interval over models. A setting is *supported* when one of the two differences
has its interval above 0 and the other's reaches above 0 (it is not worse on every resample).

    python -m benchmarks.groundtruth_defaults noise
    python -m benchmarks.groundtruth_defaults decam --budgets 330,2052
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import QUICK_RESULTS, RESULTS, base_parser, machine_info
from saliency_service.evaluation import groundtruth, metrics

NOISE_METHODS = ("smoothgrad", "vargrad", "guided_absolutegrad")
NOISE_LEVELS = (0.05, 0.1, 0.15, 0.2, 0.3)
DECAM_GRIDS = (4, 8, 16)
DECAM_POPULATIONS = (16, 32, 64)
# The default search's cost per image (prediction, baseline choice, 32 evaluations of 32 × 2)
# and OpenVINO XAI AISE's budget.
DECAM_BUDGETS = (groundtruth.AISE_PASSES, 2052)
SEARCH_GENERATIONS = 500  # enough that the pass budget, not the generation count, ends a search


@dataclass(frozen=True)
class Setting:
    """One configuration: its label, the group it is compared within, the method and its
    parameter overrides; ``reference`` marks the group's default."""

    label: str
    group: str
    method: str
    params: tuple[tuple[str, Any], ...]
    reference: bool = False


def handler_defaults(method: str) -> Any:
    from saliency_service.methods import registry  # noqa: PLC0415

    return next(h for h in registry.handlers() if h.name == method).Params()


def noise_settings(levels: Sequence[float] = NOISE_LEVELS) -> list[Setting]:
    """Each noise method at each level; its default level is the group's reference."""
    settings = []
    for method in NOISE_METHODS:
        default = handler_defaults(method).noise_level
        for level in sorted({*levels, default}):
            settings.append(Setting(f"{method} noise {level:g}", method, method,
                                    (("noise_level", level),), reference=level == default))
    return settings


def decam_settings(budgets: Sequence[int] = DECAM_BUDGETS, grids: Sequence[int] = DECAM_GRIDS,
                   populations: Sequence[int] = DECAM_POPULATIONS) -> list[Setting]:
    """DE-CAM's grid × population at each pass budget; the default grid and population is
    each budget's reference."""
    defaults = handler_defaults("decam")
    settings = []
    for budget in budgets:
        for grid in grids:
            for population in populations:
                settings.append(Setting(
                    f"decam grid {grid} population {population} @{budget}", f"@{budget}",
                    "decam", (("grid", grid), ("population", population),
                              ("generations", SEARCH_GENERATIONS),
                              ("max_forward_passes", budget)),
                    reference=(grid, population) == (defaults.grid, defaults.population)))
    return settings


def ranked_models(plan: groundtruth.Plan, models_dir: Path) -> list[groundtruth.Model]:
    """The plan's task models at or above its accuracy bar, and the demo when it is there."""
    chosen = []
    for task in plan.tasks:
        for architecture in plan.architectures:
            for seed in plan.seeds:
                model = groundtruth.task_model(plan, task, architecture, seed)
                if model.accuracy >= plan.min_accuracy:
                    chosen.append(model)
    if plan.demo and (demo := groundtruth.demo_model(plan, models_dir)) is not None:
        chosen.append(demo)
    return chosen


def score_model(model: groundtruth.Model, settings: list[Setting], batch: int,
                log: bool) -> list[dict[str, Any]]:
    """Mass, pointing and passes per image of every setting on one model's images."""
    from saliency_service.protocol.inputs import preprocess_pixels  # noqa: PLC0415

    assert model.masks is not None
    handle = groundtruth.load_handle(model.package)
    inputs = preprocess_pixels(model.images, handle.spec().input)
    rows = []
    for setting in settings:
        run = groundtruth.MethodRun(setting.label, setting.method, setting.params)
        maps = groundtruth.explain(handle, run, inputs, model.labels, batch)
        row = {"model": model.key, "task": model.task, "architecture": model.architecture,
               "setting": setting.label, "group": setting.group,
               "mass": float(metrics.relevance_mass(maps.maps, model.masks).mean()),
               "pointing": float(metrics.pointing_game(maps.maps, model.masks).mean()),
               "uniform": float(model.masks.mean()), "forward_passes": maps.forward_passes,
               "seconds_per_image": maps.seconds}
        rows.append(row)
        if log:
            print(f"  {model.key} {setting.label}: mass {row['mass']:.3f}, pointing "
                  f"{row['pointing']:.3f}, {maps.forward_passes:.0f} passes/image",
                  file=sys.stderr, flush=True)
    return rows


def _interval(values: Sequence[float]) -> dict[str, float]:
    low, high = groundtruth.bootstrap_interval(values)
    return {"mean": float(np.mean(values)), "low": low, "high": high}


def summarize(rows: list[dict[str, Any]], settings: list[Setting]) -> dict[str, Any]:
    """Per setting: mass and pointing across models, and the paired difference to its group's
    reference on the same models, each with a bootstrap interval over models."""
    references = {s.group: s.label for s in settings if s.reference}
    by_key = {(r["setting"], r["model"]): r for r in rows}
    summary: dict[str, Any] = {}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting.label]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "group": setting.group, "reference": setting.reference, "models": len(mine),
            "params": dict(setting.params),
            "forward_passes": float(np.mean([r["forward_passes"] for r in mine])),
            **{name: _interval([r[name] for r in mine]) for name in ("mass", "pointing")}}
        reference = references.get(setting.group)
        paired = [(r, by_key[(reference, r["model"])]) for r in mine
                  if (reference, r["model"]) in by_key]
        if reference and paired and not setting.reference:
            for name in ("mass", "pointing"):
                entry[f"{name}_difference"] = _interval([r[name] - ref[name]
                                                         for r, ref in paired])
            entry["supported"] = supported(entry)
        summary[setting.label] = entry
    return summary


def supported(entry: dict[str, Any]) -> bool:
    """One metric's difference interval above 0 and the other's upper end above 0."""
    mass, pointing = entry["mass_difference"], entry["pointing_difference"]
    return bool((mass["low"] > 0 and pointing["high"] > 0)
                or (pointing["low"] > 0 and mass["high"] > 0))


def _cell(entry: dict[str, float], digits: int = 2, sign: bool = False) -> str:
    form = f"+.{digits}f" if sign else f".{digits}f"
    return f"{entry['mean']:{form}} [{entry['low']:{form}}, {entry['high']:{form}}]"


def markdown(document: dict[str, Any], command: str, title: str) -> str:
    """The settings table, group by group, and the models it ran on."""
    summary = document["summary"]
    lines = [f"# {title} (`{command}`)", "",
             "Mean across models (one value per model: its images' mean) with a 95 % "
             "bootstrap interval over models; Δ = the paired difference to the group's default "
             "(marked *default*) on the same models and images. Supported: one Δ's interval "
             "above 0 and the other's upper end above 0.", "",
             "| setting | models | passes / image | mass | pointing | Δ mass | Δ pointing | "
             "supported |", "|---|---|---|---|---|---|---|---|"]
    for label, entry in summary.items():
        if entry["reference"]:
            delta = ("–", "–", "*default*")
        else:
            delta = (_cell(entry["mass_difference"], sign=True),
                     _cell(entry["pointing_difference"], sign=True),
                     "**yes**" if entry["supported"] else "no")
        lines.append(f"| {label} | {entry['models']} | {entry['forward_passes']:.0f} | "
                     f"{_cell(entry['mass'])} | {_cell(entry['pointing'])} | "
                     + " | ".join(delta) + " |")
    models = list(dict.fromkeys(r["model"] for r in document["rows"]))
    lines += ["", f"{len(models)} models ({', '.join(models)}), {document['images']} images "
              f"each; {document['minutes']:.0f} min on {document['machine']['cores']} cores"
              + ("." if document["finished"] else "; **stopped before the end**.")]
    return "\n".join(lines) + "\n"


SWEEPS = {
    "noise": ("Noise level of SmoothGrad, VarGrad and Guided AbsoluteGrad on the ground-truth "
              "models", "groundtruth_noise"),
    "decam": ("DE-CAM grid × population at equal forward-pass budgets on the ground-truth "
              "models", "groundtruth_decam"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("sweep", choices=sorted(SWEEPS))
    parser.add_argument("--cache", type=Path, default=groundtruth.DEFAULT_CACHE,
                        help="where trained models are kept (default %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="images per model")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default all)")
    parser.add_argument("--architectures", default="",
                        help="comma-separated architectures (default all four)")
    parser.add_argument("--no-demo", action="store_true", help="leave the demo model out")
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="repository holding the demo package")
    parser.add_argument("--levels", default="", help="comma-separated noise levels")
    parser.add_argument("--budgets", default="", help="comma-separated DE-CAM pass budgets")
    parser.add_argument("--grids", default="", help="comma-separated DE-CAM grids")
    parser.add_argument("--populations", default="",
                        help="comma-separated DE-CAM populations")
    args = parser.parse_args(argv)

    def numbers(text: str, kind: type) -> tuple[Any, ...] | None:
        return tuple(kind(n) for n in text.split(",") if n) or None

    def names(text: str) -> tuple[str, ...] | None:
        return tuple(n for n in text.split(",") if n) or None

    plan = groundtruth.with_overrides(
        groundtruth.FULL, cache=args.cache, images=args.images, demo_images=args.images,
        tasks=names(args.tasks), architectures=names(args.architectures))
    plan = groundtruth.with_overrides(plan, demo=False if args.no_demo else None)
    if args.sweep == "noise":
        settings = noise_settings(numbers(args.levels, float) or NOISE_LEVELS)
    else:
        settings = decam_settings(numbers(args.budgets, int) or DECAM_BUDGETS,
                                  numbers(args.grids, int) or DECAM_GRIDS,
                                  numbers(args.populations, int) or DECAM_POPULATIONS)
    title, stem = SWEEPS[args.sweep]
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    command = "python -m benchmarks.groundtruth_defaults " + " ".join(
        argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def write(finished: bool) -> None:
        document = {"benchmark": stem, "machine": machine_info(), "finished": finished,
                    "minutes": (time.perf_counter() - started) / 60, "images": plan.images,
                    "settings": [s.__dict__ for s in settings], "rows": rows,
                    "summary": summarize(rows, settings)}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
        (out / f"{stem}.md").write_text(markdown(document, command, title))

    for model in ranked_models(plan, args.models):
        rows += score_model(model, settings, plan.batch, plan.progress)
        write(finished=False)
    write(finished=True)
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
