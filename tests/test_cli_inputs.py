"""What ``saliency import`` and ``saliency export`` take from their flags: labels files read one
label per line, and values no server could use refused in one line (exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from saliency_service import cli
from tests.onnx_models import small_cnn

LABELS = ("great white shark", "tiger shark", "hammerhead")


@pytest.fixture
def free_size_model(tmp_path: Path) -> Path:
    """A 3-class CNN whose height and width the graph leaves free."""
    model = small_cnn(classes=len(LABELS))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = tmp_path / "free.onnx"
    onnx.save(model, str(path))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_labels_file_holds_one_label_per_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("great white shark\n\n  tiger shark  \nhammerhead\n")
    assert cli.read_labels(str(path)) == (list(LABELS), str(path))
    assert cli.read_labels("cat, dog") == (["cat", "dog"], "--labels")
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.read_labels(str(tmp_path / "missing.txt"))


def test_import_keeps_labels_with_spaces_and_names_the_file_when_they_miscount(
        free_size_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    models = tmp_path / "models"
    code, _ = run(capsys, "import", str(free_size_model), "--name", "sharks", "--models",
                  str(models), "--labels", str(labels), "--input-shape", "3,24,24")
    assert code == 0
    manifest = json.loads((models / "sharks" / "1" / "manifest.json").read_text())
    assert manifest["class_labels"] == list(LABELS)

    labels.write_text("great white shark\ntiger shark\n")
    code, lines = run(capsys, "import", str(free_size_model), "--name", "two", "--models",
                      str(models), "--labels", str(labels), "--input-shape", "3,24,24")
    assert code == 2 and len(lines) == 1
    assert f"2 class labels read from {labels} for the model's 3 classes" in lines[0]


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--input-shape", "3,100000,100000", "pixels"),
    ("--input-shape", "3,-1,24", "positive"),
    ("--input-shape", "3,24", "positive"),
    ("--mean", "nan", "finite"),
    ("--std", "inf", "finite"),
    ("--std", "0", "> 0"),
    ("--mean", "abc", "numbers"),
    ("--value-range", "1,0", "LOW < HIGH"),
    ("--value-range", "0,1,2", "2 numbers"),
    ("--timeout", "-1", ">= 0"),
])
def test_import_refuses_values_no_server_could_use_in_one_line(
        flag: str, value: str, words: str, free_size_model: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    flags = {"--input-shape": "3,24,24", flag: value}
    code, lines = run(capsys, "import", str(free_size_model), "--name", "m", "--models",
                      str(tmp_path / "models"), *(item for pair in flags.items() for item in pair))
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and flag in lines[0]
    assert words in lines[0]
    assert not (tmp_path / "models" / "m").exists()


def test_export_names_the_labels_file_when_its_labels_miscount(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")  # three labels, TinyCNN has four classes
    code, lines = run(capsys, "export", "--module", "tests.models:TinyCNN", "--name", "tiny",
                      "--input-shape", "3,32,32", "--labels", str(labels), "--models",
                      str(tmp_path / "models"))
    assert code == 2
    assert len(lines) == 1, lines
    assert f"3 labels read from {labels}" in lines[0] and "4 logits" in lines[0]
