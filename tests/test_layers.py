"""The layers stay apart: the kernel knows no transport, methods know no service, and no
method's name or parameter is spelled out in the service (the handler declares them)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from handlers import registry

ROOT = Path(__file__).resolve().parents[1]
# The service modules a request passes through (the demo's architectures name their layers).
REQUEST_PATH = {"explainer.py", "calls.py", "engine.py", "request_log.py", "core.py",
                "server.py", "config.py", "status.py", "metrics.py", "wire.py", "images.py"}


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for module in imported_modules(path):
            if module.split(".")[0] in forbidden or module.startswith(forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


def test_the_kernel_imports_no_transport_stubs_service_or_methods() -> None:
    assert offenders("kernel", ("grpc", "saliency", "service", "handlers")) == []


def test_methods_import_nothing_from_the_service() -> None:
    assert offenders("handlers", ("service", "grpc")) == []


def test_the_scan_sees_imports() -> None:
    assert "kernel.errors" in imported_modules(ROOT / "service" / "status.py")


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
    for path in sorted((ROOT / "service").glob("*.py")):
        names = {handler.name} | (parameters if path.name in REQUEST_PATH else set())
        assert not names & code_strings(path), f"{path.name}: {names & code_strings(path)}"
