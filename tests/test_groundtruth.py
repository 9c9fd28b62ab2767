"""The ground-truth benchmark's pipeline at CI size: 2 tasks × 2 architectures, few images.

Only that it runs end to end and produces finite numbers, that the scores mean what they
say (a uniform map scores the uniform baseline, the ground-truth mask scores 1), that models
are cached, and that a model below the accuracy bar is reported and left out of the ranking:
not which method wins (that is the full run's business).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import groundtruth as bench
from saliency_service.evaluation import groundtruth, metrics, tasks

PLAN = groundtruth.Plan(
    tasks=("colour", "shape"), architectures=("plain", "vit"), images=3, train_images=256,
    epochs=2, min_accuracy=0.0, methods=("vanilla_gradient", "gradcam", "occlusion"),
    variants=(("decam @120", "decam", (("max_forward_passes", 120), ("population", 8))),),
    sanity_models=1, sanity_images=2, progress=False)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_every_task_is_repeatable_and_its_mask_is_one_small_object(task: str) -> None:
    first = tasks.generate(task, 6)
    again = tasks.generate(task, 3, start=3)
    np.testing.assert_array_equal(first.images[3:], again.images)
    np.testing.assert_array_equal(first.masks[3:], again.masks)
    area = first.masks.mean(axis=(1, 2))
    assert ((area > 0.01) & (area < 0.15)).all()
    assert set(first.labels) <= set(range(len(tasks.TASKS[task])))
    assert first.images.dtype == np.uint8 and first.images.shape[1:] == (48, 48, 3)


def test_the_deciding_object_differs_from_its_surroundings() -> None:
    batch = tasks.generate("colour", 4, tasks.TaskConfig(clutter_levels=(0.0,),
                                                         noise_levels=(0.0,)))
    for image, mask, label in zip(batch.images, batch.masks, batch.labels, strict=True):
        colour = image[mask].mean(axis=0) / 255.0
        np.testing.assert_allclose(colour, tasks.PALETTE[label], atol=0.01)
        outside = image[~mask].astype(int)
        assert (outside.max(axis=1) - outside.min(axis=1)).max() <= 1  # grey background


def test_bootstrap_interval_holds_the_mean_and_collapses_for_one_model() -> None:
    low, high = groundtruth.bootstrap_interval([0.1, 0.2, 0.3, 0.9])
    assert low < 0.375 < high
    assert groundtruth.bootstrap_interval([0.4]) == (0.4, 0.4)
    assert all(math.isnan(v) for v in groundtruth.bootstrap_interval([]))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[groundtruth.Results, Path]:
    cache = tmp_path_factory.mktemp("groundtruth_cache")
    plan = groundtruth.with_overrides(PLAN, cache=cache)
    return groundtruth.run(plan), cache


def test_small_run_scores_every_model_and_method_with_finite_numbers(small_run) -> None:
    results, _ = small_run
    assert len(results.models) == 4
    labels = {r["method"] for r in results.rows}
    assert labels == {"vanilla_gradient", "gradcam", "occlusion", "decam @120"}
    assert len(results.rows) == 4 * 4
    for row in results.rows:
        for name in ("mass", "pointing", "uniform", "deletion", "insertion"):
            assert math.isfinite(row[name]), (row["model"], row["method"], name)
            assert 0.0 <= row[name] <= 1.0
        assert row["forward_passes"] >= 1
    decam = [r for r in results.rows if r["method"] == "decam @120"]
    assert all(r["forward_passes"] <= 120 for r in decam)
    summary = results.to_json()["summary"]
    entry = summary["per_method"]["occlusion"]["mass"]
    assert entry["models"] == 4 and entry["low"] <= entry["mean"] <= entry["high"]
    assert set(summary["per_task"]) == {"colour", "shape"}
    assert results.sanity and all(math.isfinite(s["randomization_rho"])
                                  for s in results.sanity)


def test_uniform_map_scores_the_uniform_baseline_and_the_mask_scores_one(small_run) -> None:
    _, cache = small_run
    model = groundtruth.task_model(groundtruth.with_overrides(PLAN, cache=cache), "colour",
                                   "plain", 0)
    classifier = metrics.OnnxClassifier.from_package(model.package)
    assert model.masks is not None
    flat = groundtruth.score(np.ones(model.masks.shape, np.float32), model, classifier)
    assert flat["mass"] == pytest.approx(flat["uniform"])
    assert flat["pointing"] == pytest.approx(flat["uniform"], abs=0.02)
    truth = groundtruth.score(model.masks.astype(np.float32), model, classifier)
    assert truth["mass"] == pytest.approx(1.0)
    assert truth["pointing"] == pytest.approx(1.0)


def test_trained_models_are_cached_by_task_architecture_and_seed(small_run) -> None:
    _, cache = small_run
    folders = sorted(p.name for p in cache.iterdir())
    assert folders == ["colour-plain-s0-48px", "colour-vit-s0-48px", "shape-plain-s0-48px",
                       "shape-vit-s0-48px"]
    weights = cache / "colour-plain-s0-48px" / "weights.pt"
    stamp = weights.stat().st_mtime_ns
    groundtruth.task_model(groundtruth.with_overrides(PLAN, cache=cache), "colour", "plain", 0)
    assert weights.stat().st_mtime_ns == stamp  # loaded, not trained again


def test_a_model_below_the_accuracy_bar_is_reported_and_left_out(small_run) -> None:
    results, _ = small_run
    for model in results.models:
        model["included"] = False
    results.models[0]["included"] = True
    kept = results.models[0]["model"]
    for row in results.rows:
        row["included"] = row["model"] == kept
    summary = groundtruth.summarize(results)
    assert all(entry["models"] == 1 for entry in summary["per_method"].values())
    assert len(summary["excluded_models"]) == 3
    markdown = groundtruth.markdown({**results.to_json(), "summary": summary}, "test")
    assert "| no |" in markdown


def test_benchmark_command_writes_json_and_markdown(small_run, tmp_path: Path) -> None:
    _, cache = small_run
    code = bench.main(["--cache", str(cache), "--out", str(tmp_path), "--images", "2",
                       "--methods", "gradcam", "--seeds", "0", "--tasks", "colour",
                       "--architectures", "plain", "--train-images", "256", "--epochs", "2",
                       "--min-accuracy", "0", "--sanity-models", "0"])
    assert code == 0
    document = json.loads((tmp_path / "groundtruth.json").read_text())
    assert {r["method"] for r in document["rows"]} == {"gradcam"}
    assert "gradcam" in (tmp_path / "groundtruth.md").read_text()
