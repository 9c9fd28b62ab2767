"""The one training loop behind the shipped models (the demo and the Fashion-MNIST model).

AdamW with a one-cycle schedule and random flips, on CPU, deterministic from a seed: the seed
fixes the initialisation (the model is the first thing drawn after seeding), the batch order
and the flips. Runs with ``TRAIN_THREADS`` torch threads (or as many as asked) and leaves the
caller's thread count and global RNG state as they were.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

TRAIN_THREADS = 2
MIN_STEPS = 8  # the one-cycle schedule needs a few steps to warm up and anneal

Preprocess = Callable[[np.ndarray], torch.Tensor]
"""uint8 N×H×W×C pixels → the float N×C×H×W tensor the model takes."""


def check_steps(train_images: int, epochs: int, batch_size: int) -> None:
    """Refuses a run too short for the learning-rate schedule."""
    if epochs * (train_images // batch_size) < MIN_STEPS:
        raise ValueError(
            f"{train_images} images × {epochs} epochs in batches of {batch_size} is fewer than "
            f"the {MIN_STEPS} optimizer steps the learning-rate schedule needs"
        )


def train_classifier(
    make_model: Callable[[], nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    preprocess: Preprocess,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    vertical_flips: bool = True,
    progress: bool = True,
    description: str = "training",
    threads: int = TRAIN_THREADS,
) -> nn.Module:
    """Trains ``make_model()`` on ``images`` (uint8 N×H×W×C) and ``labels``; eval mode out.

    Horizontal flips always; vertical flips only where they keep every class's meaning
    (``vertical_flips``). Both coin tosses are drawn at every step either way, so the batch
    order of a seed does not depend on that choice. The weights are reproducible for a given
    ``threads`` (a parallel reduction may round differently on another count).
    """
    check_steps(len(images), epochs, batch_size)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(make_model(), images, labels, preprocess, seed, epochs, batch_size,
                          learning_rate, vertical_flips, progress, description)
    finally:
        torch.set_num_threads(caller_threads)


def _train(model: nn.Module, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess,
           seed: int, epochs: int, batch_size: int, learning_rate: float,
           vertical_flips: bool, progress: bool, description: str) -> nn.Module:
    """The loop proper; global RNG seeded and threads set by the caller."""
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    targets = torch.from_numpy(np.asarray(labels, np.int64))
    count = len(pixels)
    # Channels-last convolutions are about 1.5× faster on CPU; the weights go back at the end.
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=5e-4)
    steps_per_epoch = count // batch_size  # drop the ragged batch: BatchNorm needs a few
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.25
    )
    order = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=description, unit="batch", file=sys.stderr,
              disable=not progress) as bar:
        for epoch in range(epochs):
            permutation = torch.randperm(count, generator=order)
            for step in range(steps_per_epoch):
                index = permutation[step * batch_size : (step + 1) * batch_size]
                inputs = preprocess(pixels[index].numpy())
                flips = torch.rand(2, generator=order)
                if flips[0] < 0.5:
                    inputs = inputs.flip(3)
                if vertical_flips and flips[1] < 0.5:
                    inputs = inputs.flip(2)
                inputs = inputs.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(inputs), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    model = model.to(memory_format=torch.contiguous_format)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, batches: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
             count: int, preprocess: Preprocess, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` on ``count`` images; ``batches(start, size)`` gives
    (uint8 pixels, labels) for images ``start … start + size``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, count, batch_size):
        images, labels = batches(start, min(batch_size, count - start))
        logits = model(preprocess(images))
        correct += int((logits.argmax(dim=1).numpy() == labels).sum())
    model.train(was_training)
    return correct / max(count, 1)
