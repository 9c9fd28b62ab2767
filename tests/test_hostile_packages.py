"""Packages built to run code, read the server's files or exhaust its memory, against the
real server. A ``model.pt2`` (the ``torch.export`` archive earlier exports wrote) is never
read, however hostile: the package is ready, serves from its ONNX graph, and the archive's
marker file is never written. ONNX external data that reads the server's files is refused
with a reason, its secret never leaves. The good package beside them keeps serving.

Each attack is shown to be real: plain torch (``torch.export.load`` then ``.module()``) runs
the code-running archives, and ONNX Runtime given the package's bytes reads the secret from
the working directory. What the server evaluates while it loads a package and runs gradient
methods on it is recorded: nothing from the ONNX file reaches compiled code."""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import sympy
from onnx import numpy_helper

from saliency_service.client.client import SaliencyClient
from saliency_service.core.onnx_external import model_tensors
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor
from tests.conftest import TINY_LABELS, TINY_SHAPE, RunningServer, make_config
from tests.hostile_models import add_torch_archive
from tests.test_package_loading import (
    copy_package,
    member,
    reseal,
    torch_package,
)
from tests.test_production_security import unpickling_calls

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"cwd-secret: the server's own key" * 4  # 128 bytes: 32 float32 values
BIAS = 32  # the last convolution's bias, an initializer of 32 floats
BOMB_BYTES = 256 << 20


def code(marker: Path) -> str:
    """Python that creates ``marker`` (what an attacker would make run)."""
    return f"__import__('pathlib').Path('{marker}').touch()"


def edit_program(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, bytes]], None]:
    """An archive edit that rewrites ``models/model.json`` with ``edit``."""
    def rewrite(members: dict[str, bytes]) -> None:
        name = member(members, "models/model.json")
        document = json.loads(members[name])
        edit(document)
        members[name] = json.dumps(document).encode()
    return rewrite


def graph(document: dict[str, Any]) -> dict[str, Any]:
    return document["graph_module"]["graph"]


def guards(marker: Path) -> Callable[[dict[str, Any]], None]:
    """``guards_code``: ``ExportedProgram.module()`` execs it into the forward's guard."""
    def edit(document: dict[str, Any]) -> None:
        document["guards_code"] = [f"({code(marker)}) is None"]
    return edit


def sympified(marker: Path) -> Callable[[dict[str, Any]], None]:
    """A symbolic size's ``expr_str``: ``torch.export.load`` hands it to ``sympy.sympify``."""
    def edit(document: dict[str, Any]) -> None:
        sizes = graph(document)["tensor_values"]["x"]["sizes"]
        next(size for size in sizes if "as_expr" in size)["as_expr"]["expr_str"] = code(marker)
    return edit


def named(marker: Path) -> Callable[[dict[str, Any]], None]:
    """The input's name: FX writes it into the ``forward`` it compiles while loading."""
    def edit(document: dict[str, Any]) -> None:
        text = json.dumps(document).replace('"x"', json.dumps(f"x=({code(marker)})"))
        document.clear()
        document.update(json.loads(text))
    return edit


def enum_context(document: dict[str, Any]) -> None:
    """A pytree context entry torch resolves with ``importlib.import_module``."""
    signature = document["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(signature["in_spec"])
    spec[1]["children_spec"][-1]["context"] = json.dumps(
        [{"__enum__": True, "fqn": "this:Zen", "name": "a"}])
    signature["in_spec"] = json.dumps(spec)


def file_reading_op(document: dict[str, Any]) -> None:
    """``aten.from_file`` reads a file into a tensor."""
    graph(document)["nodes"][0]["target"] = "torch.ops.aten.from_file.default"


def os_call(document: dict[str, Any]) -> None:
    """A call target reached by ``getattr`` from ``torch``: ``torch.os.system``."""
    graph(document)["nodes"][0]["target"] = "torch.os.system"


def rewrite_zip(path: Path, bombed: str) -> None:
    """Replaces record ``bombed`` by BOMB_BYTES of zeros, deflated (about 1000:1) and
    written 1 MiB at a time, so the test itself stays small."""
    with zipfile.ZipFile(path) as source:
        members = {info.filename: source.read(info) for info in source.infolist()
                   if info.filename != bombed}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in members.items():
            archive.writestr(name, data, zipfile.ZIP_STORED)
        with archive.open(bombed, "w", force_zip64=True) as record:
            zeros = bytes(1 << 20)
            for _ in range(BOMB_BYTES >> 20):
                record.write(zeros)


def weight_record(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(n for n in archive.namelist() if n.endswith("data/weights/weight_0"))


def empty_weight(members: dict[str, bytes]) -> None:
    """A weight whose record is empty but whose metadata asks for 2**34 floats: torch
    would allocate them as zeros."""
    members[member(members, "data/weights/weight_0")] = b""
    name = member(members, "model_weights_config.json")
    config = json.loads(members[name])
    payload = next(p for p in config["config"].values() if p["path_name"] == "weight_0")
    payload["tensor_meta"]["sizes"] = [{"as_int": 1 << 17}, {"as_int": 1 << 17}]
    payload["tensor_meta"]["strides"] = [{"as_int": 1 << 17}, {"as_int": 1}]
    members[name] = json.dumps(config).encode()


def external_tensor(package: Path, location: str, dims: int) -> None:
    """Moves the model's first tensor of ``dims`` floats to external data at ``location``
    (the manifest still lists model.onnx alone, resealed): BIAS, an initializer, or
    len(TINY_LABELS), the classifier's bias, a Constant node's tensor."""
    model = onnx.load_model_from_string((package / "model.onnx").read_bytes())
    tensor = next(t for t in model_tensors(model) if list(t.dims) == [dims])
    size = numpy_helper.to_array(tensor).nbytes
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (package / "model.onnx").write_bytes(model.SerializeToString())
    reseal(package)


CODE_ATTACKS = {"guards": guards, "sympify": sympified, "fx_name": named}
ARCHIVE_EDITS: dict[str, Callable[[dict[str, bytes]], None]] = {
    "enum": edit_program(enum_context), "from_file": edit_program(file_reading_op),
    "os_call": edit_program(os_call), "empty_weight": empty_weight}
ARCHIVE_PACKAGES = (*CODE_ATTACKS, "guards_unlisted", *ARCHIVE_EDITS, "zip_bomb")


@pytest.fixture(scope="module")
def served(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[RunningServer, Path, Path]]:
    """A server, started in a working directory holding ``cwd-secret.txt``, over the good
    tiny package and the hostile ones."""
    root = tmp_path_factory.mktemp("hostile_packages")
    markers = tmp_path_factory.mktemp("hostile_markers")
    cwd = tmp_path_factory.mktemp("server_cwd")
    (cwd / "cwd-secret.txt").write_bytes(SECRET)
    copy_package(repository, root, "tiny")
    for name, attack in CODE_ATTACKS.items():
        torch_package(repository, root, name, edit_program(attack(markers / name)))
    torch_package(repository, root, "guards_unlisted",
                  edit_program(guards(markers / "guards_unlisted")), listed=False)
    for name, edit in ARCHIVE_EDITS.items():
        torch_package(repository, root, name, edit)
    bomb = copy_package(repository, root, "zip_bomb")
    archive = add_torch_archive(bomb, len(TINY_LABELS), TINY_SHAPE)
    rewrite_zip(archive, weight_record(archive))
    reseal(bomb)
    for name, location, dims in (("cwd_secret", "cwd-secret.txt", BIAS),
                                 ("in_attribute", "cwd-secret.txt", len(TINY_LABELS)),
                                 ("parent", "../../../../etc/hostname", BIAS),
                                 ("absolute", str(cwd / "cwd-secret.txt"), BIAS)):
        external_tensor(copy_package(repository, root, name), location, dims)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        running = RunningServer(make_config(root)).start()
        try:
            yield running, markers, cwd
        finally:
            running.stop()


def statuses(server: RunningServer) -> dict[str, pb.ModelStatus]:
    with grpc.insecure_channel(server.address) as channel:
        listed = pb_grpc.ExplainerStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return {model.name: model for model in listed.models}


@pytest.mark.parametrize("name", ARCHIVE_PACKAGES)
def test_a_hostile_torch_archive_is_never_read(
        served: tuple[RunningServer, Path, Path], name: str) -> None:
    """Code in the archive's JSON, imports, file-reading targets, a weight that would
    allocate 64 GiB and a zip bomb: the package is ready and answers an ONNX method and a
    gradient method exactly as the same package without the archive."""
    server, markers, _ = served
    status = statuses(server)[name]
    assert status.ready, status.error
    pixels = np.random.default_rng(1).random((2, *TINY_SHAPE), dtype=np.float32)
    with SaliencyClient(server.address, timeout=120) as client:
        for method in ("vanilla_gradient", "rise"):
            ours = client.explain(name, method, tensor=pixels, target=[1, 2], seed=3).maps
            plain = client.explain("tiny", method, tensor=pixels, target=[1, 2], seed=3).maps
            np.testing.assert_array_equal(ours, plain)
    assert not list(markers.iterdir())


def test_no_marker_is_written_on_reload_or_warm_up(
        served: tuple[RunningServer, Path, Path]) -> None:
    server, markers, _ = served
    server.call(server.server.reload(force=True))
    assert all(statuses(server)[name].ready for name in ARCHIVE_PACKAGES)
    assert not list(markers.iterdir())


@pytest.mark.parametrize("name", sorted(CODE_ATTACKS))
def test_plain_torch_runs_the_archive_the_server_ignores(
        repository: Path, tmp_path: Path, name: str) -> None:
    """Loading the archive and making its module runs the attacker's code: what the server
    would have run, had it read the archive."""
    marker = tmp_path / "marker"
    package = torch_package(repository, tmp_path, name, edit_program(CODE_ATTACKS[name](marker)))
    script = ("import sys, torch\nfrom torch.export.pt2_archive._package import load_pt2\n"
              "program = load_pt2(sys.argv[1]).exported_programs['model']\n"
              f"program.module()(torch.zeros(2, {', '.join(map(str, TINY_SHAPE))}))\n")
    subprocess.run([sys.executable, "-c", script, str(package / "model.pt2")],
                   capture_output=True, timeout=300, check=False)
    assert marker.exists()


def test_plain_torch_imports_modules_named_in_a_pytree_context(
        repository: Path, tmp_path: Path) -> None:
    package = torch_package(repository, tmp_path, "enum", edit_program(enum_context))
    ran = subprocess.run([sys.executable, "-c", "import sys, torch; torch.export.load(sys.argv[1])",
                          str(package / "model.pt2")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert "The Zen of Python" in ran.stdout  # ``import this`` ran


def test_the_zip_bomb_is_real(repository: Path, tmp_path: Path) -> None:
    """The archive served above inflates a thousandfold: reading it would have cost the
    server 256 MiB (a larger one, any amount)."""
    package = copy_package(repository, tmp_path, "bomb")
    archive = add_torch_archive(package, len(TINY_LABELS), TINY_SHAPE)
    rewrite_zip(archive, weight_record(archive))
    with zipfile.ZipFile(archive) as opened:
        inflated = sum(info.file_size for info in opened.infolist())
    assert inflated >= BOMB_BYTES > archive.stat().st_size * 200


@pytest.mark.parametrize(("name", "words"), [
    ("cwd_secret", "not a file the package lists"),
    ("in_attribute", "not a file the package lists"),
    ("parent", "is not a relative path inside the model's folder"),
    ("absolute", "is not a relative path inside the model's folder"),
])
def test_onnx_external_data_outside_the_package_is_refused(
        served: tuple[RunningServer, Path, Path], name: str, words: str) -> None:
    server, _, _ = served
    status = statuses(server)[name]
    assert not status.ready
    assert "model.onnx refused" in status.error and words in status.error
    assert SECRET.decode() not in status.error
    inputs = np.zeros((1, *TINY_SHAPE), np.float32)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(
            grpc.RpcError) as refused:
        pb_grpc.ExplainerStub(channel).Predict(pb.PredictRequest(
            model=name, input=pb.Input(tensor=array_to_tensor(inputs))), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert SECRET.decode() not in refused.value.details()


def test_onnx_runtime_alone_would_read_the_secret_from_the_working_directory(
        served: tuple[RunningServer, Path, Path], repository: Path, tmp_path: Path) -> None:
    """The cwd_secret package is a real attack: ONNX Runtime given its bytes, as the server
    gave them before, takes a bias from whatever ``cwd-secret.txt`` the working directory
    holds (and fails where there is none), so the file's contents shape the logits."""
    package = copy_package(repository, tmp_path, "secret")
    external_tensor(package, "cwd-secret.txt", BIAS)
    model_bytes = (package / "model.onnx").read_bytes()
    inputs = np.zeros((1, *TINY_SHAPE), np.float32)
    logits = []
    for contents in (SECRET, bytes(reversed(SECRET)), None):
        folder = tmp_path / f"cwd{len(logits)}"
        folder.mkdir()
        if contents is not None:
            (folder / "cwd-secret.txt").write_bytes(contents)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder)
            if contents is None:
                with pytest.raises(Exception, match=r"cwd-secret\.txt"):
                    ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
                continue
            session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        logits.append(session.run(None, {session.get_inputs()[0].name: inputs})[0])
    assert not np.array_equal(logits[0], logits[1])


def test_the_good_package_serves_beside_the_hostile_ones(
        served: tuple[RunningServer, Path, Path]) -> None:
    server, markers, _ = served
    assert statuses(server)["tiny"].ready
    inputs = np.zeros((1, *TINY_SHAPE), np.float32)
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.ExplainerStub(channel).Predict(pb.PredictRequest(
            model="tiny", input=pb.Input(tensor=array_to_tensor(inputs))), timeout=30)
    assert reply.predictions[0].top
    assert not list(markers.iterdir())


# What evaluates strings while a package loads: the load path of the server's own code
# (statically: the repository, the server, and the ONNX → torch translation gradient methods
# run on) and at run time, on a real package.
_EVALUATORS = {"exec", "eval", "compile", "__import__"}
_EVALUATING_ATTRIBUTES = ("sympify", "parse_expr", "import_module", "torch.export.load",
                          "literal_eval")
_LOAD_PATH = ("saliency_service/core", "saliency_service/serving",
              "saliency_service/methods/_utils/onnx_to_fx")
_LOAD_PATH_FILES = ("saliency_service/methods/_utils/gradient_program.py",
                    "saliency_service/methods/_utils/torch_program.py")


def evaluating_calls(source: str, where: str) -> list[str]:
    """Calls that evaluate or import a string, in one file's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        if called in _EVALUATORS or called.endswith(_EVALUATING_ATTRIBUTES):
            found.append(f"{where}:{node.lineno} {called}")
    return found


def test_the_evaluation_scan_finds_what_it_looks_for() -> None:
    source = ("import importlib, sympy, torch\nexec('1')\neval('1')\ncompile('1', 'x', 'eval')\n"
              "sympy.sympify('s0')\nimportlib.import_module('os')\n"
              "torch.export.load('m.pt2')\nre.compile('x')\n")
    assert len(evaluating_calls(source, "x.py")) == 6


def test_the_servers_load_path_evaluates_no_string() -> None:
    """The server's own loading code, and the translation of an ONNX graph into torch,
    call no exec, eval, compile, sympify or import on anything, no ``torch.export.load``,
    and unpickle nothing."""
    files = [path for folder in _LOAD_PATH for path in sorted((ROOT / folder).glob("*.py"))]
    files += [ROOT / name for name in _LOAD_PATH_FILES]
    assert len(files) > 10 and all(path.is_file() for path in files)
    problems: list[str] = []
    for path in files:
        source, where = path.read_text(), str(path.relative_to(ROOT))
        problems += evaluating_calls(source, where) + unpickling_calls(source, where)
    assert not problems, "\n".join(problems)


class Evaluations:
    """Records every string evaluated, compiled, sympified or imported, and from where."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, str]] = []
        for name in ("exec", "eval", "compile"):
            patch.setattr(builtins, name, self._spy(name, getattr(builtins, name)))
        patch.setattr(sympy, "sympify", self._spy("sympify", sympy.sympify))
        patch.setattr(importlib, "import_module", self._spy("import_module",
                                                            importlib.import_module))

    def _spy(self, kind: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(value: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(value, str):
                caller = sys._getframe(1).f_code.co_filename  # noqa: SLF001
                self.calls.append((kind, value, caller))
            return real(value, *args, **kwargs)
        return spy

    def of(self, kind: str) -> list[tuple[str, str]]:
        return [(value, caller) for k, value, caller in self.calls if k == kind]


TOKEN = "zqxonnx"  # in every string the code-named package's ONNX file holds


def name_everything_with_code(package: Path, marker: Path) -> set[str]:
    """Renames every name in the package's ONNX graph (its input and outputs, initializers,
    intermediate values, nodes, the graph) to Python that would create ``marker``, adds such
    doc strings and metadata, and updates the manifest; returns the new strings."""
    model = onnx.load_model_from_string((package / "model.onnx").read_bytes())
    graph = model.graph
    renamed: dict[str, str] = {}

    def new(old: str) -> str:
        if old and old not in renamed:
            renamed[old] = (f"__import__('pathlib').Path({str(marker)!r}).touch() or "
                            f"'{TOKEN}{len(renamed)}'")
        return renamed.get(old, old)

    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = new(value.name)
    for tensor in graph.initializer:
        tensor.name = new(tensor.name)
    for index, node in enumerate(graph.node):
        node.input[:] = [new(name) for name in node.input]
        node.output[:] = [new(name) for name in node.output]
        node.name = new(node.name or f"node{index}")
        node.doc_string = new(f"doc{index}")
    graph.name = new(graph.name)
    model.doc_string = new("model doc")
    entry = model.metadata_props.add()
    entry.key, entry.value = new("key"), new("value")
    (package / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["input"]["name"] = renamed[manifest["input"]["name"]]
    outputs = manifest["outputs"]
    outputs["logits"] = renamed[outputs["logits"]]
    outputs["scales"] = [renamed[name] for name in outputs.get("scales", [])]
    manifest["cam_output"] = renamed.get(manifest.get("cam_output", ""), "")
    if "scale_output" in manifest.get("head", {}):
        manifest["head"]["scale_output"] = renamed[manifest["head"]["scale_output"]]
    (package / "manifest.json").write_text(json.dumps(manifest))
    reseal(package)
    return set(renamed.values())


def test_nothing_from_the_onnx_file_reaches_evaluated_code(
        repository: Path, tmp_path: Path) -> None:
    """A server loads and warms a package whose every ONNX name, doc string and metadata
    entry is Python, then runs gradient methods on it, recording every string handed to
    exec/eval/compile, sympify or import_module: FX compiles the code it generates, and not
    one string of the file (nor any part of it) is in it; the maps equal those of the same
    package with plain names."""
    root = tmp_path / "models"
    copy_package(repository, root, "tiny")
    package = copy_package(repository, root, "code_named")
    marker = tmp_path / "marker"
    strings = name_everything_with_code(package, marker)
    assert len(strings) > 20
    pixels = np.random.default_rng(2).random((2, *TINY_SHAPE), dtype=np.float32)
    with pytest.MonkeyPatch.context() as patch:
        evaluations = Evaluations(patch)
        server = RunningServer(make_config(root)).start()
        try:
            with SaliencyClient(server.address, timeout=120) as client:
                info = client.get_model("code_named")
                offered = {method.name for method in info.methods}
                assert {"vanilla_gradient", "gradcam", "guided_backprop"} <= offered, (
                    offered, list(info.unavailable))
                for method in ("vanilla_gradient", "gradcam", "guided_backprop"):
                    ours = client.explain("code_named", method, tensor=pixels, target=[0, 3])
                    plain = client.explain("tiny", method, tensor=pixels, target=[0, 3])
                    np.testing.assert_allclose(ours.maps, plain.maps, rtol=1e-5, atol=1e-7)
        finally:
            server.stop()
    assert not marker.exists()
    compiled = evaluations.of("exec") + evaluations.of("compile") + evaluations.of("eval")
    assert any("def forward" in value for value, _ in compiled), "no FX code was observed"
    reached = [(kind, value[:200], caller) for kind, value, caller in evaluations.calls
               if TOKEN in value or any(text in value for text in strings)]
    assert not reached, reached
