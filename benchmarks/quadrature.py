"""Can another quadrature rule give Integrated Gradients TorchServe's error in fewer steps?

``benchmarks/peers.py`` compares at equal completeness error; on the demo model our
Gauss-Legendre rule needs all 15 of TorchServe's steps for it. This measures other rules on
the same inputs as that comparison (the demo package, the same 8 pictures, class 0, zero
baseline): Gauss-Legendre, Gauss-Legendre on a graded path α = t^p (nodes crowd towards the
baseline, where the integrand moves most) and the midpoint rule. For each rule and step count
it reports the mean relative completeness error |Σ attribution − (f(x) − f(x'))| / |f(x) −
f(x')| and the mean per-pixel error ‖a − a_ref‖ / ‖a_ref‖ against a 256-step Gauss-Legendre
reference, so a rule that only balances the sum does not pass for a better one.

    python -m benchmarks.quadrature [--quick]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import base_parser, demo_repository, png_images, table, write_json
from saliency_service.core.repository import Repository
from saliency_service.methods._utils.torch_program import FAST, prepared_module
from saliency_service.methods.integrated import quadrature
from saliency_service.protocol.images import decode_image
from saliency_service.protocol.inputs import preprocess_pixels

IMAGES, SEED = 8, 5  # benchmarks/peers.py's pictures
REFERENCE_STEPS = 256
Rule = Callable[[int], tuple[np.ndarray, np.ndarray]]


def graded(power: float) -> Rule:
    """Gauss-Legendre in t on α = t^p: nodes t_k^p, weights w_k · p t_k^(p−1)."""

    def rule(steps: int) -> tuple[np.ndarray, np.ndarray]:
        nodes, weights = quadrature("gauss_legendre", steps)
        return nodes**power, weights * power * nodes ** (power - 1.0)

    return rule


RULES: dict[str, Rule] = {
    "gauss_legendre": lambda steps: quadrature("gauss_legendre", steps),
    "graded t^1.5": graded(1.5),
    "graded t^2": graded(2.0),
    "graded t^3": graded(3.0),
    "midpoint": lambda steps: quadrature("riemann_middle", steps),
}


class StraightPath:
    """The straight path from the zero baseline to the inputs, through the torch program."""

    def __init__(self, module: Any, inputs: np.ndarray, target: int) -> None:
        self.module = module
        self.x = torch.from_numpy(inputs)
        self.target = torch.full((len(inputs), 1), target, dtype=torch.long)
        with torch.no_grad():
            at_input = module(self.x)[0].gather(1, self.target)
            at_baseline = module(torch.zeros_like(self.x))[0].gather(1, self.target)
        self.delta = (at_input - at_baseline)[:, 0].double()

    def attribution(self, nodes: np.ndarray, weights: np.ndarray) -> torch.Tensor:
        total = torch.zeros(self.x.shape, dtype=torch.float64)
        for alpha, weight in zip(nodes, weights, strict=True):
            scaled = (self.x * float(alpha)).requires_grad_(True)
            selected = self.module(scaled)[0].gather(1, self.target).sum()
            (gradient,) = torch.autograd.grad(selected, scaled)
            total += float(weight) * gradient.double()
        return total * self.x.double()

    def completeness(self, attribution: torch.Tensor) -> float:
        gap = attribution.sum(dim=(1, 2, 3)) - self.delta
        return float((gap.abs() / self.delta.abs()).mean())


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    steps_grid = (4, 8, 15) if args.quick else (4, 6, 8, 10, 12, 15)
    root = demo_repository()
    repository = Repository(root)
    repository.load_all()
    handle = repository.get("demo")
    spec = handle.spec().input
    pictures = png_images(IMAGES, int(spec.shape[-1]), seed=SEED)
    inputs = np.concatenate(
        [preprocess_pixels(decode_image(p, 0, 1 << 24)[None], spec) for p in pictures])
    path = StraightPath(prepared_module(handle, FAST), inputs, target=0)
    reference = path.attribution(*quadrature("gauss_legendre", REFERENCE_STEPS))
    norms = reference.flatten(1).norm(dim=1)
    rows = []
    for name, rule in RULES.items():
        for steps in steps_grid:
            attribution = path.attribution(*rule(steps))
            per_pixel = (attribution - reference).flatten(1).norm(dim=1) / norms
            rows.append({"rule": name, "steps": steps,
                         "completeness_error": path.completeness(attribution),
                         "per_pixel_error": float(per_pixel.mean())})
    text = table(rows, ["rule", "steps", "completeness_error", "per_pixel_error"])
    text += (f"\ndemo model, {IMAGES} pictures (seed {SEED}), class 0, zero baseline; per-pixel "
             f"error against Gauss-Legendre with {REFERENCE_STEPS} steps (its own completeness "
             f"error {path.completeness(reference):.2g})\n")
    print(text)
    write_json("quadrature", {"rows": rows, "report": text, "quick": args.quick}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
