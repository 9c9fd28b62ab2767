"""DE-CAM quality against the forward passes it spends, on the demo model's test cells.

For each map (``decam.aggregate``: the covariance of mask and fitness over every evaluated
mask, or the best mask), population and pass budget (``decam.max_forward_passes``, per
image, the prediction included), the maps of the same cell images are scored with
``evaluation.metrics``: RCAP, relevance mass, pointing game and relevance rank (target: the
true label). The search runs without early stop, so every budget is spent; the defaults are
measured too. The curve shows where quality stops growing, which is what the defaults
should spend.

    python -m benchmarks.decam_budget [--images 40] [--quick]
"""

from __future__ import annotations

from typing import Any

from benchmarks import _cells
from benchmarks.common import base_parser, demo_repository, fmt, in_process_core, table, write_json
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.inputs import preprocess_pixels

# (aggregate, population, budgets)
CURVES = (("covariance", 16, (100, 200, 330, 600, 1000)), ("covariance", 32, (330, 1000)),
          ("best", 16, (330, 1000)), ("best", 32, (330, 1000, 1500)))
QUICK_CURVES = (("covariance", 16, (100, 330)), ("best", 16, (330,)))
# With a budget, generations only bound the search from above.
UNBOUNDED_GENERATIONS = 500


def curve(core: Any, package: Any, count: int,
          curves: tuple[tuple[str, int, tuple[int, ...]], ...]) -> list[dict[str, Any]]:
    handle = core.repository.find("demo", 0)
    spec = handle.spec().input
    batch = _cells.cells(count, spec.height)
    inputs = preprocess_pixels(batch.images, spec)
    targets = batch.labels
    scorer = _cells.classifier(package)
    settings: list[tuple[str, pb.DecamParams]] = [
        ("defaults", pb.DecamParams()),
        ("defaults, aggregate best", pb.DecamParams(aggregate="best"))]
    for aggregate, population, budgets in curves:
        for budget in budgets:
            settings.append((f"{aggregate}, population {population}", pb.DecamParams(
                population=population, generations=UNBOUNDED_GENERATIONS, patience=0,
                max_forward_passes=budget, aggregate=aggregate)))
    rows = []
    for label, params in settings:
        run = _cells.explain(core, "demo", pb.METHOD_DECAM, inputs, targets, ("decam", params))
        scores = _cells.means(_cells.quality(run["maps"], batch, targets, scorer))
        rows.append({"setting": label, "budget": int(params.max_forward_passes),
                     "forward_passes_per_image": run["forward_passes_per_image"],
                     "seconds_per_image": run["seconds_per_image"], **scores})
        print(table([{k: fmt(v) for k, v in rows[-1].items()}]), flush=True)
    return rows


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    count = 8 if args.quick else args.images
    root = demo_repository()
    core = in_process_core(root, intra_op_threads=1)
    rows = curve(core, root / "demo" / "1", count, QUICK_CURVES if args.quick else CURVES)
    text = (f"DE-CAM quality against forward passes per image, demo model, {count} test cells "
            "(target: the true label; ground-truth metrics skip blanks), 1 intra-op thread:\n"
            + table([{k: fmt(v) for k, v in row.items()} for row in rows]))
    print(text)
    path = write_json("decam_budget", {"images": count, "rows": rows, "report": text}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
