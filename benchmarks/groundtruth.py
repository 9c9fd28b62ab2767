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
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import QUICK_RESULTS, RESULTS, base_parser, machine_info
from saliency_service.evaluation import groundtruth


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
    out = args.out if (args.full or args.out not in (RESULTS,)) else QUICK_RESULTS
    results = groundtruth.run(plan, args.models)
    document = {"benchmark": "groundtruth", "machine": machine_info(), **results.to_json()}
    command = "python -m benchmarks.groundtruth " + " ".join(
        argv if argv is not None else sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "groundtruth.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (out / "groundtruth.md").write_text(groundtruth.markdown(document, command))
    print(f"wrote {out / 'groundtruth.json'} and {out / 'groundtruth.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
