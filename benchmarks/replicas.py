"""Several replicas on one machine: how calls spread over them, how throughput scales from
one to two, and what clients see when a replica is added or stopped with SIGTERM.

Each replica is a ``saliency serve`` process on its own loopback address (127.0.0.1, .2,
.3; one port), serving the demo model with one worker and one intra-op thread, its
connections aged after ``AGE_SECONDS``; two more (.4, .5) do not age theirs, the baseline
for a replica added mid-run. Clients are ``saliency_service.client.client.SaliencyClient`` as
shipped (round_robin, retry policy), reaching the replicas two ways, as in Kubernetes:

- headless: ``dns://<stand-in>/saliency.test:<port>`` resolves to every replica
  (``benchmarks.loopback.DnsResponder``, a headless Service's DNS name); one client, several
  threads, round_robin over all addresses.
- cluster_ip: one address (``benchmarks.loopback.ConnectionProxy``, like kube-proxy with
  IPVS's least-connection scheduler) handing each new connection to one replica; several
  clients with one connection each, which only the connection age moves.

Time is scaled down: connections age after 2 s (30 s in deploy/k8s) and the client
re-resolves at most every 0.5 s (gRPC's default: 30 s). Throughput of one and two replicas
is measured in alternating rounds, so both see the same machine load.

    python -m benchmarks.replicas [--quick]
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import (
    ServerProcess,
    base_parser,
    demo_repository,
    free_port,
    png_images,
    table,
    write_json,
)
from benchmarks.loopback import ConnectionProxy, DnsResponder, free_port_on, loopback_addresses
from saliency_service.client.client import SaliencyClient
from saliency_service.proto import explainer_pb2 as pb

AGE_SECONDS = 2.0
RESOLVE_MS = 500
NAME = "saliency.test"
REPLICA_FLAGS = {"max_inflight": 1, "intra_op_threads": 1, "max_queue": 32,
                 "max_connection_age_seconds": AGE_SECONDS, "grace_seconds": 10,
                 "inline_below_ms": 0}


class Replica(ServerProcess):
    """One ``saliency serve`` on ``host:port`` with a metrics port to count what it served."""

    def __init__(self, models: Path, host: str, port: int, log_path: Path,
                 **flags: Any) -> None:
        self.metrics_port = free_port()
        super().__init__(models, {**REPLICA_FLAGS, **flags, "host": host,
                                  "metrics_port": self.metrics_port}, log_path)
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU time the process has used (user + system, ``/proc/<pid>/stat``)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def served(self) -> float:
        """Requests finished so far, any status (``saliency_requests_total``)."""
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("saliency_requests_total{"))


@dataclass
class Tally:
    """Every request sent and what came back, with each call's start and end."""

    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    calls: list[tuple[float, float, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, started: float, ended: float, error: str | None) -> None:
        with self.lock:
            self.calls.append((started, ended, error is None))
            if error is None:
                self.ok += 1
            else:
                self.errors[error] += 1

    def send(self) -> None:
        with self.lock:
            self.sent += 1


def drive(clients: list[SaliencyClient], threads_each: int, request: pb.ExplainRequest,
          seconds: float, during: Callable[[], None] | None = None) -> Tally:
    """Sends ``request`` from ``threads_each`` threads per client for ``seconds``; runs
    ``during`` (in this thread) once they are under way."""
    tally = Tally()
    ends = time.monotonic() + seconds

    def send(client: SaliencyClient) -> None:
        while time.monotonic() < ends:
            tally.send()
            started = time.monotonic()
            try:
                client.stub.Explain(request, timeout=60)
                error = None
            except grpc.RpcError as exc:
                error = f"{exc.code().name}: {(exc.details() or '')[:120]}"
            tally.record(started, time.monotonic(), error)

    workers = [threading.Thread(target=send, args=(client,))
               for client in clients for _ in range(threads_each)]
    for worker in workers:
        worker.start()
    if during is not None:
        during()
    for worker in workers:
        worker.join()
    return tally


def shares(replicas: list[Replica], before: list[float]) -> dict[str, Any]:
    """Each replica's share of the requests served since ``before``, and max/min."""
    counts = [replica.served() - start for replica, start in zip(replicas, before, strict=True)]
    total = sum(counts) or 1.0
    return {"served": {r.host: int(c) for r, c in zip(replicas, counts, strict=True)},
            "share": {r.host: round(c / total, 3) for r, c in zip(replicas, counts, strict=True)},
            "max_over_min": round(max(counts) / min(counts), 3) if min(counts) else None}


def headless_client(dns: DnsResponder, port: int) -> SaliencyClient:
    return SaliencyClient(dns.target(NAME, port), timeout=60, options=[
        ("grpc.dns_min_time_between_resolutions_ms", RESOLVE_MS)])


def cluster_ip_clients(proxy: ConnectionProxy, count: int) -> list[SaliencyClient]:
    """``count`` clients with a connection each (as separate processes would have)."""
    return [SaliencyClient(proxy.address, timeout=60, load_balancing="pick_first",
                           options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)]


def close(clients: list[SaliencyClient]) -> None:
    for client in clients:
        client.close()


def summary(tally: Tally, seconds: float) -> dict[str, Any]:
    return {"sent": tally.sent, "ok": tally.ok, "errors": dict(tally.errors),
            "per_second": round(tally.ok / seconds, 2)}


# ---- the measurements ------------------------------------------------------------------------


def distribution(replicas: list[Replica], port: int, request: pb.ExplainRequest,
                 seconds: float) -> list[dict[str, Any]]:
    """Calls of 3 threads over 3 replicas: headless (round_robin), then cluster_ip (4 clients
    of one connection each, moved only by the connection age)."""
    rows = []
    dns = DnsResponder([r.host for r in replicas]).start()
    client = headless_client(dns, port)
    try:
        client.stub.Explain(request, timeout=60)
        before = [r.served() for r in replicas]
        tally = drive([client], 3, request, seconds)
        rows.append({"path": "headless, round_robin", "clients": 1, **summary(tally, seconds),
                     **shares(replicas, before)})
    finally:
        client.close()
        dns.stop()
    proxy = ConnectionProxy([(r.host, port) for r in replicas]).start()
    clients = cluster_ip_clients(proxy, 4)
    try:
        before = [r.served() for r in replicas]
        tally = drive(clients, 1, request, seconds)
        rows.append({"path": f"cluster_ip, max_connection_age {AGE_SECONDS:g} s", "clients": 4,
                     **summary(tally, seconds), **shares(replicas, before),
                     "connections": sum(proxy.accepted.values())})
    finally:
        close(clients)
        proxy.stop()
    return rows


def throughput(replicas: list[Replica], requests: dict[str, pb.ExplainRequest], seconds: float,
               rounds: int) -> list[dict[str, Any]]:
    """Responses per second with one replica and with two, in alternating rounds; 4 client
    threads keep every worker busy. The cores the replicas got (their CPU seconds per
    second) show how much of the machine they had: on a shared machine, less than one each."""
    one, two = replicas[:1], replicas[:2]
    targets = {"1 replica": one, "2 replicas": two}
    rows = []
    for method, request in requests.items():
        rates: dict[str, list[float]] = {name: [] for name in targets}
        cores: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, serving in targets.items():
                target = "ipv4:" + ",".join(r.address for r in serving)
                with SaliencyClient(target, timeout=60) as client:
                    for _ in range(4):
                        client.stub.Explain(request, timeout=60)
                    cpu = sum(r.cpu_seconds() for r in serving)
                    tally = drive([client], 4, request, seconds)
                    cores[name].append((sum(r.cpu_seconds() for r in serving) - cpu) / seconds)
                rates[name].append(tally.ok / seconds)
                if tally.errors:
                    raise RuntimeError(f"{method} on {name}: {dict(tally.errors)}")
        ratios = [b / a for a, b in zip(rates["1 replica"], rates["2 replicas"], strict=True)]
        rows.append({"method": method,
                     "one_per_second": round(statistics.median(rates["1 replica"]), 2),
                     "two_per_second": round(statistics.median(rates["2 replicas"]), 2),
                     "speed_up": round(statistics.median(ratios), 3),
                     "one_cores": round(statistics.median(cores["1 replica"]), 2),
                     "two_cores": round(statistics.median(cores["2 replicas"]), 2),
                     "one_per_core_second": round(statistics.median(
                         r / c for r, c in zip(rates["1 replica"], cores["1 replica"],
                                               strict=True)), 2),
                     "two_per_core_second": round(statistics.median(
                         r / c for r, c in zip(rates["2 replicas"], cores["2 replicas"],
                                               strict=True)), 2),
                     "round_ratios": [round(r, 3) for r in ratios]})
    return rows


def time_to_traffic(replica: Replica, add: Callable[[], None], timeout: float) -> float | None:
    """Seconds from ``add`` until ``replica`` has served a request (None: not within
    ``timeout``)."""
    start_count = replica.served()
    added = time.monotonic()
    add()
    while time.monotonic() - added < timeout:
        if replica.served() > start_count:
            return time.monotonic() - added
        time.sleep(0.05)
    return None


def entry(path: str, first: list[Replica], port: int) -> tuple[
        list[SaliencyClient], int, Callable[[list[Replica]], None], Callable[[], None]]:
    """The clients of one way in to the ``first`` replicas, their threads each, how the
    endpoints change, and how it all closes."""
    if path == "cluster_ip":
        proxy = ConnectionProxy([(r.host, port) for r in first]).start()
        clients = cluster_ip_clients(proxy, 4)

        def close_proxy() -> None:
            close(clients)
            proxy.stop()

        return (clients, 1, lambda now: proxy.set_backends([(r.host, port) for r in now]),
                close_proxy)
    dns = DnsResponder([r.host for r in first]).start()
    client = headless_client(dns, port)

    def close_dns() -> None:
        client.close()
        dns.stop()

    return [client], 2, lambda now: dns.set_addresses([r.host for r in now]), close_dns


def added_replica(first: list[Replica], new: Replica, port: int, request: pb.ExplainRequest,
                  seconds: float, age: str) -> list[dict[str, Any]]:
    """Traffic on the ``first`` replicas; ``new`` becomes an endpoint a third of the way
    in: how long until it serves a call, headless and cluster_ip (None: not within five
    connection ages). ``age`` names the first replicas' connection age."""
    replicas = [*first, new]
    timeout = 5 * AGE_SECONDS
    duration = seconds + timeout / 2
    rows = []
    for path in ("headless, round_robin", "cluster_ip"):
        clients, threads, set_endpoints, finish = entry(path, first, port)
        found: list[float | None] = []

        def add_later(set_endpoints: Callable[[list[Replica]], None] = set_endpoints,
                      found: list[float | None] = found) -> None:
            time.sleep(seconds / 3)
            found.append(time_to_traffic(new, lambda: set_endpoints(replicas), timeout))

        try:
            before = [r.served() for r in replicas]
            tally = drive(clients, threads, request, duration, during=add_later)
            rows.append({"path": f"{path}, max_connection_age {age}",
                         **summary(tally, duration), "seconds_to_first_call": found[0],
                         **shares(replicas, before)})
        finally:
            finish()
    return rows


def answered_while_draining(log_path: Path) -> dict[str, int]:
    """Status codes of the requests a replica answered after its SIGTERM (its JSON log)."""
    codes: Counter[str] = Counter()
    draining = False
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        draining = draining or entry.get("event") == "draining"
        if draining and entry.get("event") == "request":
            codes[entry.get("code", "?")] += 1
    return dict(codes)


def sigterm_replica(replicas: list[Replica], victim: Replica, port: int,
                    request: pb.ExplainRequest, seconds: float, path: str) -> dict[str, Any]:
    """Calls over ``replicas``; ``victim`` gets SIGTERM halfway. Headless: it stays in DNS
    (the harder case: the client keeps finding its address). cluster_ip: it leaves the
    proxy's endpoints at the signal (Kubernetes removes it before, during preStop). Every
    request sent is counted, and every response."""
    clients, threads, set_endpoints, finish = entry(path, replicas, port)
    stopped: dict[str, float] = {}
    try:
        for client in clients:
            client.stub.Explain(request, timeout=60)

        def terminate() -> None:
            time.sleep(seconds / 2)
            assert victim.process is not None
            if path == "cluster_ip":
                set_endpoints([r for r in replicas if r is not victim])
            stopped["signalled"] = time.monotonic()
            victim.process.send_signal(signal.SIGTERM)
            stopped["exit_code"] = victim.process.wait(60)
            stopped["exited"] = time.monotonic()

        tally = drive(clients, threads * 2, request, seconds, during=terminate)
    finally:
        finish()
    signalled = stopped["signalled"]
    across = sum(1 for start, end, _ in tally.calls if start < signalled < end)
    after = sum(1 for start, _, ok in tally.calls if start > stopped["exited"] and ok)
    return {"path": path, "replicas": len(replicas), "threads": len(clients) * threads * 2,
            **summary(tally, seconds), "lost": tally.sent - tally.ok,
            "in_flight_at_sigterm": across, "answered_after_exit": after,
            "exit_code": stopped["exit_code"],
            "victim_answered_while_draining": answered_while_draining(victim.log_path),
            "seconds_to_exit": round(stopped["exited"] - signalled, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    args = parser.parse_args(argv)
    quick = args.quick
    seconds = 3.0 if quick else 10.0
    hosts = loopback_addresses(5)
    port = free_port_on(hosts)
    models = demo_repository()
    logs = Path(tempfile.mkdtemp(prefix="saliency-replicas-"))
    replicas = [Replica(models, host, port, logs / f"{host}.log") for host in hosts[:3]]
    # Two more without connection ageing: the baseline for a replica added mid-run.
    ageless = [Replica(models, host, port, logs / f"{host}.log",
                       max_connection_age_seconds=0) for host in hosts[3:]]
    image = png_images(1, 128)[0]

    def explain(method: int, **params: Any) -> pb.ExplainRequest:
        request = pb.ExplainRequest(model="demo", method=method,
                                    input=pb.Input(images=pb.EncodedImages(images=[image])))
        for name, value in params.items():
            getattr(request, name).CopyFrom(value)
        return request

    cheap = explain(pb.METHOD_GRADCAM)
    integrated = explain(pb.METHOD_INTEGRATED_GRADIENTS,
                         integrated_gradients=pb.IntegratedGradientsParams(steps=32))
    started = time.monotonic()
    with ThreadPoolExecutor(len(replicas) + len(ageless)) as starting:
        list(starting.map(lambda r: r.start(), replicas + ageless))
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    say(f"5 replicas ready in {time.monotonic() - started:.1f} s; one worker and one "
        f"intra-op thread each; connections aged after {AGE_SECONDS:g} s")
    try:
        spread = distribution(replicas, port, cheap, seconds)
        say(f"\ndistribution of gradcam calls over 3 replicas, {seconds:g} s:")
        say(table([{k: v for k, v in row.items() if k != "served"} for row in spread]))
        scaling = throughput(replicas, {"gradcam": cheap, "integrated_gradients-32": integrated},
                             seconds=2.0 if quick else 5.0, rounds=2 if quick else 3)
        say("\nthroughput (responses/s), 1 vs 2 replicas of one thread each, alternating "
            "rounds; cores = the replicas' CPU seconds per second:")
        say(table(scaling))
        added = added_replica(replicas[:2], replicas[2], port, cheap, seconds,
                              f"{AGE_SECONDS:g} s")
        added += added_replica(ageless, replicas[2], port, cheap, seconds, "off")
        say("\na replica added mid-run beside two (None: no call within "
            f"{5 * AGE_SECONDS:g} s):")
        say(table([{k: v for k, v in row.items() if k not in ("served", "share")}
                   for row in added]))
        failover = [sigterm_replica(replicas, replicas[1], port, integrated, seconds,
                                    "headless, round_robin"),
                    sigterm_replica([replicas[0], replicas[2]], replicas[2], port, integrated,
                                    seconds, "cluster_ip")]
        say("\nSIGTERM on one replica mid-run (integrated_gradients-32):")
        say(table(failover))
    finally:
        for replica in replicas + ageless:
            replica.stop()
    path = write_json("replicas", {
        "quick": quick, "age_seconds": AGE_SECONDS, "resolve_ms": RESOLVE_MS,
        "replica_flags": REPLICA_FLAGS, "seconds": seconds, "distribution": spread,
        "throughput": scaling, "added_replica": added, "sigterm": failover,
        "report": "\n".join(report),
    }, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
