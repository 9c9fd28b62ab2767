"""Shared benchmark helpers: timing, percentiles, tables, JSON results, model repositories
and a ``saliency serve`` subprocess on a free loopback port.

Ratios measured side by side in one run are meaningful on a shared machine; absolute times
are not, so every result file records the machine it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Where ``--quick`` smoke runs write unless given ``--out``: never over the committed results.
QUICK_RESULTS = Path(tempfile.gettempdir()) / "saliency-bench-quick"
CACHE = Path(
    os.environ.get("SALIENCY_BENCH_CACHE", Path(tempfile.gettempdir()) / "saliency-bench-cache")
)
DEMO_MODELS = ROOT / "models"


# ---- timing and statistics -------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of ``values`` (seconds in, milliseconds out); empty → zeros."""
    if len(values) == 0:
        return {
            "count": 0,
            "p50_ms": 0.0,
            "p95_ms": 0.0,
            "p99_ms": 0.0,
            "max_ms": 0.0,
            "mean_ms": 0.0,
        }
    array = np.asarray(values, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {
        "count": len(values),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(array.max()),
        "mean_ms": float(array.mean()),
    }


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


# Calls cheaper than this are timed right after an untimed run of themselves (steady state;
# see ``time_interleaved``): few-millisecond calls, not ResNet-50's.
STEADY_BELOW_SECONDS = 0.05


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
                     min_seconds: float = 0.0, max_repeats: int = 0,
                     steady_below: float = 0.0) -> dict[str, list[float]]:
    """Wall seconds of each call, timed round-robin so that load on a shared machine falls
    on every call alike (for ratios measured side by side).

    A call is slowed by what the call before it left in the caches: an in-process ONNX
    Runtime run made the gRPC call after it 0.06–0.13 ms slower than an identical call one
    place later, and a torch call before a few-millisecond ONNX Runtime call slows that by
    more. So each round runs the calls in a fresh order (seeded, so runs repeat), and a call
    whose last warm-up took less than ``steady_below`` seconds runs once untimed right before
    each timed run: it is timed in the state it leaves behind itself, as in a server busy
    with such calls. Costlier calls are timed once a round; their neighbours matter less.

    At least ``repeats`` rounds; cheap calls get more rounds, up to ``max_repeats``, until the
    rounds took ``min_seconds``, so a millisecond call's p50 rests on more than ten samples.
    """
    steady = set()
    for name, call in calls.items():
        for _ in range(warmup):
            started = time.perf_counter()
            call()
            last = time.perf_counter() - started
        if warmup and last < steady_below:
            steady.add(name)
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    shuffle = random.Random(0).shuffle
    limit = max(repeats, max_repeats)
    began = time.perf_counter()
    rounds = 0
    while rounds < repeats or (rounds < limit and time.perf_counter() - began < min_seconds):
        rounds += 1
        shuffle(order)
        for name, call in order:
            if name in steady:
                call()
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def dense_gflops(threads: int, size: int = 2048, repeats: int = 10,
                 dtype: str = "float32") -> float:
    """GFLOP/s of a ``size``² matrix product in ``dtype`` (float32, bfloat16) on ``threads``
    torch threads (best of ``repeats``): the rate this machine reaches on dense arithmetic,
    which convolutions lowered to the same kind of kernels can at best approach."""
    import torch  # noqa: PLC0415

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kind = getattr(torch, dtype)
        a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
        best = min(time_calls(lambda: torch.mm(a, b), repeats, warmup=2))
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size**3 / best / 1e9


def in_process_core(root: Path, **config: Any) -> Any:
    """Our ``protocol.codec.Core`` in this process over the packages under ``root``, as a
    server with ``config`` (fields of ``serving.config.Config``) holds it: the repository
    loaded with the same intra-op threads. Its ``repository`` gives the loaded handles."""
    from saliency_service.core.repository import Repository  # noqa: PLC0415
    from saliency_service.protocol.codec import Core  # noqa: PLC0415
    from saliency_service.serving.config import Config  # noqa: PLC0415
    from saliency_service.serving.metrics import Metrics  # noqa: PLC0415

    repository = Repository(root, intra_op_threads=config.get("intra_op_threads", 0))
    repository.load_all()
    return Core(repository, Config(models=root, **config), Metrics())


def flop_count_mode() -> Any:
    """A torch dispatch mode whose ``flops`` sums the FLOPs of the operators torch's FLOP
    counter has formulas for (convolutions and matrix products, backward ones included).
    ``FlopCounterMode`` itself cannot count the gradient handlers: its module tracker hooks
    into autograd, which ``torch.autograd.grad`` (what they call) does not support."""
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415
    from torch.utils.flop_counter import flop_registry  # noqa: PLC0415

    class FlopCount(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
            return out

    return FlopCount()


def loaded_handle(package: Path) -> Any:
    """The package at ``package`` (``…/<name>/<version>``) loaded as the server loads it;
    raises with its error when it does not load."""
    from saliency_service.core.repository import ModelHandle  # noqa: PLC0415

    handle = ModelHandle(package.parent.name, int(package.name), package)
    handle.load()
    if not handle.ready:
        raise RuntimeError(f"{package} does not load: {handle.error}")
    return handle


def gradient_gflop(package: Path, images: int = 2) -> float:
    """GFLOP of one forward and one input-gradient backward pass per image of a package's
    prepared program (what one Integrated Gradients step costs), as ``flop_count_mode``
    counts them (convolutions and matrix products)."""
    import torch  # noqa: PLC0415

    from saliency_service.methods._utils.torch_program import FAST, prepared_module  # noqa: PLC0415

    handle = loaded_handle(package)
    spec = handle.spec().input
    module = prepared_module(handle, FAST)
    x = torch.rand(images, spec.channels, spec.height, spec.width).requires_grad_(True)
    with flop_count_mode() as counter:
        module(x)[0][:, 0].sum().backward()
    return counter.flops / images / 1e9


# ---- output ----------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (missing cells blank)."""
    rows = list(rows)
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load and library versions, so absolute numbers can be judged."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for module in ("torch", "onnxruntime", "grpc", "captum"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing library is simply not listed
            continue
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "versions": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Writes ``results/<name>.json`` with the machine description added."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    document = {"benchmark": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class _BenchParser(argparse.ArgumentParser):
    """Fills ``--out`` after parsing: ``benchmarks/results`` for a full run, and a folder
    outside the repository for ``--quick``, whose figures must not replace the committed
    ones."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        if getattr(parsed, "out", None) is None:
            parsed.out = QUICK_RESULTS if getattr(parsed, "quick", False) else RESULTS
        return parsed, rest


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = _BenchParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help=f"a fast smoke run (results in {QUICK_RESULTS} unless --out)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {RESULTS.relative_to(ROOT)}; with "
                        f"--quick {QUICK_RESULTS})")
    return parser


# ---- inputs and model repositories -----------------------------------------------------------


def png_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Deterministic smooth RGB test pictures (blobs on a gradient), PNG-encoded."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for _ in range(count):
        canvas = np.stack([xx, yy, 1 - xx], axis=-1) * 0.4
        for _blob in range(4):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            radius = rng.uniform(0.05, 0.15)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
            canvas += blob[..., None] * rng.uniform(0.2, 0.6, 3)
        pixels = (np.clip(canvas, 0, 1) * 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        images.append(out.getvalue())
    return images


# The architectures the suites measure, by their ``--models`` name: the demo network and the
# ResNet-50 shape (random weights: only cost matters), as (class in zoo.architectures or
# tests.architectures, classes).
ARCHITECTURES: dict[str, tuple[str, int]] = {
    "demo": ("DemoResNet", 10),
    "resnet50": ("ResNet50Shape", 1000),
}


def random_model(architecture: str) -> Any:
    """A new ``architecture`` (a key of ARCHITECTURES) with seed-0 random weights, in eval
    mode; an unknown name is an error, never silently another architecture."""
    import torch  # noqa: PLC0415

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from "
                         f"{','.join(ARCHITECTURES)}")
    class_name, classes = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    return architecture_class(class_name)(num_classes=classes).eval()


def architecture_class(name: str) -> Any:
    """A network class by name: the shipped models' (``zoo.architectures``) or the ones
    only tests and benchmarks use (``tests.architectures``)."""
    from saliency_service.zoo import architectures  # noqa: PLC0415
    from tests import architectures as test_architectures  # noqa: PLC0415

    return getattr(architectures, name, None) or getattr(test_architectures, name)


def model_names(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """A comma-separated ``--models`` value; an unknown name ends the run before anything
    is built or measured."""
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {','.join(ARCHITECTURES)}")
    return names


def cached_package(architecture: str, size: int, root: Path, name: str,
                   verify_inputs: int = 4) -> Path:
    """Exports ``random_model(architecture)`` into ``root`` once and returns ``root``; the
    ResNet-50 shape gets ImageNet normalization. Its scale modules are named explicitly."""
    if (root / name / "1" / "manifest.json").is_file():
        return root
    from saliency_service.packaging.export import export_package  # noqa: PLC0415

    model = random_model(architecture)
    if architecture == "resnet50":
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    else:
        mean, std = [0.5] * 3, [0.25] * 3
    export_package(
        model, name=name, version=1, input_shape=(3, size, size), mean=mean, std=std,
        class_labels=[], repository=root, scale_modules=model.scale_modules(),
        cam_layer=model.cam_layer, head="fc", overwrite=True, verify_inputs=verify_inputs,
    )
    return root


def demo_repository() -> Path:
    """The shipped demo package's repository, or a random-weight DemoResNet stand-in (same
    cost) exported into the cache when ``models/demo/1`` is not there yet."""
    if (DEMO_MODELS / "demo" / "1" / "manifest.json").is_file():
        return DEMO_MODELS
    return cached_package("demo", 128, CACHE / "demo-standin", "demo")


def sized_repository(architecture: str, size: int) -> Path:
    """A cached repository with one random-weight package named ``architecture`` (``demo`` =
    DemoResNet, ``resnet50`` = ResNet50Shape) whose input is ``size``×``size``: the package
    every suite measures, exported once for all of them, with ``random_model``'s weights."""
    if architecture == "resnet50":
        return resnet50_repository(size)
    return cached_package("demo", size, CACHE / f"demo-{size}", "demo", verify_inputs=1)


def resnet50_repository(size: int = 224, name: str = "resnet50") -> Path:
    """A repository holding ``ResNet50Shape`` (random weights, seed 0) at ``size``², cached."""
    return cached_package("resnet50", size, CACHE / f"resnet50-{size}", name, verify_inputs=1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """``saliency serve`` on a free loopback port in a subprocess; a context manager.

    ``flags`` are extra config flags, e.g. ``{"max_inflight": 2, "max_queue": 2}``;
    ``root`` is the source tree it runs from (another commit's worktree for an A/B run);
    ``env`` adds environment variables.
    """

    def __init__(
        self,
        models: Path,
        flags: dict[str, Any] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 180.0,
        root: Path = ROOT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.models = Path(models)
        self.root = Path(root)
        self.flags = dict(flags or {})
        self.env = dict(env or {})
        self.port = free_port()
        self.log_path = log_path or Path(
            tempfile.mkstemp(prefix="saliency-serve-", suffix=".log")[1]
        )
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def start(self) -> ServerProcess:
        command = [
            sys.executable,
            "-m",
            "saliency_service.cli",
            "serve",
            "--models",
            str(self.models),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            "-1",
        ]
        for key, value in self.flags.items():
            command += ["--" + key.replace("_", "-"), str(value)]
        env = dict(os.environ, **self.env,
                   PYTHONPATH=str(self.root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import grpc  # noqa: PLC0415
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        deadline = time.monotonic() + self.ready_timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.process.returncode}:\n"
                        + self.log_path.read_text()[-3000:]
                    )
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service="saliency.v1.Explainer"), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(
            f"server not ready after {self.ready_timeout:.0f} s; log "
            f"{self.log_path}:\n" + self.log_path.read_text()[-3000:]
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


# ---- a TorchServe subprocess (the peer, and the adapter's integration test) ------------------


def torchserve_missing() -> str:
    """Why TorchServe cannot run here ("" when it can): its launcher and Java 11+."""
    import shutil  # noqa: PLC0415

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "torchserve").exists() and shutil.which("torchserve") is None:
        return "the torchserve launcher is not installed (pip install 'torchserve==0.12.*')"
    if shutil.which("java") is None:
        return "TorchServe's frontend needs Java 11+ and `java` is not on PATH"
    return ""


class TorchServeProcess:
    """TorchServe 0.12 in the foreground on three free loopback ports, token auth off.

    Its own TMPDIR keeps its pid file apart from any other TorchServe on the machine; the
    whole process group (launcher, Java frontend, Python workers) is stopped on exit.
    """

    def __init__(
        self,
        model_store: Path,
        models: str,
        workdir: Path,
        workers: int = 1,
        env: dict[str, str] | None = None,
        ready_timeout: float = 240.0,
    ) -> None:
        self.model_store = Path(model_store)
        self.models = models  # e.g. "tiny=tiny.mar"
        self.workdir = Path(workdir)
        self.workers = workers
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.inference_port, self.management_port, self.metrics_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def start(self) -> TorchServeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.inference_port}",
                    f"management_address=http://127.0.0.1:{self.management_port}",
                    f"metrics_address=http://127.0.0.1:{self.metrics_port}",
                    "disable_token_authorization=true",
                    "enable_envvars_config=true",
                    f"default_workers_per_model={self.workers}",
                    "default_response_timeout=600",
                    "max_response_size=268435456",
                    "max_request_size=67108864",
                    "disable_system_metrics=true",
                    # Worker sockets are /tmp/.ts.sock.<port>: a port of our own keeps two
                    # TorchServes on one machine (test, benchmark) off each other's workers.
                    f"initial_worker_port={free_port()}",
                    "",
                ]
            )
        )
        launcher = Path(sys.executable).parent / "torchserve"
        command = [
            str(launcher) if launcher.exists() else "torchserve",
            "--start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.model_store),
            "--models",
            self.models,
        ]
        env = dict(os.environ, TMPDIR=str(self.workdir / "tmp"), **self.env)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = self.workdir / "torchserve.log"
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        deadline = time.monotonic() + self.ready_timeout
        names = [spec.split("=")[0] for spec in self.models.split(",")]
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"TorchServe exited with {self.process.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-4000:]
                )
            try:
                ready = True
                for name in names:
                    with urllib.request.urlopen(
                        f"{self.management_url}/models/{name}", timeout=5
                    ) as reply:
                        status = json.loads(reply.read())
                    workers = status[0].get("workers", [])
                    ready &= bool(workers) and all(w.get("status") == "READY" for w in workers)
                if ready:
                    return
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(1.0)
        log = self.log_path.read_text(errors="replace")[-4000:]
        self.stop()
        raise TimeoutError(f"TorchServe not ready after {self.ready_timeout:.0f} s:\n{log}")

    def worker_pids(self) -> list[int]:
        import psutil  # noqa: PLC0415 - a TorchServe dependency

        if self.process is None:
            return []
        children = psutil.Process(self.process.pid).children(recursive=True)
        return [c.pid for c in children if "model_service_worker" in " ".join(c.cmdline())]

    def stop(self) -> None:
        """Stops the whole group and waits until it is gone: the Java frontend and the
        Python workers outlive the launcher by a few seconds, and whatever is timed next
        would share the cores with their exit."""
        import signal  # noqa: PLC0415

        if self.process is None or self.process.poll() is not None:
            return
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(10)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)

    def __enter__(self) -> TorchServeProcess:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


def archive_package(package: Path, export_dir: Path) -> Path:
    """``deploy/torchserve/archive.sh``: a model package → ``<export_dir>/<name>.mar``."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "torchserve" / "archive.sh"), str(package), str(export_dir)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    name = json.loads((Path(package) / "manifest.json").read_text())["name"]
    return Path(export_dir) / f"{name}.mar"
