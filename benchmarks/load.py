"""gRPC load generator: throughput, tail latency and status codes under load and overload.

Closed loop (N clients, each sending its next request when the last one returns) measures
capacity; open loop (arrivals at a fixed rate, whatever the server does) shows overload
behaviour, which closed loops hide. Every run is bounded by a request count and a duration
and talks to loopback only. Scenarios: the fast path (SMOE Scale when offered, else Predict),
gradient methods, DE-CAM, a realistic mix, an overload run at 3× the measured capacity,
and a memory run (server RSS after 1,000 and after 10,000 mixed requests).

``--scenario mixed-costs`` is a separate run: many closed-loop clients sending the fast call
and the slowest one equally often, on a fresh server per ``max_queue_wait_ms`` setting (off,
then each ``--wait-sweep`` value), reporting how long the accepted requests of each kind
waited for a worker (from the server's request log) beside their latency.

    python -m benchmarks.load [--quick] [--server HOST:PORT] [--models DIR --model NAME]
    python -m benchmarks.load --scenario mixed-costs --clients 40 --max-queue 4
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import (
    ServerProcess,
    base_parser,
    demo_repository,
    percentiles,
    png_images,
    table,
    write_json,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


@dataclass(frozen=True)
class Call:
    """One kind of request in a scenario, drawn with probability ∝ ``weight``."""

    label: str
    rpc: str  # "Explain" or "Predict"
    request: Any
    weight: float = 1.0


@dataclass
class Outcome:
    label: str
    code: str
    seconds: float
    finished: float  # seconds since the run started
    server_seconds: float | None = None  # the response's Cost.wall_seconds (execution only)


@dataclass
class RunResult:
    """Everything one bounded run observed."""

    mode: str
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0
    offered_rate: float = 0.0
    sent_rate: float = 0.0  # what the client managed to send (open loop)
    concurrency: int = 0
    client_cpu_seconds: float = 0.0  # the load generator's own CPU time (it shares the host)

    def counts(self) -> dict[str, int]:
        return dict(Counter(o.code for o in self.outcomes))

    def summary(self) -> dict[str, Any]:
        ok = [o.seconds for o in self.outcomes if o.code == "OK"]
        elapsed = max(self.elapsed, 1e-9)
        per_label = {}
        for label in sorted({o.label for o in self.outcomes}):
            mine = [o for o in self.outcomes if o.label == label]
            per_label[label] = {
                "counts": dict(Counter(o.code for o in mine)),
                **percentiles([o.seconds for o in mine if o.code == "OK"]),
            }
        return {
            "mode": self.mode,
            "requests": len(self.outcomes),
            "elapsed_s": self.elapsed,
            "concurrency": self.concurrency,
            "offered_rate": self.offered_rate,
            "throughput_ok": len(ok) / elapsed,
            "throughput_all": len(self.outcomes) / elapsed,
            "counts": self.counts(),
            "latency_ok": percentiles(ok),
            "latency_all": percentiles([o.seconds for o in self.outcomes]),
            # Execution alone, as the server measured it; the rest of latency_ok is waiting
            # for a worker and transport.
            "execution_ok": percentiles(
                [o.server_seconds for o in self.outcomes if o.server_seconds is not None]
            ),
            "client_cpu_share": self.client_cpu_seconds / elapsed,
            "per_label": per_label,
        }


class Picker:
    """Weighted, seeded choice among a scenario's calls."""

    def __init__(self, calls: list[Call], seed: int = 0) -> None:
        if not calls:
            raise ValueError("a scenario needs at least one call")
        self.calls = calls
        self.weights = [c.weight for c in calls]
        self.rng = random.Random(seed)

    def __call__(self) -> Call:
        return self.rng.choices(self.calls, self.weights)[0]


async def _send(stub: pb_grpc.ExplainerStub, call: Call, timeout: float, started: float) -> Outcome:
    begin = time.perf_counter()
    server_seconds = None
    try:
        response = await getattr(stub, call.rpc)(call.request, timeout=timeout)
        code = "OK"
        server_seconds = response.cost.wall_seconds
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    end = time.perf_counter()
    return Outcome(call.label, code, end - begin, end - started, server_seconds)


async def closed_loop(
    address: str,
    picker: Picker,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    timeout: float = 30.0,
) -> RunResult:
    """``concurrency`` clients back to back until ``max_requests`` or ``max_seconds``."""
    result = RunResult("closed", concurrency=concurrency)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        started = time.perf_counter()
        cpu_started = time.process_time()
        stop_at = started + max_seconds
        issued = 0

        async def client() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < stop_at:
                issued += 1
                result.outcomes.append(await _send(stub, picker(), timeout, started))

        await asyncio.gather(*(client() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
        result.client_cpu_seconds = time.process_time() - cpu_started
    return result


async def open_loop(
    address: str,
    picker: Picker,
    rate: float,
    max_requests: int,
    max_seconds: float,
    timeout: float = 30.0,
) -> RunResult:
    """Requests at ``rate`` per second (evenly spaced), whatever the server's state, until
    ``max_requests`` are sent or ``max_seconds`` pass; then waits for the stragglers."""
    result = RunResult("open", offered_rate=rate)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        started = time.perf_counter()
        cpu_started = time.process_time()
        tasks: set[asyncio.Task[Outcome]] = set()

        def done(task: asyncio.Task[Outcome]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is None:
                result.outcomes.append(task.result())

        for index in range(max_requests):
            due = started + index / rate
            if due - started > max_seconds:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(_send(stub, picker(), timeout, started))
            tasks.add(task)
            task.add_done_callback(done)
        sending = time.perf_counter() - started
        sent = len(tasks) + len(result.outcomes)
        result.sent_rate = sent / sending if sending > 0 else 0.0
        if tasks:
            await asyncio.wait(set(tasks))
        result.elapsed = time.perf_counter() - started
        result.client_cpu_seconds = time.process_time() - cpu_started
    return result


# ---- scenarios -------------------------------------------------------------------------------


def _explain(model: str, method: str, image: bytes, params: Any = None) -> pb.ExplainRequest:
    request = pb.ExplainRequest(
        model=model,
        method=pb.Method.Value("METHOD_" + method.upper()),
        input=pb.Input(images=pb.EncodedImages(images=[image])),
        seed=1,
    )
    if params is not None:
        getattr(request, method).CopyFrom(params)
    return request


def scenarios(
    info: pb.ModelInfo, model: str, image: bytes, quick: bool = False
) -> dict[str, list[Call]]:
    """The request mixes, built from the methods the model offers."""
    offered = {m.name for m in info.methods}
    predict = Call(
        "predict",
        "Predict",
        pb.PredictRequest(model=model, input=pb.Input(images=pb.EncodedImages(images=[image]))),
    )
    fast = (
        Call("smoe_scale", "Explain", _explain(model, "smoe_scale", image))
        if "smoe_scale" in offered
        else predict
    )
    gradient_calls = [
        Call(name, "Explain", _explain(model, name, image, params))
        for name, params in (
            ("vanilla_gradient", None),
            ("gradcam", None),
            ("smoothgrad", pb.SmoothGradParams(samples=8)),
            ("integrated_gradients", pb.IntegratedGradientsParams(steps=16)),
        )
        if name in offered
    ]
    decam_params = (
        pb.DecamParams(population=8, generations=4, patience=0)
        if quick
        else pb.DecamParams(population=16, generations=10, patience=0)
    )
    slow_calls = (
        [Call("decam", "Explain", _explain(model, "decam", image, decam_params))]
        if "decam" in offered
        else [
            Call(
                "occlusion",
                "Explain",
                _explain(model, "occlusion", image, pb.OcclusionParams(window=32, stride=16)),
            )
        ]
        if "occlusion" in offered
        else []
    )
    result: dict[str, list[Call]] = {"fast": [fast]}
    if gradient_calls:
        result["gradients"] = gradient_calls
    if slow_calls:
        result["decam" if "decam" in offered else "occlusion"] = slow_calls
    mix = [
        Call(fast.label, fast.rpc, fast.request, 5.0),
        Call("predict", "Predict", predict.request, 1.0),
    ]
    mix += [Call(c.label, c.rpc, c.request, 3.0 / len(gradient_calls)) for c in gradient_calls]
    mix += [Call(c.label, c.rpc, c.request, 0.5) for c in slow_calls]
    result["mix"] = mix
    # Mixed but cheap, for the 10,000-request memory run.
    result["memory_mix"] = [c for c in mix if c.label not in ("decam", "occlusion")]
    return result


async def _warm(address: str, calls: list[Call], timeout: float) -> dict[str, str]:
    """One request of each kind (first-call costs out of the way); returns their codes."""
    codes = {}
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for call in calls:
            codes[call.label] = (await _send(stub, call, timeout, time.perf_counter())).code
    return codes


def _row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    latency = summary["latency_ok"]
    counts = summary["counts"]
    return {
        "run": name,
        "mode": summary["mode"],
        "load": (
            f"{summary['concurrency']} clients"
            if summary["mode"] == "closed"
            else f"{summary['offered_rate']:.1f}/s"
        ),
        "requests": summary["requests"],
        "ok/s": summary["throughput_ok"],
        "p50 ms": latency["p50_ms"],
        "p95 ms": latency["p95_ms"],
        "p99 ms": latency["p99_ms"],
        "max ms": latency["max_ms"],
        "codes": " ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
    }


async def _get_model(address: str, model: str) -> pb.ModelInfo:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        return await pb_grpc.ExplainerStub(channel).GetModel(
            pb.GetModelRequest(model=model), timeout=30
        )


async def run_suite(
    address: str,
    model: str,
    quick: bool,
    server: ServerProcess | None,
    max_inflight: int,
    overload_scenarios: tuple[str, ...] = ("mix",),
    timeout: float = 30.0,
    known_capacity: dict[str, float] | None = None,
) -> dict[str, Any]:
    """All scenarios against one server; returns the JSON-ready results.

    With ``known_capacity`` only the overload scenarios run (unloaded, then 3× that
    capacity): how another admission setting of the same server handles the same overload.
    """
    info = await _get_model(address, model)
    size = int(info.input.shape[-1])
    image = png_images(1, size, seed=3)[0]
    mixes = scenarios(info, model, image, quick)
    warm_codes = await _warm(address, [c for calls in mixes.values() for c in calls], timeout)
    failing = {k: v for k, v in warm_codes.items() if v != "OK"}
    for calls_name, calls in list(mixes.items()):  # drop calls the server refuses outright
        kept = [c for c in calls if c.label not in failing]
        if kept:
            mixes[calls_name] = kept
        else:
            del mixes[calls_name]
    requests, seconds = (40, 4.0) if quick else (300, 15.0)
    # A sweep server repeats only the overloads, at the first server's capacity, for two
    # thirds of the time: still hundreds of accepted requests for the p99, a shorter suite.
    sweep = known_capacity is not None
    overload_seconds = seconds * 2.0 / 3.0 if sweep else seconds
    runs: dict[str, Any] = {}
    capacity: dict[str, float] = {}
    unloaded_p99: dict[str, float] = {}
    for name, calls in mixes.items():
        if name == "memory_mix" or (sweep and name not in overload_scenarios):
            continue
        # The slow methods get fewer requests: their runs only give the capacity row.
        budget = requests // 8 if name in ("decam", "occlusion") else requests
        alone = await closed_loop(address, Picker(calls, 1), 1, budget, seconds, timeout)
        runs[f"{name}/unloaded"] = alone.summary()
        unloaded_p99[name] = runs[f"{name}/unloaded"]["latency_ok"]["p99_ms"]
        if sweep:
            capacity[name] = known_capacity.get(name, 0.0)
            continue
        saturated = await closed_loop(
            address, Picker(calls, 2), 2 * max_inflight, budget, seconds, timeout
        )
        runs[f"{name}/capacity"] = saturated.summary()
        capacity[name] = runs[f"{name}/capacity"]["throughput_ok"]

    overload: dict[str, Any] = {}
    for name in overload_scenarios:
        if name not in mixes or capacity.get(name, 0) <= 0:
            continue
        calls = mixes[name]
        if not sweep:  # below capacity, once per server configuration
            half = await open_loop(
                address, Picker(calls, 3), 0.5 * capacity[name], requests, seconds, timeout
            )
            runs[f"{name}/open-0.5x"] = half.summary()
        rate = 3.0 * capacity[name]
        over = await open_loop(address, Picker(calls, 4), rate, int(rate * overload_seconds) + 1,
                               overload_seconds, timeout)
        runs[f"{name}/overload-3x"] = summary = over.summary()
        accepted_p99 = summary["latency_ok"]["p99_ms"]
        overload[name] = entry = {
            "scenario": name,
            "offered_rate": rate,
            "sent_rate": over.sent_rate,
            "capacity": capacity[name],
            "counts": summary["counts"],
            "resource_exhausted": summary["counts"].get("RESOURCE_EXHAUSTED", 0),
            "deadline_exceeded": summary["counts"].get("DEADLINE_EXCEEDED", 0),
            "unloaded_p99_ms": unloaded_p99[name],
            "accepted_p99_ms": accepted_p99,
            "p99_ratio": accepted_p99 / max(unloaded_p99[name], 1e-9),
            "unloaded_execution_p99_ms": runs[f"{name}/unloaded"]["execution_ok"]["p99_ms"],
            "accepted_execution_p99_ms": summary["execution_ok"]["p99_ms"],
            "client_cpu_share": summary["client_cpu_share"],
            "server_alive": server.alive() if server is not None else None,
        }
        entry["p99_within_2x"] = entry["p99_ratio"] <= 2.0

    memory: dict[str, Any] = {}
    if server is not None and "memory_mix" in mixes and not sweep:
        first, total = (100, 1000) if quick else (1000, 10000)
        picker = Picker(mixes["memory_mix"], 5)
        warm = await closed_loop(address, picker, max_inflight, first, 600.0, timeout)
        rss_first = server.rss_kib()
        rest = await closed_loop(address, picker, max_inflight, total - first, 1200.0, timeout)
        rss_last = server.rss_kib()
        counts = Counter(warm.counts()) + Counter(rest.counts())
        memory = {
            "requests_first": len(warm.outcomes),
            "rss_first_kib": rss_first,
            "requests_total": len(warm.outcomes) + len(rest.outcomes),
            "rss_last_kib": rss_last,
            "growth": rss_last / rss_first - 1.0,
            "counts": dict(counts),
            "throughput_ok": (counts["OK"] / max(warm.elapsed + rest.elapsed, 1e-9)),
        }
        memory["within_10_percent"] = abs(memory["growth"]) <= 0.10
    return {
        "model": model,
        "input_size": size,
        "warm_codes": warm_codes,
        "capacity": capacity,
        "unloaded_p99_ms": unloaded_p99,
        "runs": runs,
        "overload": overload,
        "memory": memory,
        "scenarios": {k: [c.label for c in v] for k, v in mixes.items()},
    }


def _execution_line(overload: dict[str, Any]) -> str:
    """Where the accepted tail comes from: execution slowed by sharing the cores, or waiting."""
    unloaded = overload["unloaded_execution_p99_ms"]
    loaded = overload["accepted_execution_p99_ms"]
    ratio = loaded / unloaded if unloaded > 0 else float("nan")
    return (
        f"  execution alone (server-measured) p99 {loaded:.1f} ms vs {unloaded:.1f} ms "
        f"unloaded = {ratio:.2f}×; the load generator used "
        f"{overload['client_cpu_share'] * 100:.0f}% of a core on the same host"
    )


def report(results: dict[str, Any]) -> str:
    """The printed table plus the overload and memory verdicts."""
    config = results.get("server_config", {})
    lines = [
        f"model {results['model']} ({results['input_size']}²), server "
        + ", ".join(f"{k}={v}" for k, v in config.items()),
        "",
        table([_row(k, v) for k, v in results["runs"].items()]),
    ]
    for overload in (results.get("overload") or {}).values():
        lines.append(
            f"overload ({overload['scenario']}, {overload['offered_rate']:.1f}/s offered = 3× "
            f"capacity {overload['capacity']:.1f}/s, {overload['sent_rate']:.1f}/s sent): "
            f"codes {overload['counts']}; accepted p99 "
            f"{overload['accepted_p99_ms']:.1f} ms vs unloaded p99 "
            f"{overload['unloaded_p99_ms']:.1f} ms = {overload['p99_ratio']:.2f}× "
            f"({'within' if overload['p99_within_2x'] else 'NOT within'} 2×); server alive: "
            f"{overload['server_alive']}"
        )
        lines.append(_execution_line(overload))
    for variant, other in (results.get("admission_sweep") or {}).items():
        for overload in other["overload"].values():
            lines.append(
                f"  with {variant}: overload ({overload['scenario']}) codes "
                f"{overload['counts']}; accepted p99 {overload['accepted_p99_ms']:.1f} ms vs "
                f"unloaded {overload['unloaded_p99_ms']:.1f} ms = {overload['p99_ratio']:.2f}×"
            )
            lines.append("  " + _execution_line(overload))
    memory = results.get("memory")
    if memory:
        lines.append(
            f"memory: RSS {memory['rss_first_kib'] / 1024:.1f} MiB after "
            f"{memory['requests_first']} requests, {memory['rss_last_kib'] / 1024:.1f} MiB "
            f"after {memory['requests_total']} ({memory['growth'] * 100:+.1f}%, "
            f"{'within' if memory['within_10_percent'] else 'NOT within'} 10%)"
        )
    return "\n".join(lines) + "\n"


# ---- cheap requests beside expensive ones ----------------------------------------------------


def server_queue_waits(log_path: Path, offset: int = 0) -> dict[str, list[float]]:
    """Seconds each successful request waited for a worker, by method, from the JSON request
    lines a server wrote to ``log_path`` after byte ``offset``."""
    waits: dict[str, list[float]] = {}
    with log_path.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "request" and entry.get("code") == "OK":
            waits.setdefault(entry["method"], []).append(entry["queue_ms"] / 1000.0)
    return waits


def mixed_cost_calls(info: pb.ModelInfo, model: str, image: bytes, quick: bool) -> list[Call]:
    """The fast call and the slowest one of ``scenarios``, equally likely."""
    mixes = scenarios(info, model, image, quick)
    slow = mixes.get("decam") or mixes.get("occlusion")
    if not slow:
        raise SystemExit(f"{model} offers neither DE-CAM nor occlusion")
    return [mixes["fast"][0], slow[0]]


async def mixed_costs(
    process: ServerProcess, calls: list[Call], clients: int, seconds: float, timeout: float
) -> dict[str, Any]:
    """``clients`` closed-loop clients on ``calls`` for ``seconds`` against a started server,
    after one warm-up of each call (so admission has measured them) and an unloaded run of
    the first: per call, the counts, the accepted requests' latency and their queue waits."""
    await _warm(process.address, calls, timeout)
    alone = await closed_loop(process.address, Picker(calls[:1], 1), 1, 200, seconds / 4, timeout)
    offset = process.log_path.stat().st_size
    loaded = await closed_loop(process.address, Picker(calls, 2), clients, 10**7, seconds,
                               timeout)
    await asyncio.sleep(0.5)  # the server writes its log lines in batches
    waits = server_queue_waits(process.log_path, offset)
    summary = loaded.summary()
    return {
        "clients": clients,
        "seconds": loaded.elapsed,
        "unloaded": {calls[0].label: alone.summary()["latency_ok"]},
        "per_call": {
            call.label: {
                **summary["per_label"].get(call.label, {"counts": {}}),
                "ok_per_second": summary["per_label"].get(call.label, {}).get("count", 0)
                / max(loaded.elapsed, 1e-9),
                "queue_wait": percentiles(waits.get(call.label, [])),
            }
            for call in calls
        },
        "client_cpu_share": summary["client_cpu_share"],
    }


def mixed_costs_report(results: dict[str, Any]) -> str:
    """One row per admission setting and call: counts, latency and queue wait (ms)."""
    rows = []
    for setting, run in results["settings"].items():
        for label, entry in run["per_call"].items():
            counts = entry["counts"]
            wait = entry["queue_wait"]
            rows.append({
                "admission": setting,
                "call": label,
                "OK": counts.get("OK", 0),
                "refused": sum(v for k, v in counts.items() if k != "OK"),
                "ok/s": entry["ok_per_second"],
                "latency p50": entry.get("p50_ms", 0.0),
                "latency p99": entry.get("p99_ms", 0.0),
                "queue p50": wait["p50_ms"],
                "queue p99": wait["p99_ms"],
                "queue max": wait["max_ms"],
            })
    first = next(iter(results["settings"].values()))
    label, unloaded = next(iter(first["unloaded"].items()))
    return (
        f"model {results['model']}, {first['clients']} closed-loop clients, "
        + ", ".join(f"{k}={v}" for k, v in results["server_config"].items())
        + f"; {label} unloaded p99 {unloaded['p99_ms']:.1f} ms\n\n"
        + table(rows)
    )


def run_mixed_costs(args: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The mixed-costs scenario on a fresh server per ``max_queue_wait_ms`` setting."""
    models = args.models or demo_repository()
    seconds = 4.0 if args.quick else 15.0
    results: dict[str, Any] = {"model": args.model, "server_config": config, "settings": {}}
    for wait_ms in [0.0, *args.wait_sweep]:
        with ServerProcess(models, {**config, "max_queue_wait_ms": wait_ms}) as process:

            async def run(process: ServerProcess = process) -> dict[str, Any]:
                info = await _get_model(process.address, args.model)
                image = png_images(1, int(info.input.shape[-1]), seed=3)[0]
                calls = mixed_cost_calls(info, args.model, image, args.quick)
                return await mixed_costs(process, calls, args.clients, seconds, args.timeout)

            results["settings"][f"max_queue_wait_ms={wait_ms:g}"] = asyncio.run(run())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--server", help="an already running server (default: start one)")
    parser.add_argument("--models", type=Path, help="model repository (default: the demo)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--max-inflight", type=int, default=2)
    parser.add_argument(
        "--max-queue",
        type=int,
        default=2,
        help="queue bound of the started server; it bounds queueing delay, "
        "hence the accepted requests' tail latency under overload",
    )
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument(
        "--overload-scenarios", help="comma-separated (default mix,gradients; quick: mix)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline")
    parser.add_argument(
        "--queue-sweep",
        type=lambda t: [int(v) for v in t.split(",") if v],
        default=None,
        help="max_queue values to repeat the overload runs with (default 16, the server's "
        "default; quick: none; 0 = no queue)",
    )
    parser.add_argument(
        "--wait-sweep",
        type=lambda t: [float(v) for v in t.split(",") if v],
        default=None,
        help="max_queue_wait_ms values to repeat the overload runs with, at the default "
        "max_queue=16 (default 25; quick: none), or, with --scenario mixed-costs, to run it "
        "with after the run without (default 25)",
    )
    parser.add_argument(
        "--scenario",
        choices=("suite", "mixed-costs"),
        default="suite",
        help="suite: every scenario above; mixed-costs: the fast and the slowest call from "
        "--clients closed-loop clients, per max_queue_wait_ms setting (off, then --wait-sweep)",
    )
    parser.add_argument("--clients", type=int, default=40, help="mixed-costs: clients")
    parser.add_argument("--name", help="results/<name>.json (default load, or load-<scenario>)")
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = "load" if args.scenario == "suite" else f"load-{args.scenario}"
    if args.queue_sweep is None:
        args.queue_sweep = [] if args.quick or args.max_queue == 16 else [16]
    if args.wait_sweep is None:
        args.wait_sweep = [] if args.quick and args.scenario == "suite" else [25.0]
    overload_names = (args.overload_scenarios or ("mix" if args.quick else "mix,gradients")).split(
        ","
    )
    server = None
    address = args.server
    config = {
        "max_inflight": args.max_inflight,
        "max_queue": args.max_queue,
        "intra_op_threads": args.intra_op_threads,
    }
    if args.scenario == "mixed-costs":
        results = run_mixed_costs(args, config)
        text = mixed_costs_report(results)
        print(text)
        print(f"wrote {write_json(args.name, {**results, 'report': text}, args.out)}")
        return 0
    if address is None:
        models = args.models or demo_repository()
        server = ServerProcess(models, config).start()
        address = server.address
    try:
        results = asyncio.run(
            run_suite(
                address,
                args.model,
                args.quick,
                server,
                args.max_inflight,
                tuple(overload_names),
                args.timeout,
            )
        )
    finally:
        if server is not None:
            server.stop()
    results["server_config"] = config if server is not None else {"address": address}
    # The same overloads under other admission settings, each on a fresh server.
    variants = [{"max_queue": queue} for queue in args.queue_sweep] + [
        {"max_queue": 16, "max_queue_wait_ms": wait} for wait in args.wait_sweep
    ]
    results["admission_sweep"] = {}
    for variant in [] if args.server else variants:
        label = " ".join(f"{key}={value:g}" for key, value in variant.items())
        with ServerProcess(args.models or demo_repository(), {**config, **variant}) as process:
            results["admission_sweep"][label] = asyncio.run(
                run_suite(
                    process.address,
                    args.model,
                    args.quick,
                    process,
                    args.max_inflight,
                    tuple(overload_names),
                    args.timeout,
                    known_capacity=results["capacity"],
                )
            )
    results["quick"] = args.quick
    text = report(results)
    print(text)
    path = write_json(args.name, {**results, "report": text}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
