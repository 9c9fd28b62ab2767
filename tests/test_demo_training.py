"""The model zoo and the demo training loop: shapes, scales, exportability, a tiny training run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency_service.evaluation.cells import CLASS_NAMES, TEST_CONFIG, TRAIN_CONFIG, generate
from saliency_service.zoo.architectures import DemoResNet
from saliency_service.zoo.demo import (
    DEMO_INPUT_SIZE,
    DEMO_MEAN,
    DEMO_STD,
    evaluate_accuracy,
    preprocess,
    train_demo_model,
)
from tests.architectures import ResNet50Shape, VGGStyle

# A few hundred images for one epoch; small batches give enough steps to learn something.
TINY = {"train_images": 512, "epochs": 1, "size": 64, "batch_size": 16, "test_images": 10}
MICRO = {"train_images": 128, "epochs": 1, "size": 32, "batch_size": 16, "test_images": 4}


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def scale_outputs(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of ``model.scale_modules()``, in order, from one forward pass."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)
        )
        for name in model.scale_modules()
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[name] for name in model.scale_modules()]


@pytest.mark.parametrize(
    ("model", "shape", "classes"),
    [
        (DemoResNet(), (2, 3, 128, 128), 10),
        (DemoResNet(), (3, 3, 64, 64), 10),
        (DemoResNet(num_classes=4, width=8), (1, 3, 96, 96), 4),
        (VGGStyle(input_size=64), (2, 3, 64, 64), 10),
        (ResNet50Shape(), (1, 3, 64, 64), 1000),
    ],
    ids=["demo128", "demo64", "demo-narrow96", "vgg64", "resnet50-64"],
)
def test_forward_gives_one_logit_per_class(
    model: nn.Module, shape: tuple[int, ...], classes: int
) -> None:
    with torch.no_grad():
        logits = model.eval()(torch.randn(shape))
    assert logits.shape == (shape[0], classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("model", "size", "scales"),
    [(DemoResNet(), 128, 4), (VGGStyle(input_size=64), 64, 4), (ResNet50Shape(), 64, 5)],
    ids=["demo", "vgg", "resnet50"],
)
def test_scale_modules_end_scales_that_halve_in_resolution(
    model: nn.Module, size: int, scales: int
) -> None:
    names = model.scale_modules()
    assert len(names) == scales
    assert model.cam_layer == names[-1]
    outputs = scale_outputs(model.eval(), torch.randn(1, 3, size, size))
    sides = [out.shape[-1] for out in outputs]
    assert all(out.dim() == 4 for out in outputs)
    assert sides == [sides[0] // 2**k for k in range(scales)], sides
    assert sides[0] == size // 2 if not isinstance(model, VGGStyle) else size
    assert all((out >= 0).all() for out in outputs), "scale outputs should be post-ReLU"


@pytest.mark.parametrize(
    "model",
    [DemoResNet(width=8), VGGStyle(input_size=32, width=8), ResNet50Shape(num_classes=10)],
    ids=["demo", "vgg", "resnet50"],
)
def test_every_relu_is_its_own_out_of_place_module(model: nn.Module) -> None:
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    # Each ReLU module runs exactly once per forward: none is shared, none is functional.
    calls = {id(m): 0 for m in relus}
    for m in relus:
        m.register_forward_hook(lambda mod, _i, _o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert set(calls.values()) == {1}


@pytest.mark.parametrize(
    ("model", "size"),
    [(DemoResNet(), 128), (VGGStyle(input_size=64), 64)],
    ids=["demo", "vgg"],
)
def test_torch_export_matches_eager(model: nn.Module, size: int) -> None:
    model.eval()
    inputs = torch.randn(2, 3, size, size)
    program = torch.export.export(model, (inputs,))
    relu_nodes = [
        node for node in program.graph.nodes if node.target == torch.ops.aten.relu.default
    ]
    assert len(relu_nodes) == sum(isinstance(m, nn.ReLU) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(program.module()(inputs), model(inputs))


def test_too_few_optimizer_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="optimizer steps"):
        train_demo_model(train_images=64, epochs=1, batch_size=16, progress=False)


def test_vgg_rejects_an_input_size_its_head_cannot_take() -> None:
    with pytest.raises(ValueError):
        VGGStyle(input_size=70)


def test_preprocess_scales_normalises_and_moves_channels_first() -> None:
    images = np.zeros((2, 5, 7, 3), np.uint8)
    images[1, :, :, 0] = 255
    inputs = preprocess(images)
    assert inputs.shape == (2, 3, 5, 7) and inputs.dtype == torch.float32
    expected = (np.array([0.0, 0.0, 0.0]) - DEMO_MEAN) / DEMO_STD
    np.testing.assert_allclose(inputs[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    assert inputs[1, 0, 0, 0].item() == pytest.approx((1.0 - DEMO_MEAN[0]) / DEMO_STD[0])
    with pytest.raises(ValueError):
        preprocess(images.astype(np.float32))


def test_demo_statistics_match_the_training_images() -> None:
    pixels = generate(200, TRAIN_CONFIG).images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(pixels.mean(axis=0), DEMO_MEAN, atol=0.03)
    np.testing.assert_allclose(pixels.std(axis=0), DEMO_STD, atol=0.03)


def test_training_is_deterministic_and_leaves_global_state_alone() -> None:
    torch.set_num_threads(1)
    rng_state = torch.random.get_rng_state()
    model, accuracy = train_demo_model(seed=3, progress=False, **MICRO)
    assert torch.get_num_threads() == 1, "the caller's thread count is restored"
    assert torch.equal(torch.random.get_rng_state(), rng_state), "global RNG left untouched"
    torch.set_num_threads(2)
    assert not model.training and isinstance(model, DemoResNet)
    assert 0.0 <= accuracy <= 1.0
    again, _ = train_demo_model(seed=3, progress=False, **MICRO)
    other_seed, _ = train_demo_model(seed=4, progress=False, **MICRO)
    for (name, value), same in zip(
        model.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(value, same), name
    assert not torch.equal(model.fc.weight, other_seed.fc.weight)


def test_tiny_training_lowers_the_loss_and_beats_chance() -> None:
    model, _ = train_demo_model(seed=3, progress=False, **TINY)
    # The initial weights for this seed: the model is the first thing drawn after seeding.
    torch.manual_seed(3)
    untrained = DemoResNet(num_classes=len(CLASS_NAMES)).eval()
    train = generate(256, dataclasses.replace(TRAIN_CONFIG, size=TINY["size"]))
    with torch.no_grad():
        inputs, labels = preprocess(train.images), torch.from_numpy(train.labels)
        assert F.cross_entropy(model(inputs), labels) < F.cross_entropy(untrained(inputs), labels)
    test_config = dataclasses.replace(TEST_CONFIG, size=TINY["size"])
    assert evaluate_accuracy(model, 300, test_config) > 0.2  # chance is 0.1; this run gets 0.3


def test_demo_input_size_is_what_the_service_deploys() -> None:
    assert DEMO_INPUT_SIZE == 128 == TEST_CONFIG.size
