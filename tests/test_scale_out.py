"""Several replicas on loopback: the client's retry policy and round_robin balancing, the
GOAWAY a draining server sends, connection ageing, and failover when a replica is stopped
with SIGTERM mid-run (every request sent is answered)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from benchmarks.loopback import DnsResponder, free_port_on, loopback_addresses
from saliency_service.client.client import SaliencyClient
from saliency_service.client.connections import (
    RETRYABLE,
    client_options,
    server_options,
    service_config,
)
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, make_config
from tests.production_support import slow_repository, slow_request, tiny_request
from tests.test_production_shutdown import ServeProcess


@pytest.fixture(scope="module")
def slow_models(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slow_repository(tmp_path_factory.getbasetemp(), repository)


def replica(models: Path, **overrides: object) -> RunningServer:
    """An in-process server; every request goes through admission (none runs inline)."""
    return RunningServer(make_config(models, inline_below_ms=0, **overrides)).start()


@pytest.fixture
def two_replicas(slow_models: Path) -> Iterator[list[RunningServer]]:
    replicas = [replica(slow_models, max_inflight=1, max_queue=0) for _ in range(2)]
    yield replicas
    for running in replicas:
        if running.thread.is_alive():
            running.stop(grace=1)


def both(replicas: list[RunningServer]) -> str:
    return "ipv4:" + ",".join(r.address for r in replicas)


def cheap() -> pb.ExplainRequest:
    return tiny_request(pb.METHOD_VANILLA_GRADIENT)


def test_service_config_retries_only_refusals_with_bounded_backoff() -> None:
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "saliency.v1.Explainer"}]
    policy = method["retryPolicy"]
    assert set(policy["retryableStatusCodes"]) == set(RETRYABLE) == {
        "UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"}
    assert 1 < policy["maxAttempts"] <= 5 and policy["backoffMultiplier"] > 1
    assert float(policy["initialBackoff"].rstrip("s")) < float(policy["maxBackoff"].rstrip("s"))
    assert "retryThrottling" in config
    no_retries = json.loads(service_config(max_attempts=1))
    assert "retryPolicy" not in no_retries["methodConfig"][0]
    assert dict(client_options(max_attempts=1))["grpc.enable_retries"] == 0
    options = dict(server_options(30, 5, 60, 20, 10))
    assert options["grpc.max_connection_age_ms"] == 30_000
    assert options["grpc.max_connection_age_grace_ms"] == 5_000
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 10_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(0, 0, 0, 20, 10))


def test_resource_exhausted_is_retried_on_the_other_replica(
    two_replicas: list[RunningServer],
) -> None:
    """Replica A holds its one worker and has no queue, so it refuses at once with
    RESOURCE_EXHAUSTED; a round_robin client's calls that reach it are retried, and B
    answers them. Without retries, those calls fail."""
    busy = two_replicas[0]
    with SaliencyClient(both(two_replicas), timeout=30) as client, \
            SaliencyClient(both(two_replicas), timeout=30, max_attempts=1) as no_retries, \
            grpc.insecure_channel(busy.address) as direct:
        for _ in range(4):  # both clients connected to both replicas before A is busy
            client.stub.Explain(cheap(), timeout=30)
            no_retries.stub.Explain(cheap(), timeout=30)
        hold = pb_grpc.ExplainerStub(direct).Explain.future(slow_request(batch=8, stride=2),
                                                             timeout=120)
        _until(lambda: busy.server.admission.inflight == 1)
        replies = [client.stub.Explain(cheap(), timeout=30) for _ in range(10)]
        refused_with_retries = _rejected(busy, "queue_full")
        failures = []
        for _ in range(10):
            try:
                no_retries.stub.Explain(cheap(), timeout=30)
            except grpc.RpcError as error:
                failures.append(error.code())
        assert not hold.done(), "the held request ended early; the test proves nothing"
        hold.cancel()
    assert all(reply.cost.forward_passes >= 1 for reply in replies)
    assert refused_with_retries >= 1, "no call reached the busy replica"
    assert failures and set(failures) == {grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_draining_replica_sends_goaway_and_finishes_its_calls(
    two_replicas: list[RunningServer],
) -> None:
    """Stopping A (what SIGTERM does): its connections get a GOAWAY at once, so a
    round_robin client's next calls all go to B without an error, while A's call in flight
    still completes."""
    draining, other = two_replicas
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(draining.address) as direct, \
            SaliencyClient(both(two_replicas), timeout=30) as client:
        direct.subscribe(states.append, try_to_connect=True)
        for _ in range(4):  # the client connected to both replicas before A drains
            client.stub.Explain(cheap(), timeout=30)
        in_flight = pb_grpc.ExplainerStub(direct).Explain.future(
            slow_request(batch=4, stride=4), timeout=120)
        _until(lambda: draining.server.admission.inflight == 1)
        drain = threading.Thread(target=draining.stop, kwargs={"grace": 60})
        drain.start()
        _until(lambda: states[-1] != grpc.ChannelConnectivity.READY, timeout=5)
        assert not in_flight.done(), "the call in flight ended before the GOAWAY was seen"
        admitted = draining.server.admission.admitted
        served = other.server.admission.admitted
        replies = [client.stub.Explain(cheap(), timeout=30) for _ in range(10)]
        assert in_flight.result(timeout=120).cost.forward_passes == 4 * (1 + 169)
        drain.join(60)
    assert len(replies) == 10
    assert draining.server.admission.admitted == admitted  # no new call reached it
    assert other.server.admission.admitted == served + 10
    assert grpc.ChannelConnectivity.READY in states


def test_connection_age_reconnects_and_spreads_over_new_replicas(
    slow_models: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With max_connection_age the server sends a GOAWAY (±10 %) after that age; the client
    reconnects and re-resolves its dns:/// target (here answered by a local stand-in for a
    headless Service), so a replica added meanwhile gets traffic. A call in flight across
    the age still finishes (no grace bound).

    The long call's model waits on the test before it runs, so the call outlives an age
    whatever the machine's speed: the test lets it go only once the added replica has had a
    call and more than an age has passed since the model was entered."""
    addresses = loopback_addresses(2)
    port = free_port_on(addresses)
    age = 0.5
    first, added = (replica(slow_models, host=address, port=port,
                            max_connection_age_seconds=age) for address in addresses)
    entered: list[float] = []
    release = threading.Event()
    slow = first.server.repository.get("slow")
    run = slow.run

    def held_run(*args: object, **kwargs: object) -> object:
        if not entered:
            entered.append(time.monotonic())
        release.wait(60)
        return run(*args, **kwargs)

    monkeypatch.setattr(slow, "run", held_run)
    dns = DnsResponder(addresses[:1]).start()
    try:
        with SaliencyClient(dns.target("saliency.test", port), timeout=30, options=[
                ("grpc.dns_min_time_between_resolutions_ms", 100)]) as client:
            client.stub.Explain(cheap(), timeout=30)
            across = client.stub.Explain.future(slow_request(batch=1, stride=16), timeout=60)
            dns.set_addresses(addresses)
            started = time.monotonic()
            while added.server.admission.admitted == 0 and time.monotonic() - started < 10:
                client.stub.Explain(cheap(), timeout=30)
            waited = time.monotonic() - started
            _until(lambda: bool(entered) and time.monotonic() - entered[0] > age * 1.2)
            assert not across.done(), "the long call ended before it was let go"
            release.set()
            reply = across.result(timeout=60)
            for _ in range(10):
                client.stub.Explain(cheap(), timeout=30)
        assert reply.cost.wall_seconds > age * 1.1, "the long call did not outlive an age"
        assert added.server.admission.admitted > 0, "the added replica got no call"
        assert waited < 4 * age + 1.0, f"the added replica waited {waited:.2f} s"
        assert dns.queries >= 2  # resolved again after a GOAWAY
        assert first.server.admission.admitted >= 2
    finally:
        release.set()
        dns.stop()
        for running in (first, added):
            running.stop(grace=1)


def test_sigterm_on_one_replica_loses_no_request(repository: Path, tmp_path: Path) -> None:
    """Two ``saliency serve`` processes, a round_robin client sending from two threads;
    one replica gets SIGTERM mid-run. Every request sent gets its response."""
    with ThreadPoolExecutor(2) as starting:  # in parallel: each start loads torch
        servers = list(starting.map(
            lambda _: ServeProcess(repository, "--max-inflight", "1", "--grace-seconds", "10",
                                   "--inline-below-ms", "0"), range(2)))
    target = "ipv4:" + ",".join(server.address for server in servers)
    sent = received = 0
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        with SaliencyClient(target, timeout=30) as client:
            def send() -> None:
                nonlocal sent, received
                while not stop.is_set():
                    with lock:
                        sent += 1
                    try:
                        client.stub.Explain(cheap(), timeout=30)
                        with lock:
                            received += 1
                    except grpc.RpcError as error:
                        errors.append(f"{error.code().name}: {error.details()}")

            senders = [threading.Thread(target=send) for _ in range(2)]
            for sender in senders:
                sender.start()
            time.sleep(1.0)
            before = received
            servers[0].process.send_signal(signal.SIGTERM)
            assert servers[0].process.wait(timeout=30) == 0
            after_exit = received
            time.sleep(1.0)
            stop.set()
            for sender in senders:
                sender.join(60)
    finally:
        for server in servers:
            server.kill()
    print(f"\nfailover: {sent} sent, {received} answered, {len(errors)} errors; "
          f"{before} before SIGTERM, {received - after_exit} after the replica exited")
    assert errors == []
    assert sent == received and before > 0 and received > after_exit


def _rejected(running: RunningServer, reason: str) -> float:
    text = running.server.metrics.exposition().decode()
    line = f'saliency_rejected_total{{reason="{reason}"}} '
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
