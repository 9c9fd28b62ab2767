"""Models other projects ship inside packages a user can install, fetched from the package
registry the set-up already uses (pip), for tests that must not depend on our own training.

``ocr_text_detector``: PaddleOCR's PP-OCRv4 text detector (a DB segmenter converted by
paddle2onnx: one sigmoid channel, "text", at the input's resolution), as RapidOCR ships it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

RAPIDOCR = "rapidocr_onnxruntime==1.4.4"
TEXT_DETECTOR = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
# PaddleOCR's detector normalization (ImageNet statistics of 0…1 pixels).
TEXT_MEAN = (0.485, 0.456, 0.406)
TEXT_STD = (0.229, 0.224, 0.225)


def ocr_text_detector(folder: Path) -> Path:
    """The text detector's ONNX file, extracted into ``folder`` from RapidOCR's wheel (the
    wheel alone, without its dependencies); the test skips when the registry is out of
    reach."""
    target = folder / "ch_PP-OCRv4_det_infer.onnx"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest",
         str(folder), RAPIDOCR], capture_output=True, text=True, timeout=600, check=False)
    wheels = sorted(folder.glob("rapidocr_onnxruntime-*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"pip could not download {RAPIDOCR}: {result.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        target.write_bytes(wheel.read(TEXT_DETECTOR))
    return target


def text_panel(out: Path, methods: tuple[str, ...] = ("occlusion", "rise")) -> Path:
    """A panel of the text detector's maps, one per word and method, drawn by the server's
    own overlays: ``python -m tests.third_party docs/ocr-words.png``."""
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from saliency_service.client import SaliencyClient  # noqa: PLC0415
    from saliency_service.core.repository import MANIFEST, ONNX_FILE, sha256_file  # noqa: PLC0415
    from saliency_service.render.overlays import panel_png  # noqa: PLC0415
    from saliency_service.serving.background import local_server  # noqa: PLC0415
    from tests.test_dense_third_party import HEIGHT, WIDTH, page  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        package = root / "models" / "text" / "1"
        package.mkdir(parents=True)
        shutil.copy(ocr_text_detector(root / "download"), package / ONNX_FILE)
        (package / MANIFEST).write_text(json.dumps({
            "format": 1, "name": "text", "version": 1,
            "input": {"name": "x", "shape": [-1, 3, HEIGHT, WIDTH], "mean": list(TEXT_MEAN),
                      "std": list(TEXT_STD), "value_range": [0.0, 1.0], "layout": "NCHW",
                      "dtype": "float32"},
            "class_labels": ["text"],
            "outputs": {"kind": "segmentation", "logits": "sigmoid_0.tmp_0",
                        "scores": "sigmoid"},
            "files": {ONNX_FILE: {"sha256": sha256_file(package / ONNX_FILE)}}}))
        png, boxes = page()
        overlays = []
        with local_server(root / "models") as running, \
                SaliencyClient(running.address, timeout=900) as client:
            for method in methods:
                for box in boxes:
                    params = {"masks": 400, "cells": 12} if method == "rise" else {}
                    result = client.explain("text", method, images=[png], region_class="text",
                                            box=box, return_overlay=True, seed=0, **params)
                    overlays.extend(result.overlays)
        out.write_bytes(panel_png(overlays, "PP-OCRv4 text detector: one map per word region"))
    return out


if __name__ == "__main__":
    print(text_panel(Path(sys.argv[1] if len(sys.argv) > 1 else "ocr-words.png")))
