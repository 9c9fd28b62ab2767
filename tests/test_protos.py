"""The committed gRPC stubs are exactly what `make protos` produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("explainer_pb2.py", "explainer_pb2_grpc.py", "explainer_pb2.pyi")


def test_committed_stubs_match_a_fresh_protoc_run(tmp_path: Path) -> None:
    # The same command as the Makefile's `protos` target, into a scratch folder.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         "protos/saliency/v1/explainer.proto"],
        cwd=ROOT, check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "saliency" / "v1" / name).read_bytes()
        committed = (ROOT / "saliency" / "v1" / name).read_bytes()
        assert fresh == committed, f"saliency/v1/{name} is stale: run `make protos`"


def test_makefile_target_uses_the_same_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "grpc_tools.protoc -I protos" in makefile
    assert "protos/saliency/v1/explainer.proto" in makefile
