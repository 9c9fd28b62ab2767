"""Guided AbsoluteGrad against its authors' implementation on identical models, inputs and noise.

The reference below transcribes ``guided_absolute_grad``, ``aggregate_saliency_maps`` and
``get_gradients`` of github.com/youyinnn/Guided-AbsoluteGrad (``cv_exp/gradient/
_guided_absolute_grad.py`` and ``cv_exp/gradient/base.py``, commit 8f78b8f), line for line,
with one change: ``torch.normal(0, std_dev)`` becomes ``std_dev × z`` for a standard normal
``z`` we pass in, so both sides see the same noise. Ours runs through the handler (and, at the
end, a real server); the noise is the handler's own seeded draw, reproduced here.

One convention differs on purpose: the authors take σ = std_spread × (max − min) over the
whole batch they are given; we take it per image. The reference is therefore run one image at
a time, where the two coincide; ``test_batch_sigma_is_the_only_difference`` shows the batch
case. Tolerance: max |ours − reference| / max |reference| ≤ 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from saliency_service.methods import registry
from saliency_service.methods.noise import GuidedAbsoluteGradParams
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from tests.conftest import TINY_SHAPE
from tests.gradient_fixtures import (
    ARCHITECTURES,
    Exported,
    inputs,
    make_job,
    non_predicted_targets,
    relative_error,
    shared_exports,
)
from tests.models import TinyCNN

TOLERANCE = 1e-4
HANDLER = registry.get(pb.METHOD_GUIDED_ABSOLUTEGRAD)


# --- The authors' algorithm (transcribed; see the module docstring) ----------------------

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


# --- Our side ----------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    return shared_exports(tmp_path_factory)


@pytest.fixture(params=ARCHITECTURES)
def model(request: pytest.FixtureRequest, exported: dict[str, Exported]) -> Exported:
    return exported[request.param]


def test_our_defaults_are_the_papers_setting() -> None:
    defaults = GuidedAbsoluteGradParams()
    assert (defaults.samples, defaults.noise_level, defaults.quantile) == (20, 0.15, 0.85)


@pytest.mark.parametrize(
    ("samples", "quantile", "noise_level"),
    [(20, 0.85, 0.15), (6, 0.0, 0.15), (6, 0.5, 0.3), (6, 1.0, 0.15)],
    ids=["paper", "absolutegrad", "median", "variance_only"],
)
def test_handler_matches_the_authors_code(
    model: Exported, samples: int, quantile: float, noise_level: float
) -> None:
    x = inputs(2)
    targets = non_predicted_targets(model.handle, x)
    seed = 5
    params = HANDLER.params(samples=samples, quantile=quantile, noise_level=noise_level)
    result = HANDLER.explain(make_job(model.handle, x, targets, params, seed=seed))
    expected_raw, expected_maps = reference_per_image(
        model.module, x, targets, seed, samples, quantile, noise_level)
    assert relative_error(result.raw, expected_raw) <= TOLERANCE
    assert relative_error(result.maps, expected_maps) <= TOLERANCE


def test_the_guide_changes_the_map(model: Exported) -> None:
    """The comparison above would not notice a guide that does nothing."""
    x = inputs(2)
    targets = non_predicted_targets(model.handle, x)
    _, guided = reference_per_image(model.module, x, targets, 5, 6, 0.85, 0.15)
    _, plain = reference_per_image(model.module, x, targets, 5, 6, 0.0, 0.15)
    assert relative_error(guided, plain) > 1e-2


def test_batch_sigma_is_the_only_difference(exported: dict[str, Exported]) -> None:
    """With images of different ranges in one batch, the authors' σ (the batch's range)
    differs from ours (each image's); scaling each image's noise to the batch σ on our side
    gives their batch result."""
    model = exported["vgg_style"]
    x = inputs()
    x[1] *= 3.0  # a much wider range than the others
    targets = non_predicted_targets(model.handle, x)
    samples, seed, level = 6, 9, 0.15
    draws = handler_noise(seed, x.shape, samples)
    batch_noise = [torch.cat([draws[i][s] for i in range(x.shape[0])]) for s in range(samples)]
    expected_maps, _ = reference_guided_absolute_grad(
        model.module, torch.from_numpy(x.copy()), torch.from_numpy(targets), batch_noise,
        num_samples=samples, std_spread=level)
    params = HANDLER.params(samples=samples, noise_level=level)
    ours = HANDLER.explain(make_job(model.handle, x, targets, params, seed=seed)).maps
    assert relative_error(ours, expected_maps.numpy()) > 1e-2

    from saliency_service.methods.noise import guided_absolutegrad, noise_tunnel

    sigma = level * float(x.max() - x.min())
    job = make_job(model.handle, x, targets, params, seed=seed)
    stats = noise_tunnel(job, samples, level,
                         noise=lambda row, image: draws[image][row % samples][0] * sigma)
    maps = HANDLER.to_maps(guided_absolutegrad(stats, 0.85), job)
    assert relative_error(maps, expected_maps.numpy()) <= TOLERANCE


def test_server_matches_the_authors_code_on_pixels(stub) -> None:
    """Through a real server from uint8 pixels: σ is relative to the model's normalized input
    (mean 0.5, std 0.25 for ``tiny``), as in the authors' code on normalized images."""
    pixels = np.random.default_rng(4).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    request = pb.ExplainRequest(model="tiny", method=pb.METHOD_GUIDED_ABSOLUTEGRAD, seed=13,
                                return_raw=True, input=pb.Input(tensor=array_to_tensor(pixels)))
    request.guided_absolutegrad.samples = 8
    reply = stub.Explain(request, timeout=60)
    maps = tensor_to_array(reply.saliency)
    targets = np.array([p.top[0].index for p in reply.predictions])
    x = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).copy()
    assert x.shape[1:] == TINY_SHAPE
    expected_raw, expected_maps = reference_per_image(TinyCNN(4), x, targets, 13, 8, 0.85, 0.15)
    assert relative_error(tensor_to_array(reply.raw), expected_raw) <= TOLERANCE
    assert relative_error(maps, expected_maps) <= TOLERANCE
