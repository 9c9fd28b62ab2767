"""Fashion-MNIST (Xiao et al., https://arxiv.org/abs/1708.07747) from Debian's package.

70,000 grayscale 28×28 photographs of clothing in ten classes (60,000 train, 10,000 test),
read from the IDX files that ``apt-get install dataset-fashion-mnist`` puts in
``/usr/share/datasets/fashion-mnist`` (or the folder ``SALIENCY_FASHION_MNIST`` names). Nothing
is downloaded: where the files are absent, ``DatasetMissing`` says how to install them.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "SALIENCY_FASHION_MNIST"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES: tuple[str, ...] = ("t_shirt_top", "trouser", "pullover", "dress", "coat",
                                "sandal", "shirt", "sneaker", "bag", "ankle_boot")
SIZE = 28
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


class DatasetMissing(FileNotFoundError):
    """The Fashion-MNIST files are not on this machine."""


@dataclass(frozen=True)
class FashionBatch:
    """uint8 N×28×28×1 images (0 = black) and int64 labels."""

    images: np.ndarray
    labels: np.ndarray


def data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def load(split: str = "test", count: int | None = None, start: int = 0) -> FashionBatch:
    """Images ``start … start + count`` of the ``train`` or ``test`` split, in file order.

    Raises:
        DatasetMissing: the files are absent (with the command that installs them).
        ValueError: an unknown split, or a file that is not IDX.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = data_dir()
    paths = [folder / name for name in _FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST not found: {missing[0]} is missing. Install Debian's package "
            f"(`apt-get install {DEBIAN_PACKAGE}`, which `make setup` runs as root) or point "
            f"{ENV_VAR} at a folder holding {', '.join(_FILES[split])}")
    images = _read_idx(paths[0], _IMAGES_MAGIC)
    labels = _read_idx(paths[1], _LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images, {paths[1]} {len(labels)} labels")
    stop = len(images) if count is None else min(start + count, len(images))
    return FashionBatch(images[start:stop, :, :, None].copy(), labels[start:stop].copy())


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (big-endian int32 magic and sizes, then uint8 data) as an array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    header = np.frombuffer(data[:4], ">i4")[0]
    if header != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {header})")
    dims = int(data[3])
    shape = tuple(int(v) for v in np.frombuffer(data[4:4 + 4 * dims], ">i4"))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)
