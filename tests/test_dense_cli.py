"""The command line and the Python client on detectors and segmenters, against a real server:
``saliency predict`` prints detections (box, label, score) or the pixels per predicted class;
``saliency explain`` takes ``--box``/``--label``, ``--min-score`` and ``--region-class`` and
writes one overlay per target; ``SaliencyClient`` takes the same targets. Mistakes are one
line with the documented exit codes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saliency_service.cli import main
from saliency_service.client.client import (
    SaliencyClient,
    class_counts,
    dense_target,
    detections_of,
)
from saliency_service.client.commands import EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from saliency_service.evaluation.scenes import CLASSES, SceneConfig, generate
from saliency_service.packaging.onnx_import import GridHead, import_onnx
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.method_params import ParamError
from saliency_service.serving.background import RunningServer
from saliency_service.zoo.detectors import ANCHOR, MEAN, STD, preprocess
from tests import detection_support as support
from tests.conftest import make_config

SEGMENT_LABELS = ("background", *CLASSES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> support.Trained:
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return support.load_trained(tmp_path_factory.mktemp("onnx"))
    finally:
        torch.set_num_threads(caller_threads)


@pytest.fixture(scope="module")
def server(trained: support.Trained,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("models")
    common = {"repository": root, "mean": MEAN, "std": STD}
    import_onnx(trained.onnx["grid"], name="grid", class_labels=CLASSES,
                grid=GridHead(anchor=ANCHOR), **common)  # type: ignore[arg-type]
    import_onnx(trained.onnx["unet"], name="unet", class_labels=SEGMENT_LABELS,
                **common)  # type: ignore[arg-type]
    running = RunningServer(make_config(root)).start(timeout=600)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def scene():  # noqa: ANN201 - one scene of the evaluation seed
    return generate(1, SceneConfig(seed=support.EVALUATION_SEED))


@pytest.fixture(scope="module")
def image(scene, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(scene.images[0]).save(path)
    return path


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[SaliencyClient]:
    with SaliencyClient(server.address, timeout=300) as connected:
        yield connected


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def call(server: RunningServer, command: str, model: str, image: Path, *extra: str) -> list[str]:
    return [command, "--server", server.address, "--model", model, "--image", str(image),
            *extra]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(io.BytesIO(path.read_bytes())) as picture:
        assert picture.format == "PNG"
        return picture.size


# ---- predict ------------------------------------------------------------------------------


def test_predict_prints_each_detection_with_box_label_and_score(
        capsys: pytest.CaptureFixture[str], server: RunningServer, image: Path,
        client: SaliencyClient) -> None:
    code, printed, err = run(capsys, *call(server, "predict", "grid", image))
    assert code == EXIT_OK, err
    (found,) = detections_of(client.predict("grid", images=[image.read_bytes()]))
    lines = printed.splitlines()
    assert lines[0] == f"{len(found)} detections:" and len(found) > 1
    for line, detection in zip(lines[1:], found, strict=True):
        x1, y1, x2, y2 = detection.box
        assert line == (f"  {detection.label} [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}] score "
                        f"{detection.score:.3f}")


def test_predict_prints_a_segmenters_pixels_per_class(
        capsys: pytest.CaptureFixture[str], server: RunningServer, image: Path,
        trained: support.Trained, scene) -> None:  # noqa: ANN001
    code, printed, err = run(capsys, *call(server, "predict", "unet", image))
    assert code == EXIT_OK, err
    with torch.no_grad():
        classes = trained.unet(preprocess(scene.images)).argmax(dim=1).numpy()[0]
    counts = np.bincount(classes.ravel(), minlength=len(SEGMENT_LABELS))
    lines = printed.splitlines()
    assert lines[0] == "pixels per class:"
    shown = {line.split(":")[0].strip(): int(line.split(":")[1].split()[0])
             for line in lines[1:]}
    assert shown == {SEGMENT_LABELS[c]: int(n) for c, n in enumerate(counts) if n}
    code, printed, _ = run(capsys, *call(server, "predict", "unet", image, "--json"))
    assert code == EXIT_OK
    assert json.loads(printed)["class_counts"] == [
        {SEGMENT_LABELS[c]: int(counts[c]) for c in np.argsort(-counts, kind="stable")
         if counts[c]}]


# ---- explain ------------------------------------------------------------------------------


def test_explain_a_detection_by_box_and_label_writes_its_overlay(
        capsys: pytest.CaptureFixture[str], server: RunningServer, image: Path,
        client: SaliencyClient, tmp_path: Path) -> None:
    (found,) = detections_of(client.predict("grid", images=[image.read_bytes()]))
    detection = found[-1]
    box = ",".join(f"{v:.2f}" for v in detection.box)
    out = tmp_path / "detection.png"
    code, printed, err = run(capsys, *call(server, "explain", "grid", image, "--method",
                                           "gradcam", "--box", box, "--label",
                                           detection.label, "--out", str(out)))
    assert code == EXIT_OK, err
    assert printed.splitlines()[0].startswith(f"{out}: {detection.label} [")
    assert f"score {detection.score:.3f}" in printed and "(1 map)" in printed
    assert png_size(out)[0] > 64


def test_explain_every_detection_above_a_score_writes_one_file_each(
        capsys: pytest.CaptureFixture[str], server: RunningServer, image: Path,
        client: SaliencyClient, tmp_path: Path) -> None:
    (found,) = detections_of(client.predict("grid", images=[image.read_bytes()]))
    out = tmp_path / "every.png"
    code, printed, err = run(capsys, *call(server, "explain", "grid", image, "--method",
                                           "gradcam,vanilla_gradient", "--min-score", "0",
                                           "--out", str(out)))
    assert code == EXIT_OK, err
    paths = [tmp_path / f"every-{index}.png" for index in range(1, len(found) + 1)]
    assert sorted(tmp_path.iterdir()) == sorted(paths)
    for path, detection, line in zip(paths, found, printed.splitlines(), strict=False):
        assert line.startswith(f"{path}: {detection.label} [")
        png_size(path)  # a panel of the two methods
    assert printed.count(f"({len(found)} maps)") == 2


def test_explain_a_segmenters_class_in_its_region_or_a_box(
        capsys: pytest.CaptureFixture[str], server: RunningServer, image: Path,
        trained: support.Trained, scene, tmp_path: Path) -> None:  # noqa: ANN001
    with torch.no_grad():
        classes = trained.unet(preprocess(scene.images)).argmax(dim=1).numpy()[0]
    label = int(np.bincount(classes[classes > 0]).argmax())
    out = tmp_path / "region.png"
    code, printed, err = run(capsys, *call(server, "explain", "unet", image, "--method",
                                           "gradcam", "--region-class", SEGMENT_LABELS[label],
                                           "--out", str(out)))
    assert code == EXIT_OK, err
    assert f"{SEGMENT_LABELS[label]} region of {int((classes == label).sum())} pixels" in printed
    assert out.exists()
    code, printed, err = run(capsys, *call(server, "explain", "unet", image, "--method",
                                           "gradcam", "--region-class", SEGMENT_LABELS[label],
                                           "--box", "0,0,16,32", "--out", str(out), "--json"))
    assert code == EXIT_OK, err
    (explanation,) = json.loads(printed)["explanations"]
    assert explanation["explained"][0]["region_pixels"] == 16 * 32


@pytest.mark.parametrize(("flags", "message"), [
    (("--label", "disc"), "give its --box X1,Y1,X2,Y2 too"),
    (("--box", "1,2,3"), "--box must be X1,Y1,X2,Y2"),
    (("--box", "0,0,8,8"), "--box needs --label (a detection) or --region-class"),
    (("--box", "0,0,8,8", "--label", "disc", "--target", "1"), "--target is a classifier's"),
    (("--min-score", "0.5", "--region-class", "disc"), "give one target"),
])
def test_target_flags_that_name_no_one_target_are_usage_errors(
        capsys: pytest.CaptureFixture[str], server: RunningServer, image: Path,
        tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    code, _, err = run(capsys, *call(server, "explain", "grid", image, "--out",
                                     str(tmp_path / "x.png"), *flags))
    assert code == EXIT_USAGE and message in one_line_error(err)
    assert not list(tmp_path.iterdir())


def test_a_target_the_model_refuses_is_the_servers_one_line(
        capsys: pytest.CaptureFixture[str], server: RunningServer, image: Path,
        tmp_path: Path) -> None:
    code, _, err = run(capsys, *call(server, "explain", "grid", image, "--method", "gradcam",
                                     "--box", "8,8,24,24", "--label", "car", "--out",
                                     str(tmp_path / "x.png")))
    assert code == EXIT_REFUSED
    assert "INVALID_ARGUMENT" in one_line_error(err) and "has no class 'car'" in err


# ---- the Python client -------------------------------------------------------------------


def test_the_python_client_takes_the_same_targets(client: SaliencyClient, image: Path) -> None:
    data = image.read_bytes()
    (found,) = detections_of(client.predict("grid", images=[data]))
    first = found[0]
    result = client.explain("grid", "gradcam", images=[data], box=first.box,
                            label=first.class_index)
    assert result.maps.shape == (1, 64, 64)
    assert [t.label for t in result.explained] == [first.label]
    every = client.explain("grid", "gradcam", images=[data], min_score=0.0)
    assert len(every.explained) == len(found) == len(every.maps)
    region = client.explain("unet", "gradcam", images=[data], region_class="disc",
                            mask=np.pad(np.ones((8, 8), bool), ((0, 56), (0, 56))))
    assert region.explained[0].region_pixels == 64
    (counts,) = class_counts(client.predict("unet", images=[data]), SEGMENT_LABELS)
    assert sum(counts.values()) == 64 * 64


@pytest.mark.parametrize(("arguments", "message"), [
    ({"label": "disc"}, "needs box="),
    ({"box": (0, 0, 8, 8), "label": "disc", "min_score": 0.1}, "not both"),
    ({"region_class": "disc", "label": "disc"}, "not both"),
    ({"mask": np.ones((2, 2))}, "give region_class= with it"),
    ({"box": (0, 0, 8), "label": "disc"}, "four numbers"),
])
def test_client_targets_that_name_no_one_target_are_refused_before_a_call(
        arguments: dict, message: str) -> None:
    with pytest.raises(ParamError, match=message):
        dense_target(**arguments)


def test_dense_targets_are_the_protos_the_server_reads() -> None:
    assert dense_target() is None
    assert dense_target(min_score=0.25) == pb.Target(min_score=0.25)
    assert dense_target(box=(1, 2, 3, 4), label="disc") == pb.Target(detection=pb.DetectionTarget(
        box=pb.Box(x1=1, y1=2, x2=3, y2=4), label="disc"))
    assert dense_target(region_class=2, box=(0, 0, 8, 8)) == pb.Target(region=pb.RegionTarget(
        class_index=2, box=pb.Box(x1=0, y1=0, x2=8, y2=8)))
