"""The Fashion-MNIST model: a ``FashionResNet`` trained on real photographs, reproducibly, on CPU.

The second shipped package (``models/fashion/1``): real images where the demo has synthetic
cells, so ``saliency evaluate --dataset fashion-mnist`` can check whether the methods' ranking
holds outside the generator. Inputs are float32 N×1×28×28 grayscale in [0, 1], normalised by
``FASHION_MEAN``/``FASHION_STD`` (the statistics of the training images). The data come from
Debian's ``dataset-fashion-mnist`` (``saliency_service.evaluation.fashion_mnist``); training is
``saliency_service.zoo.training.train_classifier``, deterministic from a seed.
"""

from __future__ import annotations

import numpy as np
import torch

from saliency_service.evaluation import fashion_mnist
from saliency_service.zoo.architectures import FashionResNet
from saliency_service.zoo.training import accuracy, check_steps, train_classifier

FASHION_MEAN: tuple[float] = (0.286,)
FASHION_STD: tuple[float] = (0.353,)
# One thread: the weights then do not depend on the machine's core count, and small
# convolutions gain little from a second thread.
FASHION_TRAIN_THREADS = 1


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 N×28×28×1 → float32 N×1×28×28, scaled to [0, 1] and normalised."""
    if images.ndim != 4 or images.shape[-1] != 1 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 N×H×W×1 images, got {images.dtype} {images.shape}")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return ((pixels - FASHION_MEAN[0]) / FASHION_STD[0]).contiguous()


def evaluate_accuracy(model: torch.nn.Module, count: int = 10000) -> float:
    """Top-1 accuracy on the first ``count`` images of the test split."""
    test = fashion_mnist.load("test", count)

    def batches(start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        return test.images[start:start + size], test.labels[start:start + size]

    return accuracy(model, batches, len(test.labels), preprocess)


def train_fashion_model(
    seed: int = 0,
    train_images: int = 60000,
    epochs: int = 2,
    progress: bool = True,
    *,
    test_images: int = 10000,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
) -> tuple[FashionResNet, float]:
    """Trains on the first ``train_images`` training photographs; horizontal flips only
    (an upside-down shoe is not a shoe this data set shows).

    Returns:
        The model in eval mode and its top-1 accuracy on ``test_images`` test images.

    Raises:
        evaluation.fashion_mnist.DatasetMissing: the Debian package is not installed.
    """
    check_steps(train_images, epochs, batch_size)
    data = fashion_mnist.load("train", train_images)
    model = train_classifier(
        lambda: FashionResNet(num_classes=len(fashion_mnist.CLASS_NAMES)), data.images,
        data.labels, preprocess, seed=seed, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, vertical_flips=False, progress=progress,
        description="training Fashion-MNIST model", threads=FASHION_TRAIN_THREADS)
    threads = torch.get_num_threads()
    torch.set_num_threads(FASHION_TRAIN_THREADS)
    try:
        score = evaluate_accuracy(model, test_images)
    finally:
        torch.set_num_threads(threads)
    return model, score  # type: ignore[return-value]
