"""The client commands against a real server on loopback: `saliency explain` (one overlay, a
panel of several methods, --param, --json), `models`, `health`; one-line errors listing the
valid choices, and the documented exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliency_service.cli import main
from saliency_service.client.commands import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from saliency_service.render.drawing import MIN_WIDTH
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config
from tests.onnx_models import small_cnn, write_package

UNREACHABLE = ["--server", "127.0.0.1:1", "--timeout", "3", "--max-attempts", "1"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "input.png"
    pixels = np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def explain(server, image: Path, out: Path, *extra: str) -> list[str]:
    return ["explain", "--server", server.address, "--model", "tiny", "--image", str(image),
            "--out", str(out), *extra]


def one_line_error(err: str) -> str:
    """The error a command printed: exactly one line, no traceback, no object reprs."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert " at 0x" not in err and "BytesIO" not in err
    return lines[0]


def test_explain_writes_an_overlay_png(server, image: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "map.png"
    code, printed, _ = run(capsys, *explain(server, image, out, "--method", "vanilla_gradient"))
    assert code == EXIT_OK
    picture = Image.open(io.BytesIO(out.read_bytes()))
    assert picture.format == "PNG"
    assert picture.size[0] == MIN_WIDTH and picture.size[1] > MIN_WIDTH  # map, bar, caption
    assert "prediction:" in printed
    assert "forward 2 backward 1" in printed


def test_several_methods_make_one_side_by_side_panel(
        server, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid.png"
    code, printed, _ = run(capsys, *explain(server, image, out, "--method",
                                            "gradcam,fastcam,integrated_gradients"))
    assert code == EXIT_OK
    panel = Image.open(out)
    assert panel.size[0] >= 3 * MIN_WIDTH and panel.size[1] > MIN_WIDTH
    for name in ("gradcam", "fastcam", "integrated_gradients"):
        assert f"cost: method {name} " in printed
    assert f"panel of 3: {out}" in printed


def test_params_are_passed_and_json_is_printed(
        server, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ig.png"
    code, printed, _ = run(capsys, *explain(server, image, out, "--method",
                                            "integrated_gradients", "--param", "steps=8",
                                            "--param", "baseline=blur", "--json"))
    assert code == EXIT_OK
    answer = json.loads(printed)
    assert answer["out"] == str(out)
    (only,) = answer["explanations"]
    # 8 steps, f(baseline) and the prediction's own forward.
    assert only["cost"]["forward_passes"] == 10 and only["cost"]["backward_passes"] == 8
    assert only["cost"]["truncated"] is False and only["version"] == 1  # plain, zeros kept
    assert only["model"] == "tiny" and 0.0 <= only["map_mean"] <= 1.0
    assert "overlays" not in only and "data" not in only["saliency"]


def test_ordinary_mistakes_are_one_line_listing_the_choices(
        server, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.png"
    code, _, err = run(capsys, *explain(server, image, out, "--method", "shap"))
    assert code == EXIT_USAGE
    assert "unknown method 'shap'; valid methods: auto, vanilla_gradient" in one_line_error(err)

    code, _, err = run(capsys, *explain(server, tmp_path / "missing.png", out))
    assert code == EXIT_USAGE
    assert "missing.png' not found" in one_line_error(err)

    code, _, err = run(capsys, *explain(server, image, out, "--method", "integrated_gradients",
                                        "--param", "stepz=8"))
    assert code == EXIT_USAGE
    assert ("no parameter 'stepz' for integrated_gradients: integrated_gradients takes "
            "baseline (default black), rule (default gauss_legendre), steps (default 32)"
            in one_line_error(err))

    code, _, err = run(capsys, *explain(server, image, out, "--method", "integrated_gradients",
                                        "--param", "baseline=sky"))
    assert code == EXIT_USAGE
    assert "valid values: black, blur, uniform_noise, mean, zero" in one_line_error(err)

    code, _, err = run(capsys, *explain(server, image, out, "--param", "steps"))
    assert code == EXIT_USAGE
    assert "must look like name=value" in one_line_error(err)
    assert not out.exists()


def test_the_servers_refusals_are_one_line_with_their_status(
        server, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.png"
    code, _, err = run(capsys, *explain(server, image, out, "--method", "integrated_gradients",
                                        "--param", "steps=100000"))
    assert code == EXIT_REFUSED
    assert "INVALID_ARGUMENT: integrated_gradients.steps=100000 exceeds" in one_line_error(err)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    code, _, err = run(capsys, *explain(server, text, out))
    assert code == EXIT_REFUSED
    assert "INVALID_ARGUMENT: image 0 is neither PNG nor JPEG" in one_line_error(err)

    cut = tmp_path / "cut.png"
    cut.write_bytes(image.read_bytes()[:120])
    code, _, err = run(capsys, *explain(server, cut, out))
    assert code == EXIT_REFUSED
    assert "INVALID_ARGUMENT: image 0 " in one_line_error(err)

    code, _, err = run(capsys, "explain", "--server", server.address, "--model", "nope",
                       "--image", str(image), "--out", str(out))
    assert code == EXIT_REFUSED
    assert "NOT_FOUND: model 'nope' not found" in one_line_error(err)

    code, _, err = run(capsys, "explain", *UNREACHABLE, "--image", str(image), "--out", str(out))
    assert code == EXIT_UNREACHABLE
    assert one_line_error(err).startswith("error: UNAVAILABLE: ")
    assert not out.exists()


def test_models_lists_readiness_and_load_errors(server,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, printed, _ = run(capsys, "models", "--server", server.address)
    assert code == EXIT_REFUSED  # the broken package did not load
    lines = printed.splitlines()
    assert "tiny 1: ready" in lines
    assert any(line.startswith("broken 1: NOT READY: ") and len(line) > 30 for line in lines)

    code, printed, _ = run(capsys, "models", "--server", server.address, "--json")
    models = {m["name"]: m for m in json.loads(printed)["models"]}
    assert models["tiny"]["ready"] is True and models["broken"]["ready"] is False
    assert models["broken"]["error"]


def test_models_describes_one_model_with_its_methods_defaults(
        server, capsys: pytest.CaptureFixture[str]) -> None:
    code, printed, _ = run(capsys, "models", "tiny", "--server", server.address)
    assert code == EXIT_OK
    assert "classes: alpha, beta, gamma, delta" in printed
    assert "  integrated_gradients (torch): baseline=black, rule=gauss_legendre, steps=32" in (
        printed.splitlines())

    code, _, err = run(capsys, "models", "nope", "--server", server.address)
    assert code == EXIT_REFUSED
    assert "NOT_FOUND" in one_line_error(err)


def test_health_says_live_and_ready(server, capsys: pytest.CaptureFixture[str]) -> None:
    code, printed, _ = run(capsys, "health", "--server", server.address)
    assert (code, printed.strip()) == (EXIT_OK, "live: SERVING, ready: SERVING")
    code, printed, _ = run(capsys, "health", "--server", server.address, "--json")
    assert json.loads(printed) == {"live": "SERVING", "ready": "SERVING"}
    code, _, err = run(capsys, "health", *UNREACHABLE)
    assert code == EXIT_UNREACHABLE
    assert one_line_error(err).startswith("error: UNAVAILABLE: ")


def test_a_servers_strings_reach_the_terminal_without_control_characters(
        tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A package's labels with an ANSI escape and a bell: `models` and `explain` print them
    as escapes, so a package cannot clear or recolour the terminal of whoever lists it."""
    labels = ("clear\x1b[2J", "bell\x07", "red\x1b[31m")
    write_package(small_cnn(classes=3, size=24), tmp_path / "models", "odd", labels=labels)
    running = RunningServer(make_config(tmp_path / "models")).start()
    try:
        printed = [run(capsys, "models", "odd", "--server", running.address)[1],
                   run(capsys, *["explain", "--server", running.address, "--model", "odd",
                                 "--image", str(image), "--out", str(tmp_path / "o.png")])[1]]
    finally:
        running.stop()
    for text in printed:
        assert not any(not c.isprintable() and c not in "\n\t" for c in text), repr(text)
    assert "clear\\x1b[2J, bell\\x07, red\\x1b[31m" in printed[0]
    assert "prediction: " in printed[1] and "\\x1b" in printed[1]
