"""Writing a model package: its files, the manifest listing each with its sha256 and size,
staged in a temporary folder and copied into ``repository/name/version`` once complete.

Both ``saliency export`` (PyTorch) and ``saliency import`` (any ONNX file) write packages
through here, so what the loader checks (``core.repository``) is written in one place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saliency_service.core.repository import MANIFEST, sha256_file


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: each file's sha256 and size in bytes."""
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
            for name in names}


@contextmanager
def staged_package(repository: Path, target: Path) -> Iterator[Path]:
    """A temporary folder (beside the repository where it exists) to write a package into;
    when the block ends without an error the folder replaces ``target``."""
    parent = Path(repository).parent if Path(repository).exists() else None
    with tempfile.TemporaryDirectory(dir=parent) as staging:
        staging_dir = Path(staging)
        yield staging_dir
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging_dir, target)
        target.chmod(0o755)


def write_manifest(folder: Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Adds the ``files`` entries of the files already in ``folder`` to ``manifest`` and
    writes it as ``manifest.json``; returns the manifest written."""
    complete = {**manifest, "files": file_entries(folder, files)}
    (folder / MANIFEST).write_text(json.dumps(complete, indent=2) + "\n")
    return complete
