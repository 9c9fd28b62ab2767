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
