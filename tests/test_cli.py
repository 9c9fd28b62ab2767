"""`saliency explain` against a real server writes a PNG overlay and prints prediction and cost."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main


def test_explain_writes_an_overlay_png(server, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "input.png"
    pixels = np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    out = tmp_path / "map.png"
    code = main(["explain", "--server", server.address, "--model", "tiny", "--image", str(image),
                 "--method", "vanilla_gradient", "--out", str(out)])
    assert code == 0
    picture = Image.open(io.BytesIO(out.read_bytes()))
    assert picture.format == "PNG"
    assert picture.size[0] == 256 and picture.size[1] > 256  # the map enlarged, bar, caption
    printed = capsys.readouterr().out
    assert "prediction:" in printed
    assert "forward 2 backward 1" in printed


def test_explain_reports_errors_as_status_and_message(
        server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "input.png"
    Image.new("RGB", (8, 8)).save(image)
    out = tmp_path / "x.png"
    assert main(["explain", "--server", "127.0.0.1:1", "--image", str(image), "--timeout", "2",
                 "--out", str(out)]) == 1
    assert "error: UNAVAILABLE" in capsys.readouterr().err
    assert main(["explain", "--server", server.address, "--model", "nope", "--image", str(image),
                 "--out", str(out)]) == 1
    assert "error: NOT_FOUND: model 'nope' not found" in capsys.readouterr().err
    assert not out.exists()
