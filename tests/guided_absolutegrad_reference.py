"""The authors' Guided AbsoluteGrad, transcribed as a reference (Huang & Liu, arXiv 2404.15564).

Transcribes ``guided_absolute_grad``, ``aggregate_saliency_maps``, ``get_gradients`` and
``min_max_norm_matrix`` of github.com/youyinnn/Guided-AbsoluteGrad (``cv_exp/gradient/
_guided_absolute_grad.py``, ``cv_exp/gradient/base.py``, ``cv_exp/utils/data_utils.py``, commit
8f78b8f) line for line, with one change: ``torch.normal(0, std_dev)`` becomes ``std_dev × z``
for a standard normal ``z`` passed in, so a comparison can give both sides the same noise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def reference_get_gradients(
    model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, loss: bool = False
) -> torch.Tensor:
    """``get_gradients`` (task 'classification'): ∂ Σₙ output[n, target n] / ∂ images, where
    ``-nll_loss`` of the raw outputs picks the target's logit (``loss=True``: log-softmax)."""
    original_model_mode_on_train = model.training
    model.eval()
    images = images.clone().detach().requires_grad_(True)
    outputs = model(images)
    if loss:
        outputs = torch.log_softmax(outputs, 1)
        agg = F.nll_loss(outputs, targets, reduction="sum")
    else:
        agg = -1.0 * F.nll_loss(outputs, targets, reduction="sum")
    model.zero_grad()
    gradients = torch.autograd.grad(outputs=agg, inputs=images, retain_graph=False,
                                    create_graph=False, allow_unused=True)[0]
    if original_model_mode_on_train:
        model.train()
    return gradients


def reference_min_max_norm_matrix(u: torch.Tensor) -> torch.Tensor:
    """``data_utils.min_max_norm_matrix`` for tensors: min-max over the last two axes."""
    umin = u.min(dim=-1, keepdim=True).values.min(dim=-2, keepdim=True).values
    u = u - umin
    umax = u.max(dim=-1, keepdim=True).values.max(dim=-2, keepdim=True).values
    u = u / umax
    if torch.isnan(u).all():
        u = torch.ones_like(u)
    return u


def reference_aggregate_saliency_maps(
    cams: list[torch.Tensor], ifabs: bool = False, th: float | None = None,
    aggregation: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aggregate_saliency_maps``; also returns ``final_cam`` (N×C×H×W) before line 16."""
    cams_k = torch.stack(cams, dim=4).detach()
    n, c, w, h, _num_samples = cams_k.shape
    final_cam = torch.zeros(size=(n, c, w, h))
    if aggregation in ["mean", None]:
        for cam in cams:
            final_cam += cam.abs() if ifabs else cam
    if aggregation == "var":
        final_cam = cams_k.var(4)
    if aggregation == "guided":
        if th is None:
            th = 0.7
        if th > 0:
            var = cams_k.var(4)  # unbiased, over the samples
            q = torch.quantile(var.reshape(n, c, w * h), th, dim=2, keepdim=True)
            vs = torch.where(var > q.reshape(n, c, 1, 1).repeat(1, 1, w, h), 1, var)
            vs = vs.reshape(n, c, w, h)
        elif th < 0:
            vs = cams_k.var(4)
        else:
            vs = torch.full(size=(n, 3, w, h), fill_value=1)
        for cam in cams:
            final_cam += cam.abs() * vs if ifabs else cam * vs
    return reference_min_max_norm_matrix(final_cam.abs().sum(1)), final_cam


def reference_guided_absolute_grad(
    model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
    standard_normal: list[torch.Tensor], num_samples: int = 20, th: float = 0.85,
    std_spread: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``guided_absolute_grad`` with the paper's setting (GAG-3 in ``cases/*/settings.py``:
    20 samples, th 0.85, std_spread 0.15, ifabs, 'guided'); sample i's noise is
    std_dev × standard_normal[i]."""
    cams = []
    std_dev = std_spread * (images.max().item() - images.min().item())
    for i in range(num_samples):
        noise_p = standard_normal[i] * std_dev
        mixed = images + noise_p
        cams.append(reference_get_gradients(model, mixed, targets))
    return reference_aggregate_saliency_maps(cams, True, th, "guided")


# --- The same noise as the service's handler ----------------------------------------------

def handler_noise(seed: int, shape: tuple[int, ...], samples: int) -> list[list[torch.Tensor]]:
    """The standard normal draws behind the handler's noise, [image][sample] (1×C×H×W each):
    one Generator seeded with the request's seed, one C×H×W draw per row, image-major."""
    generator = torch.Generator().manual_seed(seed)
    batch = shape[0]
    return [
        [torch.randn(shape[1:], generator=generator)[None] for _ in range(samples)]
        for _ in range(batch)
    ]


def reference_per_image(
    module: torch.nn.Module, x: np.ndarray, targets: np.ndarray, seed: int, samples: int,
    quantile: float, noise_level: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' algorithm one image at a time (σ per image), on the handler's noise."""
    draws = handler_noise(seed, x.shape, samples)
    maps, raws = [], []
    for index in range(x.shape[0]):
        image = torch.from_numpy(x[index : index + 1].copy())
        found_map, raw = reference_guided_absolute_grad(
            module, image, torch.tensor([int(targets[index])]), draws[index],
            num_samples=samples, th=quantile, std_spread=noise_level)
        maps.append(found_map.numpy())
        raws.append(raw.numpy())
    return np.concatenate(raws), np.concatenate(maps)
