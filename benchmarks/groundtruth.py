"""The ground-truth benchmark over many models (``saliency_service.evaluation.groundtruth``).

Trains (once; cached by task, architecture and seed) small models of four families on
generated tasks where one object decides the class, adds the demo model and Fashion-MNIST,
and scores every offered method: relevance mass and pointing game against the uniform map,
deletion/insertion, the sanity checks, with 95 % bootstrap intervals across models.

    python -m benchmarks.groundtruth            # 2 tasks × 2 architectures, a few images
    python -m benchmarks.groundtruth --full     # every task and architecture, demo, Fashion
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import QUICK_RESULTS, RESULTS, base_parser, machine_info
from saliency_service.evaluation import groundtruth, sanity


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every task and architecture, the demo and Fashion-MNIST, the "
                        "sanity checks and the 330-pass variants (results in "
                        "benchmarks/results unless --out)")
    parser.add_argument("--cache", type=Path, default=groundtruth.DEFAULT_CACHE,
                        help="where trained models are kept (default %(default)s)")
    parser.add_argument("--images", type=int, help="images per model")
    parser.add_argument("--seeds", default="", help="comma-separated training seeds")
    parser.add_argument("--methods", default="", help="comma-separated methods (default all)")
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="repository holding the demo package")
    parser.add_argument("--threads", type=int, help="torch threads for training")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: the "
                        "plan's)")
    parser.add_argument("--architectures", default="",
                        help="comma-separated architectures: plain, residual, depthwise, vit")
    parser.add_argument("--train-images", type=int, help="training images per model")
    parser.add_argument("--epochs", type=int, help="training epochs per model")
    parser.add_argument("--min-accuracy", type=float,
                        help=f"test accuracy below which a model is left out of the ranking "
                        f"(default {groundtruth.MIN_ACCURACY})")
    parser.add_argument("--sanity-models", type=int, help="models given the sanity checks")
    args = parser.parse_args(argv)
    plan = groundtruth.FULL if args.full else groundtruth.SMALL

    def names(text: str) -> tuple[str, ...] | None:
        return tuple(n for n in text.split(",") if n) or None

    plan = groundtruth.with_overrides(
        plan, cache=args.cache, images=args.images, threads=args.threads,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s) or None,
        methods=names(args.methods), tasks=names(args.tasks),
        architectures=names(args.architectures), train_images=args.train_images,
        epochs=args.epochs, min_accuracy=args.min_accuracy, sanity_models=args.sanity_models)
    unknown = [t for t in plan.tasks if t not in groundtruth.tasks.TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {','.join(groundtruth.tasks.TASKS)}")
    out = args.out or (RESULTS if args.full else QUICK_RESULTS)
    command = "python -m benchmarks.groundtruth " + " ".join(
        argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()

    def write(results: groundtruth.Results, finished: bool = False) -> None:
        """Both files, after every model: a run that fails late keeps what it measured."""
        document = {"benchmark": "groundtruth", "machine": machine_info(),
                    "finished": finished, "minutes": (time.perf_counter() - started) / 60,
                    **results.to_json()}
        out.mkdir(parents=True, exist_ok=True)
        (out / "groundtruth.json").write_text(json.dumps(document, indent=1, default=str)
                                              + "\n")
        (out / "groundtruth.md").write_text(
            groundtruth.markdown(document, command) + "\n".join(extra_sections(document)))

    results = groundtruth.run(plan, args.models, checkpoint=write)
    write(results, finished=True)
    print(f"wrote {out / 'groundtruth.json'} and {out / 'groundtruth.md'}", file=sys.stderr)
    return 0


def extra_sections(document: dict[str, Any]) -> list[str]:
    """What was run (size, time, whether it finished) and the sanity checks per method and
    model."""
    plan = document["plan"]
    others = ", ".join([f"{plan['demo_images']} demo"] * plan["demo"]
                       + [f"{plan['fashion_images']} Fashion-MNIST"] * plan["fashion"])
    others = f" ({others})" if others else ""
    lines = ["", "## The run", "",
             f"{len(document['models'])} models scored (planned: {len(plan['tasks'])} tasks × "
             f"{len(plan['architectures'])} architectures × {len(plan['seeds'])} seed(s)"
             f"{', the demo' if plan['demo'] else ''}"
             f"{', Fashion-MNIST' if plan['fashion'] else ''}), {plan['images']} images per "
             f"task model{others}, "
             f"trained on {plan['train_images']} images for {plan['epochs']} epochs; sanity "
             f"checks on {plan['sanity_images']} images of up to {plan['sanity_models']} "
             f"models; {document['minutes']:.0f} min on {document['machine']['cores']} cores "
             f"(load average {document['machine']['load_average'][0]:.1f} at the end)"
             + ("." if document["finished"] else "; **stopped before the end**: the tables "
                "hold the models finished so far.")]
    return lines + sanity_section(document["sanity"])


def sanity_section(checks: list[dict[str, Any]]) -> list[str]:
    """Per method and model: ρ̄ of the randomization cascade and ρ of the random logit."""
    if not checks:
        return []
    models = list(dict.fromkeys(c["model"] for c in checks))
    methods = list(dict.fromkeys(c["method"] for c in checks))
    lines = ["", "## Sanity checks per model", "",
             "Cells: model randomization ρ̄ (Spearman of |map| against the maps of copies with "
             "the top block, top half and all blocks randomized, averaged) / label "
             f"randomization ρ (against a random other class); a test passes below "
             f"{sanity.PASS_BELOW} (bold: fails).", "",
             "| method | " + " | ".join(models) + " | passes |",
             "|---|" + "---|" * (len(models) + 1)]

    def rho(value: float) -> str:
        if not math.isfinite(value):
            return "–"
        return f"{value:.2f}" if value < sanity.PASS_BELOW else f"**{value:.2f}**"

    for method in methods:
        mine = {c["model"]: c for c in checks if c["method"] == method}
        cells = [f"{rho(mine[m]['randomization_rho'])} / {rho(mine[m]['random_logit_rho'])}"
                 if m in mine else "–" for m in models]
        passed = sum(bool(c["passes"]) for c in mine.values())
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {passed}/{len(mine)} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
