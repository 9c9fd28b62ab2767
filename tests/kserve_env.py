"""KServe's Python SDK in its own virtual environment: it pins protobuf and grpcio-tools
below this project's, so it cannot share ``.venv``. Made once in ``.venv-kserve`` (kept
between runs); the tests run the SDK there, against servers started here."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-kserve"
KSERVE = "kserve==0.21.0"
# onnxruntime serves ONNX files in KServe's ModelServer (tests/kserve_onnx_server.py).
PACKAGES = (KSERVE, "numpy", "httpx", "onnxruntime")


def kserve_python() -> Path:
    """The environment's interpreter, with KServe installed (skips when it cannot be)."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if not marker.is_file() or marker.read_text().split() != list(PACKAGES):
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *PACKAGES], capture_output=True, text=True, timeout=1200)
        if installed.returncode != 0:
            pytest.skip(f"{KSERVE} could not be installed: {installed.stderr[-500:]}")
        marker.write_text("\n".join(PACKAGES) + "\n")
    return python


def run_in_kserve(script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` (dedented) with KServe's interpreter; the result's stdout/stderr."""
    return subprocess.run([str(kserve_python()), "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=timeout)
