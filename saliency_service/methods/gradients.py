"""Pixel-gradient methods on a prepared copy of the exported ``torch.export`` program.

Batches of network inputs run as chunked forward+backward passes bounded by the request's
memory budget; parameters never need gradients, only the input does. The program copy has
BatchNorm folded into its convolutions and channels-last weights (``methods._utils.torch_program``).

Every map here is ``|attribution|`` maxed over channels and divided by the image's maximum
(0 stays "no evidence"); ``return_raw`` gives the signed N×C×H×W attribution.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from saliency_service.methods._utils.target_score import selected_scores
from saliency_service.methods._utils.torch_program import (
    FAST,
    GUIDED,
    TRUNK,
    LinearStem,
    prepared_module,
)
from saliency_service.methods.base import ENGINE_TORCH, Handler, Job
from saliency_service.methods.registry import register

# Builds the network inputs (M×C×H×W) and their target classes (M) for rows ``part``.
RowMaker = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]
# Receives the input gradients and the selected logits of rows ``part``.
RowConsumer = Callable[[slice, torch.Tensor, torch.Tensor], None]


def gradient_rows(
    job: Job, rows: int, make_rows: RowMaker, consume: RowConsumer, variant: str = FAST
) -> None:
    """Runs ∂ logit[target] / ∂ input over ``rows`` virtual rows in memory-bounded chunks.

    Rows are built per chunk (noise samples or interpolation steps never exist all at once);
    the deadline is checked before each chunk; each row is one forward and one backward pass.
    """
    module = prepared_module(job.model, variant)
    size = job.items_per_chunk(backward=True)
    for part in job.checked_chunks(rows, size):
        batch, targets = make_rows(part)
        batch = batch.detach().requires_grad_(True)
        selected = selected_scores(job, module(batch), targets)
        (grad,) = torch.autograd.grad(selected.sum(), batch)
        count = part.stop - part.start
        job.cost.forward(count, ENGINE_TORCH)
        job.cost.backward(count)
        consume(part, grad.detach(), selected.detach())


def summed_input_gradients(
    job: Job, make_rows: RowMaker, images: torch.Tensor, input_shape: torch.Size,
    weights: torch.Tensor | None = None, stem: LinearStem | None = None,
) -> torch.Tensor:
    """Σ over the rows r of image n of weights[r] · ∂ logit[target] / ∂ input (float64,
    N×C×H×W), where ``images[r]`` is row r's image.

    With ``stem`` (``methods._utils.torch_program.linear_stem``), ``make_rows`` gives the rows in
    the stem's output space and they run through the trunk: the sum is linear in the
    gradients, so it goes back through the stem once per image instead of once per row.
    """
    total: torch.Tensor | None = None

    def consume(part: slice, grad: torch.Tensor, _selected: torch.Tensor) -> None:
        nonlocal total
        row_weights = None if weights is None else weights[part]
        summed = sum_rows_by_image(grad, images[part], input_shape[0], row_weights).double()
        total = summed if total is None else total.add_(summed)

    gradient_rows(job, len(images), make_rows, consume, FAST if stem is None else TRUNK)
    if total is None:
        return torch.zeros(input_shape, dtype=torch.float64)
    if stem is not None:
        return stem.input_gradient(total.float(), input_shape).double()
    return total


def sum_rows_by_image(
    values: torch.Tensor, images: torch.Tensor, batch: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ over rows r with images[r] = n of weights[r] · values[r], for n < batch (float32).

    One matrix product over the rows, read in the values' own memory layout (channels-last
    gradients are not copied), rather than ``index_add_`` of a float64 copy.
    """
    rows = values.shape[0]
    matrix = torch.zeros(batch, rows, dtype=values.dtype)
    matrix[images, torch.arange(rows)] = 1.0 if weights is None else weights.to(values.dtype)
    if values.dim() == 4 and values.is_contiguous(memory_format=torch.channels_last):
        last = values.permute(0, 2, 3, 1)  # N×H×W×C, contiguous
        summed = matrix @ last.reshape(rows, -1)
        return summed.view(batch, *last.shape[1:]).permute(0, 3, 1, 2)
    return (matrix @ values.reshape(rows, -1)).view(batch, *values.shape[1:])


def input_gradients(
    job: Job, inputs: np.ndarray, targets: np.ndarray, variant: str = FAST
) -> np.ndarray:
    """∂ logit[target] / ∂ input for every row of ``inputs`` (M×C×H×W), chunked.

    Each row counts as one forward and one backward pass.
    """
    source = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    classes = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    gradients = np.empty(source.shape, dtype=np.float32)

    def make_rows(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return source[part], classes[part]

    def consume(part: slice, grad: torch.Tensor, _selected: torch.Tensor) -> None:
        gradients[part] = grad.numpy()

    gradient_rows(job, source.shape[0], make_rows, consume, variant)
    return gradients


class GradientHandler(Handler):
    """Shared flags of the gradient family."""

    engine = ENGINE_TORCH
    needs_torch = True
    uses_gradients = True


@register
class VanillaGradient(GradientHandler):
    """Simonyan et al. (arXiv 1312.6034): ∂ logit / ∂ x."""

    name = "vanilla_gradient"
    auto_rank = 8
    warm_up = True
    description = "Gradient of the target logit w.r.t. the input; 1 forward + 1 backward."
    paper = "https://arxiv.org/abs/1312.6034"

    def _compute(self, job: Job) -> np.ndarray:
        return input_gradients(job, job.inputs, job.targets)


@register
class InputXGradient(GradientHandler):
    """Shrikumar et al. (arXiv 1605.01713): x ⊙ ∂ logit / ∂ x, as Captum's InputXGradient."""

    name = "input_x_gradient"
    description = "Input times its gradient; 1 forward + 1 backward."
    paper = "https://arxiv.org/abs/1605.01713"

    def _compute(self, job: Job) -> np.ndarray:
        return job.inputs * input_gradients(job, job.inputs, job.targets)


@register
class GuidedBackprop(GradientHandler):
    """Springenberg et al. (arXiv 1412.6806): every ReLU passes back only positive gradients
    of positive inputs; computed on a rewritten copy of the program, never the user's module."""

    name = "guided_backprop"
    auto_rank = 6
    warm_up = True
    description = "Gradient with ReLU backward clamped to positive values; 1 forward + 1 backward."
    paper = "https://arxiv.org/abs/1412.6806"

    def _compute(self, job: Job) -> np.ndarray:
        return input_gradients(job, job.inputs, job.targets, variant=GUIDED)
