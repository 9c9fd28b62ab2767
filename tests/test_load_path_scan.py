"""Loading a package runs no code from it, checked on every module the server can reach.

The load path is found as ``tests/test_layers.py`` reads the layers: by following the
imports (top-level and inside functions) from the server's start-up module, so a module
added on the way (a handler, a translation module, a helper) is scanned the day it is
imported, with no list to update. Each reached file must call no exec, eval, compile,
sympify or import on a string, no ``torch.export.load``, and unpickle nothing (the scans of
``tests/test_hostile_packages.py`` and ``tests/test_production_security.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_hostile_packages import evaluating_calls
from tests.test_production_security import unpickling_calls

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "saliency_service"
# What ``saliency serve`` imports to start, load packages and answer calls.
ENTRY = ("saliency_service.serving.server",)
# Modules the load path must reach (the scan would be hollow if the walk missed them).
KNOWN_ON_THE_PATH = (
    "saliency_service.core.repository",
    "saliency_service.methods.registry",
    "saliency_service.methods.gradients",
    "saliency_service.methods._utils.gradient_program",
    "saliency_service.methods._utils.torch_program",
    "saliency_service.methods._utils.onnx_to_fx.walker",
    "saliency_service.methods._utils.onnx_to_fx.shapes",
)


# Where a module on the path may call what the scan looks for, and why.
ALLOWED = {
    "saliency_service/methods/registry.py": (
        "importlib.import_module",  # the built-in handler modules, named in its own source
    ),
}


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` in this repository (a package's ``__init__``)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(path: Path, name: str) -> set[str]:
    """The project's modules ``path`` (module ``name``) imports anywhere in its source, or
    names in a string (a registry's list of modules), with the packages above each one,
    whose ``__init__`` runs first."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value.startswith(f"{PACKAGE}.") and node.value.isascii()):
            found.add(node.value)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return {m for m in found | parents if m.split(".")[0] == PACKAGE and module_file(m)}


def load_path(entries: tuple[str, ...] = ENTRY) -> dict[str, Path]:
    """Every project module reachable from ``entries`` through imports, with its file."""
    reached: dict[str, Path] = {}
    waiting = list(entries)
    while waiting:
        name = waiting.pop()
        path = module_file(name)
        if name in reached or path is None:
            continue
        reached[name] = path
        waiting += sorted(imports_of(path, name) - reached.keys())
    return reached


def test_the_walk_follows_imports_inside_functions_and_packages(tmp_path: Path) -> None:
    source = ("import os\nfrom saliency_service.core import repository\n"
              "HANDLERS = ('saliency_service.methods.noise', 'saliency_service.nothing')\n"
              "def late():\n    from saliency_service.methods._utils.onnx_to_fx import walker\n")
    path = tmp_path / "entry.py"
    path.write_text(source)
    assert imports_of(path, "saliency_service.serving.entry") >= {
        "saliency_service.core", "saliency_service.core.repository",
        "saliency_service.methods._utils.onnx_to_fx",
        "saliency_service.methods._utils.onnx_to_fx.walker", "saliency_service.methods.noise"}
    assert "saliency_service.nothing" not in imports_of(path, "saliency_service.serving.entry")


def test_the_load_path_reaches_the_translation_and_the_repository() -> None:
    reached = load_path()
    missing = [name for name in KNOWN_ON_THE_PATH if name not in reached]
    assert not missing, missing
    assert len(reached) > 40


def test_no_module_on_the_load_path_evaluates_a_string_or_unpickles() -> None:
    problems: list[str] = []
    for path in sorted(set(load_path().values())):
        source, where = path.read_text(), str(path.relative_to(ROOT))
        allowed = ALLOWED.get(where, ())
        problems += [problem for problem in evaluating_calls(source, where)
                     + unpickling_calls(source, where)
                     if not problem.split(" ", 1)[1].startswith(allowed)]
    assert not problems, "\n".join(problems)
