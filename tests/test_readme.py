"""The README's commands run as written, in a fresh shell, against a real server with the
shipped demo package: its client commands (explain, models, health), the curl upload and the
Python snippet; the figures it quotes are the ones they print; ``docs/cell.png`` is the cell
it says it is. Also: the CLI's JSON keeps plain numbers and zero fields, and benchmark smoke
runs write outside the committed results."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.common import QUICK_RESULTS, RESULTS, base_parser
from saliency_service.evaluation.cells import TEST_CONFIG, generate
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CLIENT_COMMANDS = ("explain", "models", "health")


def code_blocks(language: str) -> list[str]:
    """The README's fenced blocks in ``language`` ("" = no language given)."""
    blocks: list[tuple[str, list[str]]] = []
    inside = False
    for line in README.splitlines():
        if line.startswith("```"):
            if not inside:
                blocks.append((line[3:].strip(), []))
            inside = not inside
        elif inside:
            blocks[-1][1].append(line)
    return ["\n".join(lines) + "\n" for kind, lines in blocks if kind == language]


def shell_commands() -> list[str]:
    """Every command of the README's ``sh`` blocks, continuation lines joined."""
    commands = []
    for block in code_blocks("sh"):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def client_commands() -> list[list[str]]:
    """The ``saliency explain | models | health`` commands, as argument lists."""
    found = []
    for command in shell_commands():
        words = shlex.split(command, comments=True)
        if words[:1] == [".venv/bin/saliency"] and words[1] in CLIENT_COMMANDS:
            found.append(words)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with the committed demo package, gRPC and HTTP on free ports."""
    models = tmp_path_factory.mktemp("readme-models")
    shutil.copytree(ROOT / "models" / "demo", models / "demo")
    running = RunningServer(make_config(models, http_port=0)).start(timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder that looks like the repository root (its .venv and docs), so the
    commands' relative paths resolve and their outputs land outside the repository."""
    folder = tmp_path_factory.mktemp("readme-shell")
    for name in (".venv", "docs"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def run(words: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """A command in a fresh environment: no activated venv, no PYTHONPATH."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    environment["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return subprocess.run(words, cwd=folder, capture_output=True, text=True, timeout=600,
                          env=environment, check=False)


def on_server(words: list[str], address: str) -> list[str]:
    """A client command aimed at the test's server instead of localhost:50051."""
    if "--server" in words:
        at = words.index("--server")
        return [*words[:at + 1], address, *words[at + 2:]]
    return [*words[:2], "--server", address, *words[2:]]


def test_the_readme_has_the_commands_this_test_runs() -> None:
    kinds = [words[1] for words in client_commands()]
    assert kinds.count("explain") >= 3 and "models" in kinds and "health" in kinds
    assert not [c for c in shell_commands() if c.startswith("saliency ")], \
        "a bare `saliency` command needs the venv activated: write .venv/bin/saliency"


def test_client_commands_run_as_written(demo: RunningServer, shell: Path) -> None:
    for words in client_commands():
        done = run(on_server(words, demo.address), shell)
        assert done.returncode == 0, f"{shlex.join(words)}: {done.stderr}"
        assert "Traceback" not in done.stderr
        if "--out" in words:
            written = shell / words[words.index("--out") + 1]
            assert Image.open(written).format == "PNG"
        comment = next((c for c in shell_commands() if shlex.split(c, comments=True) == words
                        and "# live:" in c), None)
        if comment is not None:  # health: the output is the comment
            assert done.stdout.strip() == comment.split("# ", 1)[1].strip()


def test_quoted_output_is_what_the_demo_package_prints(demo: RunningServer,
                                                        shell: Path) -> None:
    (first, *_) = client_commands()
    assert first[1] == "explain" and "--image" in first
    quoted = next(block for block in code_blocks("") if block.startswith("prediction:"))
    printed = run(on_server(first, demo.address), shell).stdout
    expected, got = quoted.splitlines(), printed.splitlines()
    assert len(got) == len(expected), printed
    for want, line in zip(expected, got, strict=True):
        if want.startswith("cost:"):  # times depend on the machine
            want, line = want.split(" wall ")[0], line.split(" wall ")[0]
        assert line == want


def test_curl_upload_runs_as_written(demo: RunningServer, shell: Path) -> None:
    (command,) = [c for c in shell_commands() if c.startswith("curl ")]
    words = [word.replace("localhost:8080", f"127.0.0.1:{demo.server.http_port}")
             for word in shlex.split(command)]
    done = run(words, shell)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"] == "demo" and answer["saliency"]["shape"] == [1, 128, 128]


def test_python_snippet_runs_as_written(demo: RunningServer, shell: Path) -> None:
    (snippet,) = code_blocks("python")
    (shell / "map.png").unlink(missing_ok=True)
    done = run([".venv/bin/python", "-c",
                snippet.replace("localhost:50051", demo.address)], shell)
    assert done.returncode == 0, done.stderr
    assert Image.open(shell / "map.png").format == "PNG"


def test_models_json_has_plain_numbers_and_zero_fields(demo: RunningServer,
                                                       shell: Path) -> None:
    done = run([".venv/bin/saliency", "models", "demo", "--json", "--server", demo.address],
               shell)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["status"]["version"] == 1 and info["input"]["shape"] == [-1, 3, 128, 128]
    assert info["input"]["batch_size"] == 0  # a zero is printed, not dropped
    assert all(isinstance(m["measured_requests"], int) for m in info["methods"])


def test_the_shipped_cell_is_the_first_test_cell() -> None:
    shipped = np.asarray(Image.open(ROOT / "docs" / "cell.png").convert("RGB"))
    np.testing.assert_array_equal(shipped, generate(1, TEST_CONFIG).images[0])


def test_quick_benchmark_runs_write_outside_the_committed_results() -> None:
    parser = base_parser("suite")
    assert parser.parse_args(["--quick"]).out == QUICK_RESULTS
    assert not QUICK_RESULTS.resolve().is_relative_to(ROOT)
    assert parser.parse_args([]).out == RESULTS
    assert parser.parse_args(["--quick", "--out", "elsewhere"]).out == Path("elsewhere")


def test_run_all_quick_leaves_the_committed_summary_alone(tmp_path: Path) -> None:
    committed = (RESULTS / "summary.md").read_bytes()
    done = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "benchmarks.run_all",
                           "--quick", "--summarize"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"wrote {QUICK_RESULTS / 'summary.md'}" in done.stdout
    assert (RESULTS / "summary.md").read_bytes() == committed
