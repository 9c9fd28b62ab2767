"""``saliency evaluate`` end to end against a real server on loopback, and its helpers."""

from __future__ import annotations

import csv
import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from saliency_service import cli
from saliency_service.evaluation import fashion_mnist, report
from saliency_service.evaluation.cells import CLASS_NAMES
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from tests.conftest import RunningServer, make_config
from tests.models import TinyCNN

ROOT = Path(__file__).resolve().parent.parent


def test_select_variants_expands_all_and_reads_parameters() -> None:
    offered = ["vanilla_gradient", "guided_absolutegrad", "rise"]
    labels = [v.label for v in report.select_variants("all", offered)]
    assert labels == ["vanilla_gradient", "guided_absolutegrad",
                      "guided_absolutegrad[quantile=0]", "rise"]
    chosen = report.select_variants("rise:masks=50,cells=4,vanilla_gradient", offered)
    assert [v.label for v in chosen] == ["rise[masks=50,cells=4]", "vanilla_gradient"]
    chosen = report.select_variants("all,-guided_absolutegrad", offered)
    assert [v.label for v in chosen] == ["vanilla_gradient", "rise"]
    with pytest.raises(SystemExit, match="not offered"):
        report.select_variants("gradcam", offered)


def test_params_message_types_each_field() -> None:
    message = report.params_message(report.Variant.parse(
        "integrated_gradients:steps=7,baseline=blur"))
    assert isinstance(message, pb.IntegratedGradientsParams)
    assert message.steps == 7 and message.baseline == pb.BASELINE_BLUR
    message = report.params_message(report.Variant.parse("guided_absolutegrad:quantile=0"))
    assert message.HasField("quantile") and message.quantile == 0.0
    assert report.params_message(report.Variant("rise")) is None
    with pytest.raises(SystemExit, match="no parameter"):
        report.params_message(report.Variant.parse("rise:window=3"))


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(1.0, 0.2), (2.0, 0.5), (3.0, 0.4), (10.0, 0.9), (0.5, 0.1), (2.0, 0.5)]
    front = report.pareto_front(points)
    assert [points[i] for i in front] == [(0.5, 0.1), (1.0, 0.2), (2.0, 0.5), (2.0, 0.5),
                                          (10.0, 0.9)]


def test_paired_difference_brackets_the_mean() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(50):
        base = rng.random()
        rows.append({"method": "a", "index": str(index), "rcap": str(base + 0.1)})
        rows.append({"method": "b", "index": str(index), "rcap": str(base)})
    mean, low, high, n = report.paired_difference(rows, "a", "b", "rcap")
    assert n == 50 and low <= mean <= high
    np.testing.assert_allclose([mean, low, high], 0.1, atol=1e-9)  # a constant difference


@pytest.fixture(scope="module")
def cell_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    """A 10-class tiny model (one class per cell type) at 32×32, served on loopback."""
    root = tmp_path_factory.mktemp("cell-models")
    export_package(TinyCNN(len(CLASS_NAMES)), name="cells", version=3, input_shape=(3, 32, 32),
                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], class_labels=CLASS_NAMES,
                   repository=root, head="fc")
    running = RunningServer(make_config(root)).start()
    yield running, root
    running.stop()


def requests_served(running: RunningServer, method: str) -> float:
    url = f"http://127.0.0.1:{running.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = 'saliency_requests_total{code="OK",method="' + method + '",model="cells"} '
    found = re.search(re.escape(pattern) + r"(\S+)", text)
    return float(found.group(1)) if found else 0.0


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_end_to_end_and_rerun_reuses_results(cell_server, tmp_path: Path) -> None:
    running, root = cell_server
    out = tmp_path / "report"
    images = 6
    args = ["evaluate", "--server", running.address, "--model", "cells", "--models", str(root),
            "--images", str(images), "--size", "48", "--batch", "4", "--out", str(out),
            "--no-progress", "--sanity-images", "0"]
    assert cli.main([*args, "--methods", "vanilla_gradient,occlusion:window=8,stride=8"]) == 0

    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 * images
    assert {r["method"] for r in rows} == {"vanilla_gradient", "occlusion[window=8,stride=8]"}
    # The run key names the data, the model and its weights (a retrained model is a new run).
    (run_key,) = {r["run"] for r in rows}
    assert re.fullmatch(r"test-48px-seed1-cells-v3-[0-9a-f]{8}-target_label", run_key)
    for row in rows:
        assert int(row["target"]) == int(row["label"])  # explained the true class
        assert 0.0 <= float(row["rcap"]) <= 1.0
        assert 0.0 <= float(row["deletion_auc"]) <= 1.0
        assert float(row["ms"]) > 0
        if CLASS_NAMES[int(row["label"])] == "blank":
            assert row["relevance_mass"] == "" and row["fiveband_precision"] == ""
        else:
            assert 0.0 <= float(row["relevance_mass"]) <= 1.0
    vanilla = [r for r in rows if r["method"] == "vanilla_gradient"]
    # One prediction forward plus one forward and one backward per image.
    assert {float(r["forward_passes"]) for r in vanilla} == {2.0}
    assert {float(r["backward_passes"]) for r in vanilla} == {1.0}
    occlusion = [r for r in rows if r["method"].startswith("occlusion")]
    assert {float(r["backward_passes"]) for r in occlusion} == {0.0}
    # The cache key records the parameters the map was made with: server defaults + overrides.
    params = json.loads(occlusion[0]["params"])
    assert params["window"] == "8" and params["stride"] == "8" and "baseline" in params
    # 32×32 with window 8 and stride 8: 16 windows, plus the prediction.
    assert {float(r["forward_passes"]) for r in occlusion} == {17.0}

    with np.load(out / "maps" / rows[0]["run"] / "vanilla_gradient.npz") as data:
        assert data["indices"].tolist() == list(range(images))
        assert data["maps"].shape == (images, 32, 32)  # the model's resolution, not 48

    summary = (out / "summary.md").read_text()
    assert "| vanilla_gradient" in summary and "| occlusion[window=8,stride=8]" in summary
    table = next(line for line in summary.splitlines() if line.startswith("| vanilla_gradient"))
    cells_text = [c.strip() for c in table.strip("|").split("|")]
    assert cells_text[1:5] == ["torch", str(images), "2.0", "1.0"]
    mean_rcap = np.mean([float(r["rcap"]) for r in vanilla])
    assert cells_text[6] == f"{mean_rcap:.3f}"
    assert "## The papers' claims, checked here" in summary
    for figure in ("examples.png", "cost_quality.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A re-run adds one method: only its maps are requested; the rest are reused as they were.
    served_before = requests_served(running, "vanilla_gradient")
    assert cli.main([*args, "--methods",
                     "vanilla_gradient,occlusion:window=8,stride=8,occlusion"]) == 0
    assert requests_served(running, "vanilla_gradient") == served_before
    again = read_csv(out / "results.csv")
    assert again[:len(rows)] == rows
    assert len(again) == 3 * images
    assert {r["method"] for r in again[len(rows):]} == {"occlusion"}
    assert re.search(r"^\| occlusion( ★)? \|", (out / "summary.md").read_text(), re.MULTILINE)

    # --report-only with more images than cached: nothing is computed, n says what was scored.
    served_before = requests_served(running, "occlusion")
    more = [*args]
    more[more.index("--images") + 1] = str(2 * images)
    assert cli.main([*more, "--report-only", "--methods", "occlusion"]) == 0
    assert requests_served(running, "occlusion") == served_before
    assert len(read_csv(out / "results.csv")) == 3 * images
    line = next(x for x in (out / "summary.md").read_text().splitlines()
                if x.startswith("| occlusion"))
    assert line.split("|")[3].strip() == str(images)


def test_deadline_stops_filling_and_still_reports(cell_server, tmp_path: Path) -> None:
    running, root = cell_server
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--server", running.address, "--model", "cells", "--models",
                     str(root), "--images", "4", "--methods", "vanilla_gradient", "--out",
                     str(out), "--no-progress", "--deadline", "1e-9"]) == 0
    assert not (out / "results.csv").exists()  # stopped before the first request
    assert "- (run): --deadline reached at image 0" in (out / "summary.md").read_text()


@pytest.mark.skipif(not (ROOT / "models" / "fashion" / "1" / "manifest.json").is_file()
                    or not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs models/fashion/1 and dataset-fashion-mnist")
def test_evaluate_on_fashion_mnist_reports_faithfulness_and_road(tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "fashion", root / "fashion")
    running = RunningServer(make_config(root)).start()
    try:
        out = tmp_path / "report"
        assert cli.main(["evaluate", "--server", running.address, "--model", "fashion",
                         "--models", str(root), "--dataset", "fashion-mnist", "--images", "4",
                         "--road-images", "2", "--methods", "vanilla_gradient,gradcam",
                         "--sanity-images", "0", "--out", str(out), "--no-progress"]) == 0
    finally:
        running.stop()
    rows = read_csv(out / "results.csv")
    assert len(rows) == 8 and {r["run"].split("-fashion-")[0] for r in rows} == {
        "fashion_mnist-test"}
    labels = fashion_mnist.load("test", 4).labels
    for row in rows:
        assert int(row["target"]) == labels[int(row["index"])]
        assert row["relevance_mass"] == "" and row["fiveband_precision"] == ""  # no ground truth
        assert 0.0 <= float(row["rcap"]) <= 1.0
        if int(row["index"]) < 2:
            assert 0.0 <= float(row["road_morf"]) <= 1.0 and 0.0 <= float(row["road_lerf"]) <= 1.0
        else:
            assert row["road_morf"] == ""  # beyond --road-images
    summary = (out / "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| method"))
    assert "ROAD MoRF ↓" in header and "ROAD LeRF ↑" in header and "5-band" not in header
    assert "Fashion-MNIST test photographs" in summary
