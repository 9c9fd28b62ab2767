"""A real ``saliency serve`` process and real signals: SIGHUP reloads, SIGTERM drains.

On SIGTERM readiness turns NOT_SERVING, every connection gets a GOAWAY and the port
closes, new requests get UNAVAILABLE, admitted
requests (executing and queued) that fit the grace period finish, the queued ones that
would not are refused at once, what still runs when it ends is answered UNAVAILABLE,
and the process exits 0 within a second of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.grpc_servicer import REQUEST_ID_KEY
from tests.conftest import RunningServer, make_config
from tests.production_support import (
    readiness,
    scrape,
    slow_repository,
    slow_request,
    tiny_request,
    value,
)


def saliency_command() -> list[str]:
    script = Path(sys.executable).parent / "saliency"
    return [str(script)] if script.exists() else [sys.executable, "-m", "saliency_service.cli"]


class ServeProcess:
    """``saliency serve`` in a subprocess; its JSON log lines are collected as they come."""

    def __init__(self, models: Path, *flags: str) -> None:
        command = [
            *saliency_command(),
            "serve",
            "--models",
            str(models),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--log-format",
            "json",
            *flags,
        ]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.log: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        serving = self.wait_for_event("serving", timeout=120)
        self.port, self.metrics_port = serving["port"], serving["metrics_port"]

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self.lines.put({"message": line.rstrip()})

    def rest_of_log(self) -> list[dict]:
        """Every line logged so far, once the process has exited and its stderr is read."""
        while True:
            try:
                self.log.append(self.lines.get(timeout=1))
            except queue.Empty:
                return self.log

    def wait_for_event(self, event: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                entry = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"server exited ({self.process.returncode}); log: {self.log[-5:]}"
                    ) from None
                continue
            self.log.append(entry)
            if entry.get("event") == event:
                return entry
        raise AssertionError(f"no {event!r} log line within {timeout} s; log: {self.log[-5:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def models(repository: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(slow_repository(tmp_path_factory.getbasetemp(), repository), root)
    return root


def test_sighup_reloads_and_sigterm_drains_in_flight_requests(
    models: Path, repository: Path
) -> None:
    server = ServeProcess(
        models,
        "--max-inflight",
        "2",
        "--max-queue",
        "4",
        # No notice: the drain starts at SIGTERM (calls served during a notice: test_startup).
        "--drain-notice-seconds",
        "0",
        "--grace-seconds",
        "60",
        "--chunk-memory-bytes",
        str(8 * 2**20),
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)

            def ready() -> int:
                return readiness(channel, timeout=5)

            assert ready() == health_pb2.HealthCheckResponse.SERVING
            # SIGHUP: a package copied in is served without a restart.
            shutil.copytree(repository / "tiny", models / "added")
            manifest_path = models / "added" / "1" / "manifest.json"
            manifest_path.write_text(
                json.dumps({**json.loads(manifest_path.read_text()), "name": "added"})
            )
            server.process.send_signal(signal.SIGHUP)
            server.wait_for_event("reload", timeout=120)
            added = tiny_request(pb.METHOD_VANILLA_GRADIENT)
            added.model = "added"
            assert stub.Explain(added, timeout=30).model == "added"

            # Four slow requests: two executing, two queued.
            in_flight = [
                stub.Explain.future(slow_request(batch=1, stride=4, seed=i), timeout=300)
                for i in range(4)
            ]
            _until(
                lambda: (
                    lambda s: (
                        value(s, "saliency_inflight_requests") == 2
                        and value(s, "saliency_queued_requests") == 2
                    )
                )(scrape(server.metrics_port))
            )
            server.process.send_signal(signal.SIGTERM)
            _until(lambda: not_ready(channel))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Explain(tiny_request(pb.METHOD_VANILLA_GRADIENT), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused_by_drain(refused.value.details())
            assert any(not f.done() for f in in_flight), "the requests finished too early"
            completed = 0
            for future in in_flight:
                reply = future.result()
                assert reply.cost.forward_passes == 1 + 169
                completed += 1
        returncode = server.process.wait(timeout=120)
        print(
            f"\nshutdown: {completed} of {len(in_flight)} in-flight requests (2 executing, "
            f"2 queued) completed after SIGTERM; exit code {returncode}"
        )
        assert completed == 4
        assert returncode == 0
        events = [entry.get("event") for entry in server.log]
        while True:  # drain the rest of the log
            try:
                events.append(server.lines.get(timeout=1).get("event"))
            except queue.Empty:
                break
        assert "draining" in events and "stopped" in events
        assert "drain_timeout" not in events
    finally:
        server.kill()


def test_drain_answers_every_request_within_the_grace_period(models: Path) -> None:
    """SIGTERM with more work admitted than the grace period allows: the queued requests
    are refused at once with UNAVAILABLE (clients retry elsewhere), the executing ones are
    answered UNAVAILABLE when the grace ends, and the process exits within a second of it;
    every call gets one log line with its status, and the log holds no traceback."""
    grace = 1.0
    server = ServeProcess(
        models,
        "--max-inflight",
        "2",
        "--max-queue",
        "4",
        # No notice: the drain starts at SIGTERM (calls served during a notice: test_startup).
        "--drain-notice-seconds",
        "0",
        "--grace-seconds",
        str(grace),
        "--chunk-memory-bytes",
        str(8 * 2**20),
    )
    answered: dict[str, tuple[str, str, float]] = {}
    exited: list[float] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            long_request = slow_request(batch=4, stride=2)

            def call(request_id: str) -> grpc.Future:
                future = stub.Explain.future(
                    long_request, timeout=120, metadata=((REQUEST_ID_KEY, request_id),))

                def done(finished: grpc.Future) -> None:
                    error = finished.exception()
                    answered[request_id] = (
                        ("OK", "") if error is None else (error.code().name, error.details())
                    ) + (time.monotonic(),)

                future.add_done_callback(done)
                return future

            # Measured once, so admission knows the queued requests cannot finish in time.
            measured = call("measure").result().cost.wall_seconds
            assert measured > 1.5 * grace, f"the long request took only {measured:.2f} s"
            admitted = [call(f"admitted-{i}") for i in range(6)]  # 2 executing, 4 queued
            _until(
                lambda: (
                    lambda s: (
                        value(s, "saliency_inflight_requests") == 2
                        and value(s, "saliency_queued_requests") == 4
                    )
                )(scrape(server.metrics_port))
            )
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            def watch_exit() -> None:
                server.process.wait()
                exited.append(time.monotonic())

            threading.Thread(target=watch_exit, daemon=True).start()
            _until(lambda: not_ready(channel))
            late = [call(f"late-{i}") for i in range(2)]
            for future in admitted + late:
                future.exception(timeout=60)
        _until(lambda: bool(exited), timeout=60)
        log = server.rest_of_log()
        after = {rid: (code, round(at - signalled, 2)) for rid, (code, _, at) in answered.items()}
        print(f"\ndrain with a {grace} s grace: exit after {exited[0] - signalled:.2f} s "
              f"(code {server.process.returncode}); answers after SIGTERM: {after}")
        assert exited[0] - signalled <= grace + 1.0
        assert server.process.returncode == 0
        codes = {rid: code for rid, (code, _, _) in answered.items()}
        assert set(codes.values()) <= {"OK", "UNAVAILABLE"}, codes
        for rid, (code, details, _) in answered.items():
            assert code == "OK" or refused_by_drain(details), (rid, details)
        # The queued requests could not start before the grace ended: refused at once.
        refused_at_once = [rid for rid, (code, _, at) in answered.items()
                           if rid.startswith("admitted") and code == "UNAVAILABLE"
                           and at - signalled < grace / 2]
        assert len(refused_at_once) >= 4, after
        assert all(codes[f"late-{i}"] == "UNAVAILABLE" for i in range(2))
        # One request line per call, with the status the client saw; no traceback anywhere.
        # (A late call that found the port closed never reached the server.)
        lines = [entry for entry in log if entry.get("event") == "request"]
        reached = {rid for rid, (_, details, _) in answered.items()
                   if "failed to connect" not in details}
        assert sorted(entry["request_id"] for entry in lines) == sorted(reached)
        assert {entry["request_id"]: entry["code"] for entry in lines} == {
            rid: codes[rid] for rid in reached}
        assert not [entry for entry in log if "traceback" in entry
                    or "Traceback" in entry.get("message", "")
                    or "CancelledError" in entry.get("message", "")]
        events = [entry.get("event") for entry in log]
        assert "drain_timeout" in events and "stopped" in events
    finally:
        server.kill()


def test_grace_period_bounds_the_drain(
    repository: Path, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A request longer than the grace period does not hold the server: when the grace
    period ends it is answered UNAVAILABLE (the server is shutting down, not the client
    cancelling), its worker stops at its next check, and the request is counted."""
    caplog.set_level(logging.INFO, logger="saliency_service.protocol.request_log")
    root = slow_repository(tmp_path_factory.getbasetemp(), repository)
    running = RunningServer(make_config(root, max_inflight=1, chunk_memory_bytes=8 * 2**20)).start()
    stopped = False
    grace = 0.5
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            long_request = stub.Explain.future(slow_request(batch=8, stride=2), timeout=300)
            _until(lambda: running.server.admission.inflight == 1)
            started = time.monotonic()
            running.stop(grace=grace)
            stopped = True
            elapsed = time.monotonic() - started
            with pytest.raises(grpc.RpcError) as error:
                long_request.result(timeout=30)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in error.value.details()
        assert elapsed < grace + 1.0, f"stopping took {elapsed:.1f} s"
        assert any(getattr(r, "event", None) == "drain_timeout" for r in caplog.records)
        _until(lambda: running.server.admission.inflight == 0, timeout=10)
        counted = {
            sample.labels["code"]: sample.value
            for family in text_string_to_metric_families(
                running.server.metrics.exposition().decode())
            for sample in family.samples if sample.name == "saliency_requests_total"
        }
        assert counted == {"UNAVAILABLE": 1.0}
        lines = [r for r in caplog.records if getattr(r, "event", None) == "request"]
        assert [r.code for r in lines] == ["UNAVAILABLE"]
    finally:
        if not stopped:
            running.stop()


def test_draining_refuses_at_once_the_queued_requests_that_would_not_finish() -> None:
    """The queue played forward at the drain: a queued request that would end after the
    grace period is refused at once and leaves its turn to the ones behind it, which run;
    when the grace period ends, what still waits is refused."""
    from saliency_service.core.errors import Unavailable
    from saliency_service.core.request import RequestState
    from saliency_service.serving.admission import Admission
    from saliency_service.serving.metrics import Metrics

    async def scenario() -> None:
        admission = Admission(max_inflight=1, max_queue=8, metrics=Metrics())
        running, fits, too_long, behind = (RequestState() for _ in range(4))
        await admission.acquire(running, expected_seconds=1.0)
        queued = [asyncio.ensure_future(admission.acquire(state, expected_seconds=cost))
                  for state, cost in ((fits, 0.1), (too_long, 5.0), (behind, 0.1))]
        await asyncio.sleep(0.01)
        admission.drain(time.perf_counter() + 2.0)
        await asyncio.sleep(0)
        assert [task.done() for task in queued] == [False, True, False]
        with pytest.raises(Unavailable, match="would not finish within its grace period"):
            queued[1].result()
        with pytest.raises(Unavailable, match="shutting down"):
            await admission.acquire(RequestState())
        admission.release(running)
        await queued[0]  # its turn came
        admission.close()
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="shutting down"):
            queued[2].result()
        admission.release(fits)
        assert admission.inflight == 0 and admission.waiting == 0

    asyncio.run(scenario())


def not_ready(channel: grpc.Channel) -> bool:
    """Readiness NOT_SERVING, or the port already closed by the drain's GOAWAY."""
    try:
        return readiness(channel, timeout=5) == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.UNAVAILABLE


def refused_by_drain(details: str) -> bool:
    """A call refused by a draining server: by admission ("shutting down"), or by the closed
    port once the connection had its GOAWAY (the call was never sent)."""
    return "shutting down" in details or "failed to connect" in details


def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, grpc.RpcError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
