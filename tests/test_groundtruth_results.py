"""The ground-truth benchmark's result files: written after every model (a run that fails late
keeps what it measured, with no metric left as nan), the sanity checks per method and model,
and the defaults sweeps' paired differences to today's defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import groundtruth as bench
from benchmarks import groundtruth_defaults as defaults
from saliency_service.evaluation import groundtruth

PLAN = groundtruth.Plan(tasks=("colour", "shape"), architectures=("plain", "vit"), images=2,
                        train_images=192, epochs=1, min_accuracy=0.0, progress=False)
TRAINING = ["--train-images", "192", "--epochs", "1", "--min-accuracy", "0", "--seeds", "0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small trained models (colour and shape, plain and ViT), trained once."""
    folder = tmp_path_factory.mktemp("groundtruth_cache")
    plan = groundtruth.with_overrides(PLAN, cache=folder)
    for task in PLAN.tasks:
        for architecture in PLAN.architectures:
            groundtruth.task_model(plan, task, architecture, 0)
    return folder


def test_a_run_that_fails_late_keeps_the_finished_models_results(cache: Path,
                                                                  tmp_path: Path) -> None:
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    onnx = broken / "shape-plain-s0-48px" / "shape-plain-s0-48px" / "1" / "model.onnx"
    onnx.write_bytes(b"not an onnx graph")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="failed to load"):
        bench.main(["--cache", str(broken), "--out", str(out), "--images", "2", "--methods",
                    "gradcam", "--tasks", "colour,shape", "--architectures", "plain",
                    "--sanity-models", "0", *TRAINING])
    document = json.loads((out / "groundtruth.json").read_text())
    assert document["finished"] is False
    assert {r["model"] for r in document["rows"]} == {"colour-plain-s0-48px"}
    assert all("zero_maps" in r for r in document["rows"])
    text = (out / "groundtruth.md").read_text()
    assert "stopped before the end" in text
    assert "nan" not in text


def test_a_metric_no_model_has_is_shown_as_a_dash_not_nan(cache: Path, tmp_path: Path) -> None:
    bench.main(["--cache", str(cache), "--out", str(tmp_path), "--images", "2", "--methods",
                "gradcam", "--tasks", "colour", "--architectures", "plain",
                "--sanity-models", "0", *TRAINING])
    document = json.loads((tmp_path / "groundtruth.json").read_text())
    assert document["finished"] is True
    row = document["rows"][0]
    assert row["zero_maps"] == 0.0
    del row["zero_maps"]  # as in rows rebuilt from an older run's progress lines
    results = groundtruth.Results(document["plan"], document["models"], document["rows"])
    text = groundtruth.markdown({**document, "summary": results.to_json()["summary"]}, "test")
    gradcam = next(line for line in text.splitlines() if line.startswith("| gradcam |"))
    assert "nan" not in gradcam and "| – |" in gradcam


def test_sanity_checks_go_to_one_model_per_task_and_family_and_are_tabled_per_model(
        cache: Path, tmp_path: Path) -> None:
    bench.main(["--cache", str(cache), "--out", str(tmp_path), "--images", "2", "--methods",
                "gradcam,vanilla_gradient", "--tasks", "colour,shape", "--architectures",
                "plain,vit", "--sanity-models", "3", *TRAINING])
    document = json.loads((tmp_path / "groundtruth.json").read_text())
    checked = {s["model"] for s in document["sanity"]}
    assert checked == {"colour-plain-s0-48px", "shape-vit-s0-48px"}
    text = (tmp_path / "groundtruth.md").read_text()
    section = text.split("## Sanity checks per model")[1]
    header = next(line for line in section.splitlines() if line.startswith("| method |"))
    assert "colour-plain-s0-48px" in header and "shape-vit-s0-48px" in header
    for method in ("gradcam", "vanilla_gradient"):
        line = next(line for line in section.splitlines() if line.startswith(f"| {method} |"))
        assert line.count(" / ") == 2 and line.rstrip(" |").endswith("/2")


LEVEL = 0.4  # a noise level no method has as its default


def test_noise_sweep_compares_each_level_with_the_default_on_the_same_models(
        cache: Path, tmp_path: Path) -> None:
    code = defaults.main(["noise", "--cache", str(cache), "--out", str(tmp_path), "--images",
                          "2", "--tasks", "colour,shape", "--architectures", "plain",
                          "--no-demo", "--levels", f"{LEVEL:g}"])
    assert code == 0
    document = json.loads((tmp_path / "groundtruth_noise.json").read_text())
    summary = document["summary"]
    for method in defaults.NOISE_METHODS:
        default = defaults.handler_defaults(method).noise_level
        assert default != LEVEL, "the swept level must differ from every default"
        reference = summary[f"{method} noise {default:g}"]
        assert reference["reference"] and reference["models"] == 2
        other = summary[f"{method} noise {LEVEL:g}"]
        difference = other["mass"]["mean"] - reference["mass"]["mean"]
        assert other["mass_difference"]["mean"] == pytest.approx(difference)
        assert other["mass_difference"]["low"] <= other["mass_difference"]["high"]
        assert isinstance(other["supported"], bool)
    assert "*default*" in (tmp_path / "groundtruth_noise.md").read_text()


def test_decam_sweep_spends_equal_budgets(cache: Path, tmp_path: Path) -> None:
    defaults.main(["decam", "--cache", str(cache), "--out", str(tmp_path), "--images", "1",
                   "--tasks", "colour", "--architectures", "plain", "--no-demo",
                   "--budgets", "120", "--grids", "4,8", "--populations", "8,32"])
    summary = json.loads((tmp_path / "groundtruth_decam.json").read_text())["summary"]
    assert len(summary) == 4
    assert summary["decam grid 8 population 32 @120"]["reference"]
    for entry in summary.values():
        assert entry["forward_passes"] <= 120


def test_supported_needs_one_gain_and_no_loss() -> None:
    def entry(mass: tuple[float, float], pointing: tuple[float, float]) -> dict:
        return {"mass_difference": {"low": mass[0], "high": mass[1]},
                "pointing_difference": {"low": pointing[0], "high": pointing[1]}}

    assert defaults.supported(entry((0.01, 0.05), (-0.1, 0.1)))
    assert defaults.supported(entry((-0.01, 0.02), (0.05, 0.2)))
    assert not defaults.supported(entry((0.01, 0.05), (-0.2, -0.01)))
    assert not defaults.supported(entry((-0.01, 0.05), (-0.1, 0.1)))
    assert not defaults.supported(entry((0.05, 0.1), (-0.2, 0.0)))  # never better pointing


def test_noise_defaults_are_the_levels_the_committed_sweep_supports() -> None:
    """Each noise method's default is the supported level with the largest mass gain in
    benchmarks/results/groundtruth_noise.json, or the measured default when none is."""
    path = Path(__file__).resolve().parent.parent / "benchmarks/results/groundtruth_noise.json"
    summary = json.loads(path.read_text())["summary"]
    for method in defaults.NOISE_METHODS:
        mine = {label: entry for label, entry in summary.items() if entry["group"] == method}
        measured = next(e for e in mine.values() if e["reference"])["params"]["noise_level"]
        better = [e for e in mine.values() if e.get("supported")]
        best = max(better, key=lambda e: e["mass_difference"]["mean"], default=None)
        expected = best["params"]["noise_level"] if best else measured
        assert defaults.handler_defaults(method).noise_level == expected, method
