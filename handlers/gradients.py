"""Pixel-gradient methods on the exported ``torch.export`` program.

Batches of network inputs run as chunked forward+backward passes bounded by the
request's memory budget; parameters never need gradients, only the input does.
"""

from __future__ import annotations

import numpy as np
import torch

from handlers.base import ENGINE_TORCH, ExplainJob, Handler, chunks
from handlers.registry import register
from saliency.v1 import explainer_pb2 as pb


def input_gradients(job: ExplainJob, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """∂ logit[target] / ∂ input for every row of ``inputs`` (M×C×H×W), chunked.

    Each row counts as one forward and one backward pass.
    """
    module = job.model.torch_module()
    gradients = np.empty_like(inputs, dtype=np.float32)
    size = job.items_per_chunk(backward=True)
    for part in chunks(inputs.shape[0], size):
        job.state.check()
        batch = torch.from_numpy(np.ascontiguousarray(inputs[part])).requires_grad_(True)
        logits = _logits(module(batch))
        index = torch.from_numpy(targets[part].astype(np.int64)).view(-1, 1)
        selected = logits.gather(1, index).sum()
        (grad,) = torch.autograd.grad(selected, batch)
        gradients[part] = grad.detach().numpy()
        count = part.stop - part.start
        job.cost.forward(count, ENGINE_TORCH)
        job.cost.backward(count)
    return gradients


def _logits(outputs: object) -> torch.Tensor:
    """The exported program returns (logits, scale_0, …); plain modules return logits."""
    if isinstance(outputs, tuple | list):
        return outputs[0]
    return outputs  # type: ignore[return-value]


@register
class VanillaGradient(Handler):
    """Simonyan et al. (arXiv 1312.6034): |∂ logit / ∂ x|, max over channels."""

    method = pb.METHOD_VANILLA_GRADIENT
    name = "vanilla_gradient"
    engine = ENGINE_TORCH
    needs_torch = True
    uses_gradients = True
    params_field = "vanilla_gradient"
    description = "Gradient of the target logit w.r.t. the input; 1 forward + 1 backward."
    paper = "https://arxiv.org/abs/1312.6034"

    def _compute(self, job: ExplainJob) -> np.ndarray:
        return input_gradients(job, job.inputs, job.targets)
