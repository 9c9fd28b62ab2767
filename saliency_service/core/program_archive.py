"""Loads a ``torch.export`` archive (``model.pt2``) without running code from it.

``torch.export.load`` unpickles parts of an archive, and where the restricted
(``weights_only``) unpickler fails it retries with the unrestricted one, which runs
whatever the pickle names. So the archive is checked before torch sees it: every
record must be one that ``torch.export.save`` writes for a plain program; payloads
marked ``use_pickle``, custom and opaque objects and compiled artifacts are refused;
and each record torch would unpickle must load with the restricted unpickler alone.
``torch.load`` is also forced to the restricted unpickler process-wide
(``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so no later fallback can run code either.

The JSON torch turns into code (``guards_code``, sympified expressions, names compiled
into FX source, pytree enums, call targets) is held to an allow-list first
(``saliency_service.core.program_schema``), and every zip (the archive and the sample
inputs inside it) is bounded from its directory before anything inflates.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Callable
from typing import Any

from saliency_service.core.program_schema import (
    UnsafeProgram,
    check_payload_config,
    check_program,
)

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
_CONFIGS = {r"data/weights/{m}_weights_config\.json": "data/weights/",
            r"data/constants/{m}_constants_config\.json": "data/constants/"}
_PROGRAM = r"models/{m}\.json"
PROGRAM_NAME = "model"
# A zip record may inflate to at most MAX_RATIO times its compressed size once it is over
# RATIO_FREE_BYTES; all records together to MAX_RATIO times the zip and MAX_INFLATED_BYTES.
MAX_RATIO = 200
RATIO_FREE_BYTES = 4 << 20
MAX_INFLATED_BYTES = 16 << 30


class UnsafeArchive(ValueError):
    """The archive holds something that loading would execute, or that a plain program
    does not hold."""


def force_restricted_unpickling() -> None:
    """Makes every ``torch.load`` in this process use the restricted unpickler."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(template.replace("{m}", re.escape(PROGRAM_NAME)))


def check_zip_bounds(data: bytes, what: str) -> dict[str, int]:
    """Each record's inflated size from the zip's directory, once no record and not the
    whole inflates past the bounds above; raises UnsafeArchive otherwise. Nothing is
    inflated here."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UnsafeArchive(f"{what} is not a zip archive ({exc})") from exc
    sizes: dict[str, int] = {}
    for record in records:
        inflated, stored = record.file_size, record.compress_size
        if inflated > RATIO_FREE_BYTES and inflated > MAX_RATIO * max(stored, 1):
            raise UnsafeArchive(
                f"{what}: record {record.filename[:200]!r} inflates {stored} bytes to "
                f"{inflated} (over {MAX_RATIO}:1); refused as a zip bomb")
        sizes[record.filename] = inflated
    total = sum(sizes.values())
    if total > min(MAX_RATIO * len(data), MAX_INFLATED_BYTES):
        raise UnsafeArchive(f"{what}: {len(data)} bytes inflate to {total} (over "
                            f"{MAX_RATIO}:1 or {MAX_INFLATED_BYTES} bytes); refused as a "
                            "zip bomb")
    return sizes


def check_archive(data: bytes) -> None:
    """Raises UnsafeArchive unless ``data`` is a plain program archive that loads without
    the unrestricted unpickler and whose JSON torch would run nothing from."""
    import torch  # noqa: PLC0415 - only packages with a torch program need torch
    from torch.export.pt2_archive._package import PT2ArchiveReader  # noqa: PLC0415

    inflated = check_zip_bounds(data, "model.pt2")
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
        sizes = {name: reader.archive_file.get_record_size(name) for name in names}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a program"
        raise UnsafeArchive(f"not a torch.export archive ({type(exc).__name__})") from exc
    if sorted(sizes.values()) != sorted(inflated.values()):
        raise UnsafeArchive("the archive's zip directory does not match its records")
    allowed = [_pattern(t) for t in _RECORDS]
    for name in names:
        if not any(p.fullmatch(name) for p in allowed):
            raise UnsafeArchive(f"archive record {name[:200]!r} is not part of a plain "
                                "exported program (custom objects, pickled payloads and "
                                "compiled code are refused)")
    for template, folder in _CONFIGS.items():
        config = _pattern(template)
        for name in names:
            if config.fullmatch(name):
                _check_json(name, lambda document, folder=folder: check_payload_config(
                    document, lambda path: sizes.get(folder + path)), reader)
    program = _pattern(_PROGRAM)
    for name in names:
        if program.fullmatch(name):
            _check_json(name, check_program, reader)
    unpickled = _pattern(_UNPICKLED)
    for name in names:
        if unpickled.fullmatch(name):
            payload = reader.read_bytes(name)
            check_zip_bounds(payload, f"model.pt2 record {name!r}")
            try:
                torch.load(io.BytesIO(payload), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - refused whatever the reason
                raise UnsafeArchive(
                    f"archive record {name!r} holds objects other than tensors and plain "
                    f"containers ({type(exc).__name__}); it would need the unrestricted "
                    "unpickler, which can run code") from exc


def _check_json(name: str, check: Callable[[Any], None], reader: Any) -> None:
    try:
        document = json.loads(reader.read_string(name))
    except (ValueError, RecursionError) as exc:
        raise UnsafeArchive(f"{name}: not valid JSON ({type(exc).__name__})") from exc
    try:
        check(document)
    except UnsafeProgram as exc:
        raise UnsafeArchive(f"{name}: {exc}") from exc


def load_program(data: bytes) -> Any:
    """The ``ExportedProgram`` in ``data``, after ``check_archive``."""
    from torch.export.pt2_archive._package import load_pt2  # noqa: PLC0415

    force_restricted_unpickling()
    check_archive(data)
    # load_pt2 rather than torch.export.load, whose fallback reads older zip layouts.
    return load_pt2(io.BytesIO(data)).exported_programs[PROGRAM_NAME]
