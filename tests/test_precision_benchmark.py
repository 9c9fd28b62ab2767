"""benchmarks/precision.py's forward part runs end to end in its quick mode: every forward
method on both engines side by side, the maps compared, the time split between model runs
and the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="the [openvino] extra is not installed")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_forward_part_times_both_engines_and_compares_the_maps(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.precision", "--quick", "--part", "forward",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
        check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    result = json.loads((tmp_path / "precision_forward.json").read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"predict", "rise", "decam", "occlusion", "smoe_scale", "fastcam",
                         "lovi"}
    for row in rows.values():
        assert row["precision"] == {"float32": "float32", "bfloat16": "bfloat16"}
        assert row["float32_ms_per_image"] > 0 and row["bfloat16_ms_per_image"] > 0
        assert 0 < row["bfloat16_run_share"] <= 1
        assert row["precision_check"].startswith("passed")
    assert rows["predict"]["top1_agreement"] == 1.0
    for method in ("rise", "occlusion", "smoe_scale", "fastcam", "lovi"):
        assert rows[method]["pearson_min"] >= 0.99, rows[method]
