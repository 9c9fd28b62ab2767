"""Runs every benchmark suite (``benchmarks/*.py``) and writes ``results/summary.md``.

Each suite runs as its own process (``python -m benchmarks.<name> [--quick]``) so one
failure or memory spike does not take the others down; the summary quotes each suite's
printed report and where its JSON is.

    python -m benchmarks.run_all [--quick] [--only load,peers] [--skip scaling]

Results go to ``benchmarks/results``; a ``--quick`` smoke run's go to
``common.QUICK_RESULTS`` (outside the repository) unless ``--out`` says where.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, base_parser, machine_info

# grpc_floor: a server peers starts; memory: run on its own (python -m benchmarks.memory);
# loopback: the network stand-ins of replicas; openvino_xai and decam_budget take longer than
# a suite's share of make bench, so they run on their own.
NOT_SUITES = {"__init__", "common", "run_all", "grpc_floor", "memory", "loopback",
              "openvino_xai", "decam_budget"}
# Fast suites first; the long peer comparison last.
ORDER = (
    "gradients",
    "precision",
    "warmup",
    "multiscale",
    "multiscale_cells",
    "decam",
    "localization",
    "scaling",
    "http_latency",
    "load",
    "replicas",
    "peers",
)


def discover() -> list[str]:
    """Every runnable suite under ``benchmarks/``, in a stable order."""
    names = sorted(
        p.stem
        for p in (ROOT / "benchmarks").glob("*.py")
        if p.stem not in NOT_SUITES and not p.stem.startswith("_")
    )
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def run_suite(name: str, quick: bool, out: Path, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", f"benchmarks.{name}"]
    if quick:
        command.append("--quick")
    if out != RESULTS:  # suites name their results folder --out, or their file --output
        source = (ROOT / "benchmarks" / f"{name}.py").read_text()
        if '"--out"' in source or "base_parser(" in source:
            command += ["--out", str(out)]
        elif '"--output"' in source:
            command += ["--output", str(out / f"{name}.json")]
    started = time.perf_counter()
    log_path = out / f"{name}.log"
    try:
        with log_path.open("w") as log_file:
            completed = subprocess.run(
                command,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        code: int | str = completed.returncode
    except subprocess.TimeoutExpired:
        code = f"timeout after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    return {
        "name": name,
        "exit": code,
        "seconds": seconds,
        "log": str(log_path),
        "json": str(out / f"{name}.json") if (out / f"{name}.json").is_file() else "",
    }


def _excerpt(name: str, out: Path, log: str, limit: int = 6000) -> str:
    """A suite's own report text from its JSON, else the tail of its output."""
    path = out / f"{name}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
        for key in ("report", "table", "summary"):
            if isinstance(data.get(key), str) and data[key].strip():
                return data[key].strip()[:limit]
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    return text.strip()[-limit:]


def summary_markdown(
    runs: list[dict[str, Any]], quick: bool, out: Path, total_seconds: float
) -> str:
    machine = machine_info()
    command = "python -m benchmarks.run_all" + (" --quick" if quick else "")
    if not runs:
        command = "python -m benchmarks.run_all --summarize (results of earlier runs, as dated)"
    lines = [
        "# Benchmark summary",
        "",
        f"Command: `{command}` (`make bench` runs them all), {machine['time_utc']}.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average "
        f"{machine['load_average'][0]:.1f} at the end; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        + ".",
        f"Total {total_seconds / 60:.1f} min. Ratios measured side by side in one run are "
        "the meaningful numbers; absolute times depend on the machine and its load.",
        "",
        "| suite | exit | seconds | results |",
        "| --- | --- | --- | --- |",
    ]
    for run in runs:
        lines.append(
            f"| {run['name']} | {run['exit']} | {run['seconds']:.0f} | "
            f"{Path(run['json']).name if run['json'] else '(none)'} |"
        )
    ran = {run["name"] for run in runs}
    earlier = [name for name in discover() if name not in ran and (out / f"{name}.json").is_file()]
    for name in earlier:
        stamp = time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime((out / f"{name}.json").stat().st_mtime)
        )
        lines.append(f"| {name} | (earlier run, {stamp}) | | {name}.json |")
    for run in runs:
        lines += ["", f"## {run['name']}", "", "```", _excerpt(run["name"], out, run["log"]), "```"]
    for name in earlier:
        lines += [
            "",
            f"## {name} (earlier run)",
            "",
            "```",
            _excerpt(name, out, str(out / f"{name}.log")),
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated suite names")
    parser.add_argument("--skip", default="", help="comma-separated suite names to leave out")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="run nothing; rewrite summary.md from the results already there",
    )
    parser.add_argument("--timeout", type=float, help="seconds per suite (default 900, quick 600)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = discover()
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown suites {unknown}; available: {names}")
        names = [n for n in names if n in wanted]
    names = [n for n in names if n not in set(args.skip.split(","))]
    if args.summarize:
        names = []  # nothing runs: the summary quotes the results already there
    timeout = args.timeout or (600.0 if args.quick else 900.0)
    started = time.perf_counter()
    runs = []
    for name in names:
        print(f"== {name} ...", flush=True)
        run = run_suite(name, args.quick, out, timeout)
        print(f"   exit {run['exit']} in {run['seconds']:.0f} s", flush=True)
        runs.append(run)
    text = summary_markdown(runs, args.quick, out, time.perf_counter() - started)
    path = out / "summary.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")
    return 0 if all(r["exit"] == 0 for r in runs) else 1  # (no runs: 0)


if __name__ == "__main__":
    raise SystemExit(main())
