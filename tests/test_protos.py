"""The committed gRPC stubs are exactly what `make protos` produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "saliency_service/proto/explainer.proto"
GENERATED = ("explainer_pb2.py", "explainer_pb2_grpc.py", "explainer_pb2.pyi")


def test_committed_stubs_match_a_fresh_protoc_run(tmp_path: Path) -> None:
    # The same command as the Makefile's `protos` target, into a scratch folder.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         PROTO],
        cwd=ROOT, check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "saliency_service" / "proto" / name).read_bytes()
        committed = (ROOT / "saliency_service" / "proto" / name).read_bytes()
        assert fresh == committed, f"saliency_service/proto/{name} is stale: run `make protos`"


def test_makefile_target_uses_the_same_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "grpc_tools.protoc -I ." in makefile
    assert PROTO in makefile
