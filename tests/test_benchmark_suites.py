"""Benchmark suites run end to end in their quick mode and write what they promise.

The suites are the evidence quoted in the README; a suite that no longer starts (a changed
signature, a moved helper) would otherwise go unnoticed until the next full ``make bench``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import gradient_gflop, time_interleaved
from benchmarks.peers import time_breakdown, with_floor

ROOT = Path(__file__).resolve().parent.parent


def run_suite(name: str, out: Path, *extra: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_latency_suite_times_every_method_and_the_predict_overhead(tmp_path: Path) -> None:
    result = run_suite("latency", tmp_path)
    calls = {row["call"] for row in result["rows"]}
    assert "Predict" in calls and "Explain decam" in calls and "Explain fastcam" in calls
    assert all(row["p50_ms"] > 0 for row in result["rows"])
    overhead = result["predict_overhead"]
    assert overhead["grpc_p50_ms"] > 0 and overhead["onnxruntime_p50_ms"] > 0
    # The bare grpc.aio server answered too: the split of the overhead is measured.
    assert overhead["bare_grpc_p50_ms"] > overhead["onnxruntime_p50_ms"]
    assert overhead["service_added_p50_ms"] == pytest.approx(
        overhead["grpc_p50_ms"] - overhead["bare_grpc_p50_ms"])
    # The same image as uint8 pixels, normalized by each side: a quarter of the bytes.
    pixels = overhead["pixels"]
    assert pixels["input_shape"] == [1, 128, 128, 3]
    assert pixels["request_bytes"] < overhead["request_bytes"] / 3
    assert pixels["bare_grpc_p50_ms"] > pixels["onnxruntime_p50_ms"] > 0
    assert pixels["added_p50_ms"] == pytest.approx(
        pixels["grpc_p50_ms"] - pixels["onnxruntime_p50_ms"])


@pytest.mark.slow
def test_rewrites_suite_times_each_rewrite_against_itself_switched_off(tmp_path: Path) -> None:
    result = run_suite("rewrites", tmp_path)
    rows = {row["what"]: row for row in result["rows"]}
    assert set(rows) == {"integrated_gradients", "smoothgrad", "trunk pass, 15 rows",
                         "integrated_gradients bfloat16"}
    for row in rows.values():
        assert row["rewrite_ms"] > 0 and row["without_ms"] > 0
        assert row["time_saved"] == pytest.approx(1 - row["rewrite_ms"] / row["without_ms"])


@pytest.mark.slow
def test_decam_suite_compares_the_same_search_three_ways(tmp_path: Path) -> None:
    result = run_suite("decam", tmp_path)
    assert [c["model"] for c in result["comparisons"]] == ["demo", "small", "linear"]
    for comparison in result["comparisons"]:
        passes = {row["way"]: row["forward_passes"] for row in comparison["rows"]}
        assert passes["batched (lock-step)"] == passes["one candidate per call"]
        assert comparison["fitness_gap"] < 1e-5  # the same DE trajectory, evaluated two ways
        assert comparison["batched_over_floor"] > 0
    assert {t["input"] for t in result["time_to_map"]} == {"128×128", "224×224"}


@pytest.mark.parametrize(("suite", "models"), [
    ("multiscale", ["--models", "demo,resnet5O"]),
    ("gradients", ["--models", "demo,resnet5O"]),
    ("peers", ["--models", "demo,resnet5O"]),
])
def test_suites_refuse_an_unknown_model_name_before_measuring(suite: str,
                                                             models: list[str]) -> None:
    """A mistyped name used to be measured as another architecture under the given label."""
    completed = subprocess.run([sys.executable, "-m", f"benchmarks.{suite}", *models],
                               cwd=ROOT, capture_output=True, text=True, timeout=120,
                               check=False)
    assert completed.returncode == 2
    assert "resnet5O" in completed.stderr and "resnet50" in completed.stderr
    assert "done" not in completed.stderr  # nothing was measured


def test_interleaved_timing_gives_cheap_calls_more_rounds_up_to_the_cap() -> None:
    """Rounds repeat until ``min_seconds`` passed, at least ``repeats``, at most the cap."""
    calls = {"a": lambda: time.sleep(0.001), "b": lambda: None}
    cheap = time_interleaved(calls, repeats=3, warmup=0, min_seconds=0.05, max_repeats=200)
    assert len(cheap["a"]) == len(cheap["b"])
    assert 3 < len(cheap["a"]) < 200  # stopped by the time, not by either bound
    assert sum(cheap["a"]) >= 0.04
    capped = time_interleaved(calls, repeats=3, warmup=0, min_seconds=10.0, max_repeats=8)
    assert len(capped["a"]) == 8
    costly = {"a": lambda: time.sleep(0.03)}
    assert len(time_interleaved(costly, repeats=3, warmup=0, min_seconds=0.05,
                                max_repeats=200)["a"]) == 3
    assert len(time_interleaved(calls, repeats=4, warmup=0)["b"]) == 4


@pytest.mark.slow
def test_quadrature_suite_scores_every_rule_against_the_reference(tmp_path: Path) -> None:
    result = run_suite("quadrature", tmp_path)
    rules = {row["rule"] for row in result["rows"]}
    assert {"gauss_legendre", "midpoint", "graded t^2"} <= rules
    by_rule = {rule: [r for r in result["rows"] if r["rule"] == rule] for rule in rules}
    for rows in by_rule.values():
        assert all(0 <= r["completeness_error"] < 1 and 0 < r["per_pixel_error"] < 1
                   for r in rows)
    gauss = by_rule["gauss_legendre"]
    # More steps approach the 256-step reference pixel by pixel.
    assert gauss[-1]["per_pixel_error"] < gauss[0]["per_pixel_error"]


def test_interleaved_timing_varies_which_call_comes_before_which() -> None:
    """Every call follows every other, so none always carries one neighbour's traces."""
    seen: list[str] = []
    calls = {name: (lambda name=name: seen.append(name)) for name in "abc"}
    times = time_interleaved(calls, repeats=30, warmup=0)
    assert all(len(values) == 30 for values in times.values())
    rounds = [seen[i:i + 3] for i in range(0, len(seen), 3)]
    assert all(sorted(r) == list("abc") for r in rounds)  # each call once per round
    pairs = {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert pairs == {(x, y) for x in "abc" for y in "abc" if x != y}
    again: list[str] = []
    time_interleaved({name: (lambda name=name: again.append(name)) for name in "abc"},
                     repeats=30, warmup=0)
    assert again == seen  # the order is seeded: a rerun times the calls in the same order


def test_gradient_gflop_counts_each_convolution_twice(repository: Path) -> None:
    """Forward plus input-gradient backward of TinyCNN at 32²: every layer's multiply-adds
    once forward and once backward (no weight gradients), two FLOPs each."""
    macs = 32 * 32 * 8 * 3 * 9 + 16 * 16 * 16 * 8 * 9 + 8 * 8 * 32 * 16 * 9 + 32 * 4
    assert gradient_gflop(repository / "tiny" / "1") == pytest.approx(2 * 2 * macs / 1e9)


def test_compute_floor_bounds_both_servers() -> None:
    floor = {"floor_explanations_per_s": 2.0, "steps": 15}
    entry = {"ours_equal_steps": {"explanations_per_s": 1.5},
             "torchserve": {"explanations_per_s": 0.5}}
    got = with_floor(entry, floor)["compute_floor"]
    assert got["ours_fraction"] == pytest.approx(0.75)
    assert got["torchserve_fraction"] == pytest.approx(0.25)
    assert got["ceiling_equal_steps"] == pytest.approx(4.0)
    skipped = with_floor({"ours_equal_steps": {"explanations_per_s": 1.0},
                          "torchserve": {"skipped": "not installed"}}, floor)["compute_floor"]
    assert "ceiling_equal_steps" not in skipped and skipped["ours_fraction"] == 0.5
    half = with_floor({**entry, "ours_bfloat16": {"explanations_per_s": 2.0}},
                      {**floor, "bfloat16_floor_explanations_per_s": 8.0})["compute_floor"]
    assert half["bfloat16_fraction"] == pytest.approx(0.25)
    assert half["bfloat16_ceiling_equal_steps"] == pytest.approx(16.0)


def test_interleaved_timing_times_cheap_calls_right_after_themselves() -> None:
    """A call under ``steady_below`` runs once untimed before each timed run, in the same
    round; a costlier one runs once a round."""
    seen: list[str] = []
    calls = {"cheap": lambda: seen.append("cheap"),
             "costly": lambda: (seen.append("costly"), time.sleep(0.02))}
    times = time_interleaved(calls, repeats=5, warmup=1, steady_below=0.01)
    assert len(times["cheap"]) == len(times["costly"]) == 5
    rounds = seen[2:]  # after one warm-up call of each
    assert rounds.count("cheap") == 10 and rounds.count("costly") == 5
    for index, name in enumerate(rounds):
        if name == "cheap" and (index == 0 or rounds[index - 1] != "cheap"):
            assert rounds[index + 1] == "cheap"  # the untimed run, then the timed one


def test_time_breakdown_counts_every_pass_of_one_explanation(repository: Path) -> None:
    """The split of one Integrated Gradients explanation on TinyCNN at 32²: the FLOPs are
    those of its passes, backward ones included (they run under ``torch.autograd.grad``),
    and the parts add up to the wall time."""
    from saliency_service.core.repository import Repository  # noqa: PLC0415
    from saliency_service.core.request import CostCounter, RequestState  # noqa: PLC0415
    from saliency_service.proto import explainer_pb2 as pb  # noqa: PLC0415
    from saliency_service.protocol.codec import Core  # noqa: PLC0415
    from saliency_service.protocol.images import array_to_tensor  # noqa: PLC0415
    from saliency_service.serving.config import Config  # noqa: PLC0415
    from saliency_service.serving.metrics import Metrics  # noqa: PLC0415

    models = Repository(repository)
    models.load_all()
    core = Core(models, Config(models=repository, max_batch=8), Metrics())
    image = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    steps = 5
    request = pb.ExplainRequest(
        model="tiny", method=pb.METHOD_INTEGRATED_GRADIENTS,
        input=pb.Input(tensor=array_to_tensor(image)),
        integrated_gradients=pb.IntegratedGradientsParams(steps=steps,
                                                          baseline=pb.BASELINE_ZERO))
    request.target.class_index = 0
    # Once first, as the server's warm-up does: the graph's translation and its check against
    # ONNX Runtime happen on a model's first gradient request, not on every one.
    core.explain(request, RequestState(None), CostCounter())
    result = time_breakdown(lambda: core.explain(request, RequestState(None), CostCounter()))
    stem = 32 * 32 * 8 * 3 * 9  # multiply-adds of the first convolution
    trunk = 16 * 16 * 16 * 8 * 9 + 8 * 8 * 32 * 16 * 9 + 32 * 4
    weighted_sum = steps * 8 * 32 * 32  # of the steps' gradients at the stem's output
    # The linear stem runs forward twice (baseline and direction) and backward once; every
    # step runs the rest forward and backward; two FLOPs a multiply-add.
    assert result["gflop"] == pytest.approx(
        2 * (3 * stem + 2 * steps * trunk + weighted_sum) / 1e9)
    assert result["compute_ms"] > 0 and result["other_ops_ms"] > 0
    parts = result["compute_ms"] + result["other_ops_ms"] + result["rest_ms"]
    assert parts == pytest.approx(result["total_ms"])
    assert result["threads"] >= 1 and result["dense_gflops"] > 0


@pytest.mark.parametrize(("min_pearson", "runs_bfloat16"), [(0.0, True), (1.01, False)])
def test_peers_lowered_check_decides_bfloat16_and_maps_are_compared(
        repository: Path, tmp_path: Path, min_pearson: float, runs_bfloat16: bool) -> None:
    """The copy's manifest decides the bfloat16 check (the cached package is left as it
    was); a bfloat16 IG answer is compared with the float32 one of the same image."""
    from benchmarks.common import in_process_core  # noqa: PLC0415
    from benchmarks.peers import _map_agreement, lowered_repository  # noqa: PLC0415
    from saliency_service.core import devices  # noqa: PLC0415
    from saliency_service.core.request import CostCounter, RequestState  # noqa: PLC0415
    from saliency_service.proto import explainer_pb2 as pb  # noqa: PLC0415
    from saliency_service.protocol.images import array_to_tensor  # noqa: PLC0415

    original = (repository / "tiny" / "1" / "manifest.json").read_text()
    copy = lowered_repository(repository, "tiny", min_pearson, tmp_path / "copy")
    assert (repository / "tiny" / "1" / "manifest.json").read_text() == original
    manifest = json.loads((copy / "tiny" / "1" / "manifest.json").read_text())
    assert manifest["verification"]["bfloat16_min_pearson"] == min_pearson
    image = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    devices.configure(precision="bfloat16")
    try:
        core = in_process_core(copy)
        replies = {}
        for precision in ("float32", "bfloat16"):
            request = pb.ExplainRequest(
                model="tiny", method=pb.METHOD_INTEGRATED_GRADIENTS,
                input=pb.Input(tensor=array_to_tensor(image)), return_raw=True,
                precision="" if precision == "bfloat16" else precision,
                integrated_gradients=pb.IntegratedGradientsParams(steps=4))
            request.target.class_index = 0
            replies[precision] = core.explain(request, RequestState(None), CostCounter())
    finally:
        devices.configure()
    assert replies["float32"].cost.precision == "float32"
    assert replies["bfloat16"].cost.precision == ("bfloat16" if runs_bfloat16 else "float32")
    agreement = _map_agreement([replies["float32"]], [replies["bfloat16"]])
    assert agreement["maps_compared"] == 1
    assert 0.9 < agreement["map_pearson_min"] <= agreement["map_pearson_mean"] <= 1.0 + 1e-9
    assert 0.0 < agreement["map_top10_overlap"] <= 1.0
    if not runs_bfloat16:  # float32 twice: the same maps
        assert agreement["map_pearson_min"] == pytest.approx(1.0)
