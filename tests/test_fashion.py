"""Fashion-MNIST: the Debian package's files, the training recipe, and the shipped package."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saliency_service.evaluation import fashion_mnist
from saliency_service.evaluation.metrics import OnnxClassifier
from saliency_service.zoo.architectures import FashionResNet
from saliency_service.zoo.fashion import preprocess, train_fashion_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "models" / "fashion" / "1"
INSTALLED = (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(
    not INSTALLED, reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist "
    "(make setup does it as root)")


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], ">i4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_reads_idx_files_and_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28) % 251
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([3, 1, 4, 1, 5]))
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    batch = fashion_mnist.load("test", count=2, start=2)
    assert batch.images.shape == (2, 28, 28, 1) and batch.images.dtype == np.uint8
    np.testing.assert_array_equal(batch.images[..., 0], images[2:4])
    np.testing.assert_array_equal(batch.labels, [4, 1])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, np.array([3, 1, 4, 1, 5]))
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.load("test")


def test_absent_files_say_how_to_install_them(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(fashion_mnist.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load("train")
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load("validation")


@needs_data
def test_the_debian_files_hold_the_data_set() -> None:
    test = fashion_mnist.load("test")
    assert test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(test.labels).tolist() == [1000] * 10  # balanced classes
    head = fashion_mnist.load("train", count=1000)
    pixels = head.images / 255.0
    assert abs(pixels.mean() - 0.286) < 0.02 and abs(pixels.std() - 0.353) < 0.02


@needs_data
def test_training_is_deterministic_and_learns() -> None:
    recipe = {"train_images": 512, "epochs": 1, "batch_size": 16, "test_images": 500,
              "progress": False}
    model, accuracy = train_fashion_model(seed=5, **recipe)
    again, _ = train_fashion_model(seed=5, **recipe)
    for (name, value), same in zip(model.state_dict().items(), again.state_dict().values(),
                                   strict=True):
        assert torch.equal(value, same), name
    assert isinstance(model, FashionResNet) and not model.training
    assert accuracy > 0.4, accuracy  # chance is 0.1; 32 steps on 512 images


@needs_data
@pytest.mark.skipif(not (PACKAGE / "manifest.json").is_file(), reason="models/fashion/1 not built")
def test_the_shipped_package_classifies_real_test_images() -> None:
    manifest = json.loads((PACKAGE / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [-1, 1, 28, 28]
    assert manifest["outputs"]["scales"] == ["scale_0", "scale_1", "scale_2"]
    assert manifest["head"]["type"] == "gap_linear"  # FastCAM reads it without a backward
    assert sum(f["bytes"] for f in manifest["files"].values()) < 1_500_000
    test = fashion_mnist.load("test", count=1000)
    classifier = OnnxClassifier.from_package(PACKAGE)
    predicted = classifier(test.images / 255.0).argmax(axis=1)
    accuracy = float((predicted == test.labels).mean())
    assert accuracy > 0.85, accuracy
    assert abs(accuracy - manifest["metadata"]["test_accuracy"]) < 0.03
    # The package's preprocessing is the training's.
    x = preprocess(test.images[:2]).numpy()
    spec = manifest["input"]
    np.testing.assert_allclose(x, (test.images[:2].transpose(0, 3, 1, 2) / 255.0
                                   - spec["mean"][0]) / spec["std"][0], rtol=1e-5, atol=1e-6)
