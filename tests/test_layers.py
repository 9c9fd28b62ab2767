"""The layers stay apart: the kernel knows no transport, methods know no service, and no
method's name or parameter is spelled out in the service (the handler declares them)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from saliency_service.methods import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "saliency_service"
# The modules a request passes through (the demo's architectures name their layers).
REQUEST_PATH = {"grpc_servicer.py", "calls.py", "engine.py", "request_log.py", "codec.py",
                "server.py", "config.py", "status.py", "metrics.py", "grpc_wire.py",
                "images.py"}
# Each layer and what it must not import (prefixes of module names).
SERVER = ("saliency_service.serving", "saliency_service.protocol")
UPPER = (*SERVER, "saliency_service.client", "saliency_service.packaging",
         "saliency_service.zoo", "saliency_service.evaluation", "saliency_service.cli")
FORBIDDEN = {
    "core": ("grpc", "google.protobuf", "saliency_service.proto", "saliency_service.methods",
             "saliency_service.render", *UPPER),
    "render": ("grpc", "saliency_service.proto", "saliency_service.methods", *UPPER),
    # Methods take plain parameters and are known by name: the wire stays in protocol/.
    "methods": ("grpc", "google.protobuf", "saliency_service.proto", *UPPER),
    "client": ("torch", "onnxruntime", "onnx", "cv2", "starlette", "uvicorn", "scipy",
               "saliency_service.serving", "saliency_service.methods",
               "saliency_service.packaging", "saliency_service.zoo",
               "saliency_service.evaluation", "saliency_service.protocol.codec",
               "saliency_service.protocol.calls", "saliency_service.protocol.rest"),
    "zoo": ("grpc", "saliency_service.proto", *UPPER[:-3], "saliency_service.cli"),
    # Evaluation calls a server (in-process or remote) like any client.
    "evaluation": ("saliency_service.protocol.calls", "saliency_service.protocol.rest",
                   "saliency_service.cli"),
}


# Where a layer may use what it otherwise must not, and why. A remote predictor is a model
# runtime like ONNX Runtime: its client speaks gRPC to the predictor (the Open Inference
# Protocol), never the service's own API.
ALLOWED = {"core/remote.py": ("grpc", "saliency_service.proto",
                               "saliency_service.proto.open_inference_pb2")}


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)  # and what it names, which may be modules themselves
            modules |= {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        allowed = ALLOWED.get(str(path.relative_to(PACKAGE)), ())
        for module in imported_modules(path) - set(allowed):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_below_it(layer: str) -> None:
    assert offenders(layer, FORBIDDEN[layer]) == []


def test_the_scan_sees_imports() -> None:
    assert offenders("protocol", ("saliency_service.core",)) != []
    assert "saliency_service.core.errors" in imported_modules(
        PACKAGE / "protocol" / "status.py")


def test_only_saliency_service_is_a_top_level_package() -> None:
    """Generic top-level names collide with other distributions' packages."""
    import tomllib  # noqa: PLC0415

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["saliency_service*"]
    assert sorted(p.parent.name for p in ROOT.glob("*/__init__.py")) == [
        "benchmarks", "saliency_service", "tests"]


def test_every_folder_says_what_it_holds() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(ROOT)} has no docstring"


def code_strings(path: Path) -> set[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings}


@pytest.mark.parametrize("handler", registry.handlers(), ids=lambda h: h.name)
def test_no_method_or_parameter_name_is_written_in_the_service(handler: registry.Handler
                                                                ) -> None:
    """Method names and parameter fields live in their handler; the service reaches them
    through the registry (the proto stubs aside)."""
    parameters = {f.name for f in dataclasses.fields(handler.Params)}
    for path in sorted(p for folder in ("serving", "protocol") for p in
                       (PACKAGE / folder).glob("*.py")):
        names = {handler.name} | (parameters if path.name in REQUEST_PATH else set())
        assert not names & code_strings(path), f"{path.name}: {names & code_strings(path)}"


def test_every_registered_method_is_public_by_class_name() -> None:
    """``saliency_service.methods`` names each handler class, as ``captum.attr`` does."""
    import saliency_service.methods as methods  # noqa: PLC0415

    registered = {type(h).__name__: h.name for h in registry.handlers()}
    assert set(methods.__all__) == set(registered)
    for class_name, name in registered.items():
        assert getattr(methods, class_name).name == name
