"""Package size with one model file: what ``saliency export`` writes today (``model.onnx`` +
``manifest.json``) against what it wrote when every package also carried a ``torch.export``
program (``model.pt2``, the same module saved by ``torch.export.save``), for the tests'
architecture matrix and the ResNet-50 shape at 224².

Sizes only, so the figures do not depend on the machine's load::

    python -m benchmarks.package_size [--only resnet,vgg] [--no-resnet50]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import base_parser, random_model, table, write_json
from saliency_service.packaging.export import export_package
from tests.architecture_matrix import MATRIX, build

MB = 1e6


def program_bytes(model: torch.nn.Module, input_shape: tuple[int, ...], folder: Path) -> int:
    """The size of ``model`` saved as a ``torch.export`` program with a free batch."""
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = folder / "model.pt2"
    torch.export.save(program, str(path))
    return path.stat().st_size


def measure(name: str, model: torch.nn.Module, input_shape: tuple[int, ...], head: str | None,
            folder: Path) -> dict[str, Any]:
    """One row: the ONNX-only package and the program archive the old layout added."""
    channels = input_shape[0]
    started = time.perf_counter()
    report = export_package(model, name=name, version=1, input_shape=input_shape,
                            mean=[0.5] * channels, std=[0.25] * channels, class_labels=(),
                            repository=folder / "models", head=head)
    seconds = time.perf_counter() - started
    package = sum(f.stat().st_size for f in report.path.iterdir() if f.is_file())
    program = program_bytes(model, input_shape, folder)
    return {"model": name, "input": "×".join(map(str, input_shape)),
            "export_s": round(seconds, 2), "package_mb": round(package / MB, 2),
            "old_package_mb": round((package + program) / MB, 2),
            "model_pt2_mb": round(program / MB, 2),
            "smaller_by": round((package + program) / package, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--only", default="", help="comma-separated architecture names")
    parser.add_argument("--no-resnet50", action="store_true")
    args = parser.parse_args(argv)
    wanted = {name for name in args.only.split(",") if name}
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        for architecture in MATRIX:
            if wanted and architecture.name not in wanted:
                continue
            print(f"{architecture.name} ...", file=sys.stderr, flush=True)
            rows.append(measure(architecture.name, build(architecture),
                                architecture.input_shape, architecture.head,
                                Path(temporary) / architecture.name))
        if not args.no_resnet50:
            print("resnet50 ...", file=sys.stderr, flush=True)
            rows.append(measure("resnet50", random_model("resnet50"), (3, 224, 224), "fc",
                                Path(temporary) / "resnet50"))
    print(table(rows))
    path = write_json("package_size", {"rows": rows}, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
