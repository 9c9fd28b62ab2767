"""The gradient family against Captum and pytorch-grad-cam on two architectures.

Ours runs through the handlers on the exported, prepared program (BatchNorm folded,
channels-last); the references run on the source ``nn.Module``. Batch of 3 with each item's
second-best class as target. Tolerance: max |ours − reference| / max |reference| ≤ 1e-4.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from captum.attr import (
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)

from saliency_service.core.errors import InvalidInput
from saliency_service.core.request import RequestState
from saliency_service.methods import integrated, registry
from saliency_service.methods._utils.baselines import make_baseline
from saliency_service.methods._utils.gradient_program import translation
from saliency_service.methods._utils.torch_program import GUIDED
from saliency_service.methods.noise import noise_sigmas, noise_tunnel, seeded_noise
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import method_enum, method_name
from saliency_service.serving.config import Config
from tests.gradient_fixtures import (
    ARCHITECTURES,
    Exported,
    inputs,
    make_job,
    non_predicted_targets,
    relative_error,
    shared_exports,
)
from tests.peer_grad_cam import import_pytorch_grad_cam

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    return shared_exports(tmp_path_factory)


@pytest.fixture(params=ARCHITECTURES)
def model(request: pytest.FixtureRequest, exported: dict[str, Exported]) -> Exported:
    return exported[request.param]


def run(
    method: int, model: Exported, x: np.ndarray, targets: np.ndarray, **params: object
) -> tuple[np.ndarray, np.ndarray, object, dict[str, float]]:
    handler = registry.get(method_name(method))
    job = make_job(model.handle, x, targets, handler.params(**params))
    attribution = handler.explain(job)
    assert attribution.maps.dtype == np.float32
    assert attribution.maps.shape == (x.shape[0], x.shape[2], x.shape[3])
    assert attribution.maps.min() >= 0 and attribution.maps.max() <= 1
    return attribution.raw, attribution.maps, job, dict(attribution.diagnostics)


def tensors(x: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x.copy()), torch.from_numpy(targets)


def default_map(raw: np.ndarray) -> np.ndarray:
    """|attribution| maxed over channels, divided by the image's maximum."""
    maps = np.abs(raw).max(axis=1)
    return maps / maps.reshape(maps.shape[0], -1).max(axis=1).reshape(-1, 1, 1)


@pytest.mark.parametrize(
    ("method", "reference"),
    [
        (pb.METHOD_VANILLA_GRADIENT, lambda m: Saliency(m)),
        (pb.METHOD_INPUT_X_GRADIENT, lambda m: InputXGradient(m)),
        (pb.METHOD_GUIDED_BACKPROP, lambda m: GuidedBackprop(m)),
    ],
)
def test_single_pass_methods_match_captum(model: Exported, method: int, reference) -> None:
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    raw, maps, job, _ = run(method, model, x, targets)
    kwargs = {"abs": False} if method == pb.METHOD_VANILLA_GRADIENT else {}
    expected = reference(model.module).attribute(*tensors(x, targets), **kwargs).detach().numpy()
    assert relative_error(raw, expected) <= TOLERANCE
    assert relative_error(maps, default_map(expected)) <= TOLERANCE
    assert (job.cost.forward_passes, job.cost.backward_passes) == (3, 3)


def test_guided_backprop_differs_from_the_plain_gradient(model: Exported) -> None:
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    guided, _, _, _ = run(pb.METHOD_GUIDED_BACKPROP, model, x, targets)
    plain, _, _, _ = run(pb.METHOD_VANILLA_GRADIENT, model, x, targets)
    assert relative_error(guided, plain) > 1e-2


def captum_noise_tunnel(
    model: Exported,
    x: np.ndarray,
    targets: np.ndarray,
    samples: int,
    sigmas: np.ndarray,
    nt_type: str,
    inner: type = Saliency,
) -> tuple[np.ndarray, list]:
    """Captum's NoiseTunnel around ``inner`` per image (its stdev is one float per call),
    and the noise it drew.

    Captum draws ``torch.normal(0, σ repeated to samples×C×H×W)`` from the global generator;
    re-seeding and drawing the same way reproduces that noise for our side.
    """
    tunnel = NoiseTunnel(inner(model.module))
    results, noises = [], []
    for index in range(x.shape[0]):
        image = torch.from_numpy(x[index : index + 1].copy())
        torch.manual_seed(1000 + index)
        results.append(
            tunnel.attribute(
                image,
                nt_type=nt_type,
                nt_samples=samples,
                stdevs=float(sigmas[index]),
                target=int(targets[index]),
                **({"abs": False} if inner is Saliency else {}),
            )
            .detach()
            .numpy()
        )
        torch.manual_seed(1000 + index)
        noises.append(
            torch.normal(0, torch.tensor(float(sigmas[index])).repeat((samples, *image.shape[1:])))
        )
    return np.concatenate(results), noises


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_noise_tunnel_matches_captum_on_identical_noise(model: Exported, nt_type: str) -> None:
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    samples, level = 6, 0.15
    sigmas = noise_sigmas(x, level)
    expected, noises = captum_noise_tunnel(model, x, targets, samples, sigmas, nt_type)
    job = make_job(
        model.handle,
        x,
        targets,
        registry.get("smoothgrad").params(samples=samples, noise_level=level),
        limits={"chunk_memory_bytes": 1 << 20},
    )  # several chunks
    # SmoothGrad gathers Σg only, so its backward passes stop at the stem's output.
    mean_only = nt_type == "smoothgrad"
    assert integrated.linear_stem(model.handle) is not None
    stats = noise_tunnel(job, samples, level, noise=lambda row, image: noises[image][row % samples],
                         spread=not mean_only)
    assert (stats.total_squares is None) == mean_only
    ours = stats.mean() if mean_only else stats.variance()
    assert relative_error(ours, expected) <= TOLERANCE
    assert job.cost.forward_passes == 3 * samples and job.cost.backward_passes == 3 * samples


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_noise_tunnel_wraps_guided_backprop_as_captum_does(model: Exported, nt_type: str) -> None:
    """The tunnel takes any gradient variant: around Guided Backprop it is Captum's
    ``NoiseTunnel(GuidedBackprop)``."""
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    samples, level = 6, 0.15  # as the plain tunnel's test above
    sigmas = noise_sigmas(x, level)
    expected, noises = captum_noise_tunnel(model, x, targets, samples, sigmas, nt_type,
                                           inner=GuidedBackprop)
    job = make_job(model.handle, x, targets,
                   registry.get("smoothgrad").params(samples=samples, noise_level=level))
    stats = noise_tunnel(job, samples, level, noise=lambda row, image: noises[image][row % samples],
                         spread=nt_type == "vargrad", variant=GUIDED)
    ours = stats.mean() if nt_type == "smoothgrad" else stats.variance()
    assert relative_error(ours, expected) <= TOLERANCE


@pytest.mark.parametrize(
    "method", [pb.METHOD_SMOOTHGRAD, pb.METHOD_VARGRAD, pb.METHOD_GUIDED_ABSOLUTEGRAD]
)
def test_noise_methods_are_reproducible_and_seeded(
    exported: dict[str, Exported], method: int
) -> None:
    handle = exported["demo_resnet"].handle
    handler = registry.get(method_name(method))
    x = inputs(2)
    params = handler.params(samples=4)

    def raw(seed: int, chunk_bytes: int) -> np.ndarray:
        job = make_job(
            handle,
            x,
            np.array([1, 2]),
            params,
            seed=seed,
            limits={"chunk_memory_bytes": chunk_bytes},
        )
        return handler.explain(job).raw

    first = raw(7, 1 << 30)
    np.testing.assert_array_equal(first, raw(7, 1 << 30))
    # The same noise whatever the chunking (rows are drawn in order, one per row).
    np.testing.assert_allclose(first, raw(7, 1 << 18), rtol=1e-5, atol=1e-7 * np.abs(first).max())
    assert relative_error(raw(8, 1 << 30), first) > 1e-3


def test_seeded_noise_has_the_requested_scale(exported: dict[str, Exported]) -> None:
    x = inputs(2) * np.array([1.0, 3.0], np.float32).reshape(2, 1, 1, 1)
    drawn: list[tuple[int, torch.Tensor]] = []
    sigmas = noise_sigmas(x, 0.2)
    source = seeded_noise(5, x.shape[1:], sigmas)
    for row in range(40):
        drawn.append((row // 20, source(row, row // 20)))
    for image in (0, 1):
        values = torch.stack([n for i, n in drawn if i == image])
        expected = 0.2 * (x[image].max() - x[image].min())
        assert abs(float(values.std()) / expected - 1) < 0.02
        assert abs(float(values.mean())) < 0.02 * expected


def gag_reference(
    model: Exported, x: np.ndarray, targets: np.ndarray, noises: list, quantile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Guided AbsoluteGrad written straight from the formula, one sample at a time."""
    module = model.module
    maps, totals = [], []
    for index in range(x.shape[0]):
        gradients = []
        for noise in noises[index]:
            noisy = (torch.from_numpy(x[index : index + 1].copy()) + noise).requires_grad_(True)
            logit = module(noisy)[0, int(targets[index])]
            gradients.append(torch.autograd.grad(logit, noisy)[0][0].double())
        stacked = torch.stack(gradients)  # S×C×H×W
        variance = stacked.var(dim=0)  # unbiased
        channels = variance.shape[0]
        if quantile > 0:
            q = torch.quantile(variance.reshape(channels, -1), quantile, dim=1)
            guide = torch.where(variance > q.view(-1, 1, 1), torch.ones_like(variance), variance)
        else:
            guide = torch.ones_like(variance)
        total = (stacked.abs() * guide).sum(dim=0)
        summed = total.abs().sum(dim=0)
        maps.append(((summed - summed.min()) / (summed.max() - summed.min())).numpy())
        totals.append(total.numpy())
    return np.stack(totals), np.stack(maps)


@pytest.mark.parametrize("quantile", [0.85, 0.0])
def test_guided_absolutegrad_matches_the_formula(model: Exported, quantile: float) -> None:
    from saliency_service.methods.noise import GuidedAbsoluteGrad, guided_absolutegrad

    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    samples = 5
    sigmas = noise_sigmas(x, 0.15)
    generator = torch.Generator().manual_seed(3)
    noises = [
        [torch.randn((1, *x.shape[1:]), generator=generator) * float(s) for _ in range(samples)]
        for s in sigmas
    ]
    expected_raw, expected_maps = gag_reference(model, x, targets, noises, quantile)
    job = make_job(model.handle, x, targets, {})
    stats = noise_tunnel(
        job, samples, 0.15, noise=lambda row, image: noises[image][row % samples][0]
    )
    raw = guided_absolutegrad(stats, quantile)
    assert relative_error(raw, expected_raw) <= TOLERANCE
    maps = GuidedAbsoluteGrad().to_maps(raw, job)
    assert relative_error(maps, expected_maps) <= TOLERANCE


@pytest.mark.parametrize(
    "rule",
    ["gauss_legendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"],
)
def test_integrated_gradients_matches_captum(model: Exported, rule: str) -> None:
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    steps = 8
    raw, maps, job, diagnostics = run(
        pb.METHOD_INTEGRATED_GRADIENTS, model, x, targets, steps=steps, rule=rule, baseline="black"
    )
    baseline = make_baseline("black", x, model.handle.spec().input)
    captum_rule = "gausslegendre" if rule == "gauss_legendre" else rule
    expected = (
        IntegratedGradients(model.module)
        .attribute(
            *tensors(x, targets)[:1],
            baselines=torch.from_numpy(baseline.copy()),
            target=torch.from_numpy(targets),
            n_steps=steps,
            method=captum_rule,
        )
        .detach()
        .numpy()
    )
    if rule == "riemann_trapezoid":
        # Captum spaces its trapezoid nodes by 1/steps instead of 1/(steps − 1).
        expected = expected * steps / (steps - 1)
    assert relative_error(raw, expected) <= TOLERANCE
    assert relative_error(maps, default_map(expected)) <= TOLERANCE
    # steps passes per image, and f(black) once per loaded model (a later rule reuses it).
    assert job.cost.forward_passes - 3 * steps in (0, 1)
    assert job.cost.backward_passes == 3 * steps
    with torch.no_grad():
        at_x = model.module(torch.from_numpy(x)).numpy()[np.arange(3), targets]
        at_b = model.module(torch.from_numpy(baseline.copy())).numpy()[np.arange(3), targets]
    gap = np.abs(raw.reshape(3, -1).sum(1).astype(np.float64) - (at_x - at_b))
    assert diagnostics["completeness_error"] == pytest.approx(gap.max(), rel=1e-3, abs=1e-5)


def test_integrated_gradients_through_the_stem_equals_the_plain_path(
    model: Exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path walked in the first convolution's output space gives the input-space answer,
    also when chunks of 4 rows (the budget holds 7) split the steps of a 3-image batch
    unevenly (15 rows: 4, 4, 4, 2, 1)."""
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    handler = registry.get("integrated_gradients")
    params = handler.params(steps=5, baseline="uniform_noise")
    per_row = make_job(model.handle, x, targets, params).activation_bytes(backward=True)
    limits = {"chunk_memory_bytes": 7 * per_row + per_row // 2}
    assert make_job(model.handle, x, targets, params, limits=limits).items_per_chunk(True) == 7
    assert integrated.linear_stem(model.handle) is not None
    through_stem = make_job(model.handle, x, targets, params, limits=limits)
    stem_result = handler.explain(through_stem)
    stem_raw = stem_result.raw
    monkeypatch.setattr(integrated, "linear_stem", lambda _model: None)
    plain = make_job(model.handle, x, targets, params, limits=limits)
    plain_result = handler.explain(plain)
    plain_raw = plain_result.raw
    assert relative_error(stem_raw, plain_raw) <= 1e-5
    assert through_stem.cost.forward_passes == plain.cost.forward_passes == 3 * 5 + 3
    assert through_stem.cost.backward_passes == plain.cost.backward_passes == 3 * 5
    assert stem_result.diagnostics["completeness_error"] == pytest.approx(
        plain_result.diagnostics["completeness_error"], rel=1e-3, abs=1e-5)


def test_constant_baseline_logits_are_computed_once_per_loaded_model(
    exported: dict[str, Exported],
) -> None:
    model = exported["vgg_style"]
    model.handle.load()  # a fresh session: nothing known about it yet
    x = inputs()
    targets = non_predicted_targets(model.handle, x)

    def explain(baseline: str) -> tuple[np.ndarray, object, dict[str, float]]:
        raw, _, job, diagnostics = run(pb.METHOD_INTEGRATED_GRADIENTS, model, x, targets,
                                       steps=4, baseline=baseline)
        return raw, job, diagnostics

    (first, cold, cold_notes), (second, warm, warm_notes) = explain("black"), explain("black")
    assert cold.cost.forward_passes == 3 * 4 + 1  # one row: the batch's baselines are equal
    assert cold.cost.forward_by_engine["onnxruntime"] == 1
    assert warm.cost.forward_passes == 3 * 4
    assert "onnxruntime" not in warm.cost.forward_by_engine
    np.testing.assert_array_equal(first, second)
    assert warm_notes == cold_notes
    for _ in range(2):  # a random baseline differs per request: always computed
        assert explain("uniform_noise")[1].cost.forward_passes == 3 * 4 + 3
    model.handle.load()  # a reloaded model may have new weights
    assert explain("black")[1].cost.forward_passes == 3 * 4 + 1
    assert explain("zero")[1].cost.forward_passes == 3 * 4 + 1


@pytest.mark.parametrize("baseline", ["blur", "uniform_noise"])
def test_integrated_gradients_baselines(exported: dict[str, Exported], baseline: str) -> None:
    model = exported["vgg_style"]
    x = inputs(2)
    targets = np.array([0, 3])
    raw, _, job, _ = run(
        pb.METHOD_INTEGRATED_GRADIENTS,
        model,
        x,
        targets,
        steps=6,
        baseline=baseline,
        rule="gauss_legendre",
    )
    reference = make_baseline(baseline, x, model.handle.spec().input, job.rng())
    expected = (
        IntegratedGradients(model.module)
        .attribute(
            torch.from_numpy(x.copy()),
            baselines=torch.from_numpy(reference),
            target=torch.from_numpy(targets),
            n_steps=6,
            method="gausslegendre",
        )
        .detach()
        .numpy()
    )
    assert relative_error(raw, expected) <= TOLERANCE


def test_completeness_improves_with_steps(exported: dict[str, Exported]) -> None:
    model = exported["demo_resnet"]
    x = inputs(2)
    errors = []
    for steps in (2, 64):
        _, _, _, diagnostics = run(
            pb.METHOD_INTEGRATED_GRADIENTS,
            model,
            x,
            np.array([1, 1]),
            steps=steps,
            rule="gauss_legendre",
        )
        errors.append(diagnostics["completeness_error"])
    assert errors[1] < errors[0]


def upsampled(cam: np.ndarray, size: int) -> np.ndarray:
    """Bilinear to the input size, then min-max per image (all-zero stays zero)."""
    big = (
        F.interpolate(
            torch.from_numpy(cam.astype(np.float32))[:, None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )[:, 0]
        .numpy()
        .astype(np.float64)
    )
    low = big.reshape(big.shape[0], -1).min(1).reshape(-1, 1, 1)
    span = big.reshape(big.shape[0], -1).max(1).reshape(-1, 1, 1) - low
    return np.where(span > 0, (big - low) / np.where(span > 0, span, 1), 0.0)


def test_gradcam_matches_captum_layer_gradcam(model: Exported) -> None:
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    raw, maps, job, _ = run(pb.METHOD_GRADCAM, model, x, targets)
    expected = (
        LayerGradCam(model.module, model.cam_module)
        .attribute(*tensors(x, targets), relu_attributions=False)
        .detach()
        .numpy()[:, 0]
    )
    assert relative_error(raw, expected) <= TOLERANCE
    assert relative_error(maps, upsampled(np.maximum(expected, 0), x.shape[2])) <= TOLERANCE
    assert (job.cost.forward_passes, job.cost.backward_passes) == (3, 3)
    from saliency_service.methods.cam import grad_cam

    cam = grad_cam(make_job(model.handle, x, targets, {}), model.handle.spec().cam_output)
    assert relative_error(cam, np.maximum(expected, 0)) <= TOLERANCE


def test_gradcam_at_a_named_layer(exported: dict[str, Exported]) -> None:
    model = exported["demo_resnet"]
    x = inputs(2)
    targets = np.array([4, 0])
    by_module, _, _, _ = run(pb.METHOD_GRADCAM, model, x, targets, layer="layer3")
    by_output, _, _, _ = run(pb.METHOD_GRADCAM, model, x, targets, layer="scale_2")
    expected = (
        LayerGradCam(model.module, model.module.layer3)
        .attribute(*tensors(x, targets), relu_attributions=False)
        .detach()
        .numpy()[:, 0]
    )
    assert by_module.shape == expected.shape == (2, 4, 4)
    assert relative_error(by_module, expected) <= TOLERANCE
    np.testing.assert_array_equal(by_module, by_output)


@pytest.fixture(scope="module")
def grad_cam_library():
    """pytorch-grad-cam, installed without its dependencies (``make setup``)."""
    return import_pytorch_grad_cam()


PEER_CAMS = {pb.METHOD_GRADCAM: "GradCAM", pb.METHOD_GRADCAM_PLUS_PLUS: "GradCAMPlusPlus",
             pb.METHOD_XGRADCAM: "XGradCAM"}


@pytest.mark.parametrize("method", sorted(PEER_CAMS))
def test_cam_maps_match_pytorch_grad_cam(model: Exported, grad_cam_library, method: int) -> None:
    library, classifier_target = grad_cam_library
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    _, maps, _, _ = run(method, model, x, targets)
    # The library needs parameter gradients enabled; it gets its own copy of the module.
    import copy

    module = copy.deepcopy(model.module).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    layer = module.get_submodule(module.cam_layer)
    kind = getattr(library, PEER_CAMS[method])
    with kind(model=module, target_layers=[layer]) as cam:
        expected = cam(
            input_tensor=torch.from_numpy(x.copy()),
            targets=[classifier_target(int(t)) for t in targets],
        )
    assert expected.shape == maps.shape
    assert relative_error(maps, expected) <= TOLERANCE


def test_gradcam_plus_plus_differs_from_gradcam(model: Exported) -> None:
    """(XGrad-CAM equals Grad-CAM behind a global-average-pool + linear head: the gradient is
    constant over the layer's grid there, so both weights are its value.)"""
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    plain, _, _, _ = run(pb.METHOD_GRADCAM, model, x, targets)
    variant, _, _, _ = run(pb.METHOD_GRADCAM_PLUS_PLUS, model, x, targets)
    assert relative_error(variant / np.abs(variant).max(), plain / np.abs(plain).max()) > 1e-3


GRADIENT_METHODS = [method_enum(h.name) for h in registry.handlers() if h.uses_gradients]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        (pb.METHOD_SMOOTHGRAD, {"samples": 0}, "smoothgrad.samples must be >= 1"),
        (pb.METHOD_SMOOTHGRAD, {"samples": 10_000}, "exceeds the server limit max_samples"),
        (pb.METHOD_SMOOTHGRAD, {"noise_level": 0.0}, "noise_level must be > 0"),
        (pb.METHOD_VARGRAD, {"noise_level": 1.5}, "noise_level must be <= 1"),
        (pb.METHOD_VARGRAD, {"samples": 1}, "samples must be >= 2"),
        (pb.METHOD_GUIDED_ABSOLUTEGRAD, {"quantile": 1.5}, "quantile must be <= 1"),
        (pb.METHOD_GUIDED_ABSOLUTEGRAD, {"quantile": float("nan")}, "quantile must be a finite"),
        (pb.METHOD_INTEGRATED_GRADIENTS, {"steps": 0}, "steps must be >= 1"),
        (
            pb.METHOD_INTEGRATED_GRADIENTS,
            {"steps": 1, "rule": "riemann_trapezoid"},
            "steps must be >= 2",
        ),
        (pb.METHOD_INTEGRATED_GRADIENTS, {"baseline": "zebra"}, "baseline='zebra' is not offered"),
        (pb.METHOD_GRADCAM, {"layer": "nope"}, "layer 'nope' names no tensor, node or module"),
    ],
)
def test_invalid_parameters_are_named(
    exported: dict[str, Exported], method: int, params: dict, message: str
) -> None:
    """Refused where the parameters are made (ranges, choices, limits) or, for what depends
    on the model, by the handler before any pass."""
    handler = registry.get(method_name(method))
    pattern = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises(InvalidInput, match=pattern):
        job = make_job(exported["demo_resnet"].handle, inputs(1), np.array([0]),
                       handler.params(None, Config().limits(), **params))
        handler.explain(job)
    assert "job" not in locals() or job.cost.forward_passes == 0


class CountingState(RequestState):
    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        super().check()


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_deadline_is_checked_between_chunks(exported: dict[str, Exported], method: int) -> None:
    handler = registry.get(method_name(method))
    params = handler.params(**{k: 4 for k in ("samples", "steps") if k in handler.defaults})
    job = make_job(
        exported["vgg_style"].handle,
        inputs(2),
        np.array([0, 1]),
        params,
        limits={"chunk_memory_bytes": 1},
    )  # one row per chunk
    job = dataclasses.replace(job, state=CountingState())
    handler.explain(job)
    assert job.state.checks >= job.cost.backward_passes


def test_a_passed_deadline_stops_a_long_method(exported: dict[str, Exported]) -> None:
    from saliency_service.core.errors import DeadlineExceeded

    handler = registry.get("smoothgrad")

    class ExpiresAfterTwoChecks(RequestState):
        checks = 0

        def check(self) -> None:
            self.checks += 1
            if self.checks > 2:
                raise DeadlineExceeded("deadline")

    job = make_job(
        exported["vgg_style"].handle,
        inputs(1),
        np.array([0]),
        handler.params(),
        limits={"chunk_memory_bytes": 1},
    )
    job = dataclasses.replace(job, state=ExpiresAfterTwoChecks())
    with pytest.raises(DeadlineExceeded):
        handler.explain(job)
    assert job.cost.backward_passes < 20


def test_the_translated_program_is_left_alone(exported: dict[str, Exported]) -> None:
    """Variants are rewritten copies: the translation every variant starts from keeps its
    plain ReLUs and its weights."""
    model = exported["demo_resnet"]
    source = translation(model.handle).program.graph_module
    before = {k: v.clone() for k, v in source.state_dict().items()}
    run(pb.METHOD_GUIDED_BACKPROP, model, inputs(1), np.array([0]))
    targets = [n.target for n in source.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.relu.default in targets
    for key, value in source.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_guided_gradcam_matches_captum(model: Exported) -> None:
    x = inputs()
    targets = non_predicted_targets(model.handle, x)
    raw, maps, job, _ = run(pb.METHOD_GUIDED_GRADCAM, model, x, targets)
    expected = (
        GuidedGradCam(model.module, model.cam_module)
        .attribute(*tensors(x, targets), interpolate_mode="bilinear")
        .detach()
        .numpy()
    )
    assert relative_error(raw, expected) <= TOLERANCE
    assert relative_error(maps, default_map(expected)) <= TOLERANCE
    assert (job.cost.forward_passes, job.cost.backward_passes) == (6, 6)
