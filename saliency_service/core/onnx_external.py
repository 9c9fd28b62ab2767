"""ONNX external data: the files a model's tensors keep their values in, checked to be plain
relative names, and sessions that read those files from memory.

ONNX Runtime resolves a tensor's ``location`` against the model's folder, or, for a model
given as bytes, against the working directory, so a package could read any file the server
can. Here every tensor (initializers, sparse ones, node attributes, subgraphs, functions) is
inspected, each location must be a relative path without ``..`` that the caller has already
verified, and the session gets those files' bytes rather than a path on disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath

import onnx
import onnxruntime as ort

from saliency_service.core import devices

_KEYS = {"location", "offset", "length", "checksum"}


class ExternalDataRefused(ValueError):
    """A tensor's external data names a file that may not be read."""


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in (*([attribute.sparse_tensor] if attribute.HasField("sparse_tensor")
                         else []), *attribute.sparse_tensors):
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model holds, in its graph, subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for training in model.training_info:
        yield from _graph_tensors(training.initialization)
        yield from _graph_tensors(training.algorithm)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def check_location(location: str) -> str:
    """``location`` when it is a relative path inside the model's folder (no ``..``, no
    absolute path, no drive or backslash); raises ExternalDataRefused otherwise."""
    path = PurePosixPath(location)
    if (not location or path.is_absolute() or "\\" in location or ":" in location
            or "\x00" in location or any(part in ("..", "", ".") for part in location.split("/"))):
        raise ExternalDataRefused(f"external data location {location[:120]!r} is not a "
                                  "relative path inside the model's folder")
    return location


def external_data(model: onnx.ModelProto) -> dict[str, int]:
    """Each file the model's tensors keep data in, with the bytes they need of it (the end
    of the furthest ``offset + length``; -1 where a tensor reads to the end)."""
    needed: dict[str, int] = {}
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        shown = tensor.name[:80]
        if not set(entries) <= _KEYS or "location" not in entries:
            raise ExternalDataRefused(f"tensor {shown!r}: external data entries "
                                      f"{sorted(entries)[:8]} are not location/offset/length")
        location = check_location(entries["location"])
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else -1
        except ValueError:
            raise ExternalDataRefused(f"tensor {shown!r}: external data offset and length "
                                      "must be integers") from None
        if offset < 0 or length < -1:
            raise ExternalDataRefused(f"tensor {shown!r}: negative external data offset")
        end = -1 if length < 0 else offset + length
        previous = needed.get(location, 0)
        needed[location] = -1 if -1 in (previous, end) else max(previous, end)
    return needed


def check_files(model: onnx.ModelProto, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The subset of ``files`` (already verified names → bytes) that the model's external
    data reads; raises ExternalDataRefused for a location outside ``files`` or a range past
    a file's end."""
    used: dict[str, bytes] = {}
    for location, end in external_data(model).items():
        if location not in files:
            raise ExternalDataRefused(f"tensor data is kept in {location[:120]!r}, which is "
                                      "not a file the package lists")
        if end > len(files[location]):
            raise ExternalDataRefused(f"tensor data reaches byte {end} of {location[:120]!r}, "
                                      f"which holds {len(files[location])}")
        used[location] = files[location]
    return used


def inline(model: onnx.ModelProto, files: Mapping[str, bytes]) -> onnx.ModelProto:
    """``model`` with every external tensor's values copied in from ``files`` (the result of
    ``check_files``), for readers that take one in-memory model."""
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        data = files[check_location(entries["location"])]
        offset = int(entries.get("offset", "0"))
        end = offset + int(entries["length"]) if "length" in entries else len(data)
        tensor.raw_data = data[offset:end]
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def session(model_bytes: bytes, files: Mapping[str, bytes],
            options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on ``model_bytes`` whose external data comes from ``files``
    (the result of ``check_files``), so nothing is read from disk; on the process's execution
    providers (``core.devices``)."""
    options = options or ort.SessionOptions()
    if files:
        names = list(files)
        buffers = [files[name] for name in names]
        options.add_external_initializers_from_files_in_memory(
            names, buffers, [len(buffer) for buffer in buffers])
    return ort.InferenceSession(model_bytes, options, providers=devices.session_providers())
