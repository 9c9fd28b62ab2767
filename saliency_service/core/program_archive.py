"""Loads a ``torch.export`` archive (``model.pt2``) without running code from it.

``torch.export.load`` unpickles parts of an archive, and where the restricted
(``weights_only``) unpickler fails it retries with the unrestricted one, which runs
whatever the pickle names. So the archive is checked before torch sees it: every
record must be one that ``torch.export.save`` writes for a plain program; payloads
marked ``use_pickle``, custom and opaque objects and compiled artifacts are refused;
and each record torch would unpickle must load with the restricted unpickler alone.
``torch.load`` is also forced to the restricted unpickler process-wide
(``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so no later fallback can run code either.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any

# Records a plain program's archive holds, relative to the archive's folder; ``{m}`` is the
# program's name (``model``). Anything else is refused.
_RECORDS = (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version",
    r"\.data/serialization_id", r"models/{m}\.json", r"data/weights/{m}_weights_config\.json",
    r"data/weights/weight_\d+", r"data/constants/{m}_constants_config\.json",
    r"data/constants/tensor_\d+", r"data/sample_inputs/{m}\.pt",
)
# Records torch passes to its unpickler; they must load restricted.
_UNPICKLED = r"data/sample_inputs/{m}\.pt"
_CONFIGS = (r"data/weights/{m}_weights_config\.json", r"data/constants/{m}_constants_config\.json")
PROGRAM_NAME = "model"


class UnsafeArchive(ValueError):
    """The archive holds something that loading would execute, or that a plain program
    does not hold."""


def force_restricted_unpickling() -> None:
    """Makes every ``torch.load`` in this process use the restricted unpickler."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(template.replace("{m}", re.escape(PROGRAM_NAME)))


def check_archive(data: bytes) -> None:
    """Raises UnsafeArchive unless ``data`` is a plain program archive that loads without
    the unrestricted unpickler."""
    import torch  # noqa: PLC0415 - only packages with a torch program need torch
    from torch.export.pt2_archive._package import PT2ArchiveReader  # noqa: PLC0415

    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a program"
        raise UnsafeArchive(f"not a torch.export archive ({type(exc).__name__})") from exc
    allowed = [_pattern(t) for t in _RECORDS]
    for name in names:
        if not any(p.fullmatch(name) for p in allowed):
            raise UnsafeArchive(f"archive record {name[:200]!r} is not part of a plain "
                                "exported program (custom objects, pickled payloads and "
                                "compiled code are refused)")
    configs = [_pattern(t) for t in _CONFIGS]
    for name in names:
        if any(p.fullmatch(name) for p in configs):
            _check_payload_config(name, json.loads(reader.read_string(name)))
    unpickled = _pattern(_UNPICKLED)
    for name in names:
        if unpickled.fullmatch(name):
            try:
                torch.load(io.BytesIO(reader.read_bytes(name)), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - refused whatever the reason
                raise UnsafeArchive(
                    f"archive record {name!r} holds objects other than tensors and plain "
                    f"containers ({type(exc).__name__}); it would need the unrestricted "
                    "unpickler, which can run code") from exc


def _check_payload_config(name: str, config: dict[str, Any]) -> None:
    for key, payload in dict(config.get("config", {})).items():
        if payload.get("use_pickle"):
            raise UnsafeArchive(f"{name}: payload {key[:200]!r} is pickled")
        if not str(payload.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise UnsafeArchive(f"{name}: payload {key[:200]!r} is not a tensor")


def load_program(data: bytes) -> Any:
    """The ``ExportedProgram`` in ``data``, after ``check_archive``."""
    import torch  # noqa: PLC0415

    force_restricted_unpickling()
    check_archive(data)
    return torch.export.load(io.BytesIO(data))
