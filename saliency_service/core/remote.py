"""Remote models: a package whose manifest names a predictor endpoint instead of a file.

Black-box methods (DE-CAM, RISE, occlusion) only need the model's class scores, so a model
already served by KServe, Triton, MLServer, Seldon or TorchServe can be explained where it
runs. The manifest's ``remote`` object names the protocol (KServe V1 REST, Open Inference
Protocol V2 REST or V2 gRPC, TorchServe's predictions API), the endpoint and the served
model; ``ModelHandle.run`` sends each
batch there in chunks of ``max_batch`` with at most ``concurrency`` calls in flight, each
bounded by the request's deadline, retrying an unavailable predictor ``retries`` times.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import httpx
import numpy as np

from saliency_service.core.errors import DeadlineExceeded, Unavailable
from saliency_service.core.json_numbers import json_array
from saliency_service.proto import open_inference_pb2 as oip

KSERVE_V1 = "kserve-v1"
V2_REST = "v2-rest"
V2_GRPC = "v2-grpc"
# TorchServe's inference API: POST /predictions/{model} with a JSON tensor, answered with
# the scores (deploy/torchserve/scores_handler.py is a handler that keeps this contract).
TORCHSERVE = "torchserve"
PROTOCOLS = (KSERVE_V1, V2_REST, V2_GRPC, TORCHSERVE)
# inference.GRPCInferenceService, as Triton, KServe and MLServer serve it.
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
DATATYPES = ("FP32",)
MAX_BATCH = 1024
MAX_CONCURRENCY = 64
MAX_RETRIES = 10
MAX_TIMEOUT_SECONDS = 3600.0
# Statuses that mean "try again": the predictor is starting, overloaded or behind a proxy
# that lost it.
RETRY_STATUSES = (502, 503, 504)
RETRY_PAUSE_SECONDS = 0.05
# The binary tensor extension's header: the JSON part's length, binary tensors after it.
BINARY_HEADER = "inference-header-content-length"
# How a V2 server (Triton) says it takes binary tensors, in GET /v2's extensions.
BINARY_EXTENSION = "binary_tensor_data"
# Largest answer read (after decompression): the scores, or V1's every output, of a batch.
MAX_ANSWER_BYTES = 256 << 20


class InvalidRemote(ValueError):
    """A ``remote`` manifest field the server cannot use; the message names it."""


class RemoteState(Protocol):
    """What a remote run reads of a request (``core.request.RequestState``)."""

    deadline: float | None

    def check(self) -> None: ...


@dataclass(frozen=True)
class TLS:
    """How to reach an ``https`` predictor: the CA bundle, a client certificate, or no
    verification (for a test cluster only)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    verify: bool = True


@dataclass(frozen=True)
class RemoteSpec:
    """The manifest's ``remote`` object: where the predictor is and how to call it.

    The input tensor's name, layout and shape are the manifest's ``input``; the output
    holding the class scores is ``outputs.logits`` (its kind ``outputs.kind``).
    """

    protocol: str
    url: str  # base URL, e.g. http://predictor.default:8080 (v2-grpc: host:port)
    model: str
    datatype: str = "FP32"
    max_batch: int = 32
    concurrency: int = 4
    timeout_seconds: float = 60.0
    retries: int = 2
    # V2 REST's binary tensor extension (Triton, KServe): raw float32 bytes after the JSON;
    # over TorchServe, the tensor's data as base64 float32 instead of JSON numbers. None:
    # over V2 REST, when the predictor lists the extension (GET /v2), else JSON numbers.
    binary_data: bool | None = None
    # TorchServe's management API (http://host:8081): readiness from the model's workers.
    management_url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    bearer_token_env: str = ""
    tls: TLS = TLS()
    # v2-grpc over TLS with the system's CAs (the url was https://host:port).
    secure: bool = False

    @classmethod
    def from_json(cls, data: Any) -> RemoteSpec:
        """The parsed object; InvalidRemote names the first field that is wrong."""
        if not isinstance(data, dict):
            raise InvalidRemote("manifest remote must be an object")
        known = {"protocol", "url", "model", "datatype", "max_batch", "concurrency",
                 "timeout_seconds", "retries", "binary_data", "headers", "bearer_token_env",
                 "tls", "management_url"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRemote(f"manifest remote has unknown fields {unknown[:5]}; known: "
                                f"{sorted(known)}")
        protocol = _choice(data, "protocol", PROTOCOLS, required=True)
        url = _string(data, "url", required=True)
        secure = protocol == V2_GRPC and url.startswith("https://")
        if protocol == V2_GRPC:
            url = url.removeprefix("grpc://").removeprefix("http://").removeprefix("https://")
        elif "://" not in url:
            url = ("https://" if "tls" in data else "http://") + url
        if protocol == V2_GRPC and ("/" in url or ":" not in url):
            raise InvalidRemote(f"manifest remote.url {url[:80]!r} must be host:port for "
                                f"{V2_GRPC}")
        if protocol != V2_GRPC and not url.startswith(("http://", "https://")):
            raise InvalidRemote(f"manifest remote.url {url[:80]!r} must be http(s)://host:port "
                                "or host:port")
        headers = data.get("headers") or {}
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise InvalidRemote("manifest remote.headers must map header names to strings")
        binary = data.get("binary_data")
        if ((binary is not None and not isinstance(binary, bool))
                or (binary and protocol not in (V2_REST, TORCHSERVE))):
            raise InvalidRemote("manifest remote.binary_data must be true or false, and true "
                                f"only with protocol {V2_REST} or {TORCHSERVE}")
        management = _string(data, "management_url")
        if management and protocol != TORCHSERVE:
            raise InvalidRemote(f"manifest remote.management_url is TorchServe's management "
                                f"API; it needs protocol {TORCHSERVE}")
        if management and "://" not in management:
            management = ("https://" if "tls" in data else "http://") + management
        if management and not management.startswith(("http://", "https://")):
            raise InvalidRemote(f"manifest remote.management_url {management[:80]!r} must be "
                                "http(s)://host:port or host:port")
        tls = data.get("tls") or {}
        if not isinstance(tls, dict) or not set(tls) <= {"ca_file", "cert_file", "key_file",
                                                         "verify"}:
            raise InvalidRemote("manifest remote.tls must be an object of ca_file, cert_file, "
                                "key_file and verify")
        return cls(
            protocol=protocol,
            url=url.rstrip("/"),
            model=_string(data, "model", required=True),
            datatype=_choice(data, "datatype", DATATYPES),
            max_batch=int(_number(data, "max_batch", 32, 1, MAX_BATCH, whole=True)),
            concurrency=int(_number(data, "concurrency", 4, 1, MAX_CONCURRENCY, whole=True)),
            timeout_seconds=_number(data, "timeout_seconds", 60.0, 0.001, MAX_TIMEOUT_SECONDS),
            retries=int(_number(data, "retries", 2, 0, MAX_RETRIES, whole=True)),
            binary_data=binary,
            management_url=management.rstrip("/"),
            headers=dict(headers),
            bearer_token_env=_string(data, "bearer_token_env"),
            tls=TLS(ca_file=_string(tls, "ca_file", where="tls.ca_file"),
                    cert_file=_string(tls, "cert_file", where="tls.cert_file"),
                    key_file=_string(tls, "key_file", where="tls.key_file"),
                    verify=bool(tls.get("verify", True))),
            secure=secure,
        )

    @property
    def where(self) -> str:
        """The predictor as messages name it."""
        return f"{self.protocol} predictor {self.model!r} at {self.url}"


def _string(data: dict[str, Any], key: str, required: bool = False, where: str = "") -> str:
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise InvalidRemote(f"manifest remote lacks {where or key}")
        return ""
    if not isinstance(value, str) or len(value) > 2048:
        raise InvalidRemote(f"manifest remote.{where or key} must be a string (at most 2048 "
                            "characters)")
    return value


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...],
            required: bool = False) -> str:
    value = _string(data, key, required) or choices[0]
    if value not in choices:
        raise InvalidRemote(f"manifest remote.{key} {value[:40]!r} must be one of "
                            f"{', '.join(choices)}")
    return value


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float,
            whole: bool = False) -> float:
    value = data.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not low <= value <= high
            or (whole and value != int(value))):
        kind = "an integer" if whole else "a number"
        raise InvalidRemote(f"manifest remote.{key} {value!r} must be {kind} within "
                            f"[{low:g}, {high:g}]")
    return float(value)


@dataclass
class Transfer:
    """One remote call's size: the request's and the response's body bytes."""

    sent: int
    received: int


class RemotePredictor:
    """Calls one predictor: chunks, concurrency, deadline, retries; no model file."""

    def __init__(self, spec: RemoteSpec, input_name: str, output_name: str) -> None:
        self.spec = spec
        self.input_name = input_name
        self.output_name = output_name
        self.metadata: dict[str, Any] = {}
        # Over V2 REST without remote.binary_data, probe() asks the predictor (GET /v2).
        self.binary_data = bool(spec.binary_data)
        headers = {"content-type": "application/json", **spec.headers}
        if spec.bearer_token_env:
            token = os.environ.get(spec.bearer_token_env)
            if not token:
                raise InvalidRemote(f"manifest remote.bearer_token_env names "
                                    f"{spec.bearer_token_env!r}, which is not set in the "
                                    "server's environment")
            headers["authorization"] = f"Bearer {token}"
        verify: Any = spec.tls.verify
        if spec.tls.ca_file:
            verify = spec.tls.ca_file
        cert = ((spec.tls.cert_file, spec.tls.key_file) if spec.tls.key_file
                else spec.tls.cert_file or None)
        self._client = httpx.Client(
            headers=headers, verify=verify, cert=cert, timeout=spec.timeout_seconds,
            limits=httpx.Limits(max_connections=spec.concurrency,
                                max_keepalive_connections=spec.concurrency))
        self._channel: grpc.Channel | None = None
        self._metadata = tuple((k.lower(), v) for k, v in headers.items()
                               if k != "content-type")
        if spec.protocol == V2_GRPC:
            self._channel = _grpc_channel(spec)
        self._pool = ThreadPoolExecutor(max_workers=spec.concurrency,
                                        thread_name_prefix=f"remote-{spec.model}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        if self._channel is not None:
            self._channel.close()

    def _grpc(self, method: str, request: Any, response_type: Any, timeout: float) -> Any:
        """One unary call of inference.GRPCInferenceService."""
        call = self._channel.unary_unary(  # type: ignore[union-attr]
            GRPC_SERVICE + method, request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString)
        return call(request, timeout=timeout, metadata=self._metadata)

    def read_metadata(self) -> dict[str, Any]:
        """The predictor's V2 model metadata (``name``, ``platform``, ``versions``, and
        ``inputs``/``outputs`` with their ``name``, ``datatype`` and ``shape``), kept in
        ``metadata``; {} over KServe V1, which has none; over TorchServe, what its management
        API says (``platform`` torchserve, ``versions``, ``workers``), else {}. Unavailable
        when the predictor does not answer or does not know the model."""
        spec = self.spec
        timeout = min(spec.timeout_seconds, 10)
        if spec.protocol == KSERVE_V1 or (spec.protocol == TORCHSERVE
                                          and not spec.management_url):
            return {}
        if spec.protocol == TORCHSERVE:
            return self._torchserve_metadata(timeout)
        if spec.protocol == V2_GRPC:
            try:
                answer = self._grpc("ModelMetadata", oip.ModelMetadataRequest(name=spec.model),
                                    oip.ModelMetadataResponse, timeout)
            except grpc.RpcError as exc:
                raise Unavailable(f"the {spec.where} does not answer: {exc.code().name}: "
                                  f"{exc.details()}") from exc
            self.metadata = {
                "name": answer.name, "versions": list(answer.versions),
                "platform": answer.platform,
                **{kind: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                          for t in getattr(answer, kind)] for kind in ("inputs", "outputs")}}
            return self.metadata
        path = f"/v2/models/{spec.model}"
        response = self._get(path, timeout)
        if response.status_code != 200:
            raise Unavailable(f"the {spec.where} answered GET {path} with HTTP "
                              f"{response.status_code}: {response.text[:200]}")
        self.metadata = _json(response, spec)
        return self.metadata

    def _get(self, path: str, timeout: float, method: str = "GET",
             base: str = "") -> httpx.Response:
        spec = self.spec
        ends = time.monotonic() + timeout
        try:
            with self._client.stream(method, (base or spec.url) + path,
                                     timeout=timeout) as streamed:
                return _read_answer(streamed, ends, spec)
        except httpx.HTTPError as exc:
            raise Unavailable(f"the {spec.where} does not answer: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _torchserve_metadata(self, timeout: float) -> dict[str, Any]:
        """``GET {management_url}/models/{model}``: the versions TorchServe serves and their
        workers' status, kept in ``metadata``."""
        spec = self.spec
        path = f"/models/{spec.model}"
        response = self._get(path, timeout, base=spec.management_url)
        if response.status_code != 200:
            raise Unavailable(f"the {spec.where} answered GET {spec.management_url}{path} "
                              f"(remote.management_url) with HTTP {response.status_code}: "
                              f"{response.text[:200]}")
        try:
            described = response.json()
        except ValueError:
            described = None
        if not isinstance(described, list) or not all(isinstance(d, dict) for d in described):
            raise Unavailable(f"the {spec.where} answered GET {spec.management_url}{path} "
                              "with something other than TorchServe's model description")
        workers = [str(w.get("status")) for d in described for w in d.get("workers") or []
                   if isinstance(w, dict)]
        self.metadata = {"name": spec.model, "platform": "torchserve",
                         "versions": [d.get("modelVersion") for d in described],
                         "workers": workers}
        return self.metadata

    def _probe_torchserve(self, timeout: float) -> None:
        """Ready when the management API shows a READY worker for the model; without
        ``management_url``, when ``/ping`` is healthy and the inference API knows the model
        (``OPTIONS /predictions/{model}``, which runs no handler)."""
        spec = self.spec
        if spec.management_url:
            workers = self._torchserve_metadata(timeout)["workers"]
            if "READY" not in workers:
                raise Unavailable(f"the {spec.where} has no READY worker for the model "
                                  f"(workers: {workers or 'none'})")
            return
        response = self._get("/ping", timeout)
        status = response.json().get("status") if _is_json_object(response) else None
        if response.status_code != 200 or status == "Unhealthy":
            raise Unavailable(f"the {spec.where} is not healthy (GET /ping: HTTP "
                              f"{response.status_code}: {response.text[:200]})")
        path = f"/predictions/{spec.model}"
        response = self._get(path, timeout, method="OPTIONS")
        if response.status_code != 200:
            raise Unavailable(f"the {spec.where} does not serve the model (OPTIONS {path}: "
                              f"HTTP {response.status_code}: {response.text[:200]})")

    def probe(self) -> None:
        """Asks the predictor whether the model is ready (and, over V2, for its metadata);
        Unavailable says why not, so the package is not ready with that reason."""
        spec = self.spec
        timeout = min(spec.timeout_seconds, 10)
        if spec.protocol == V2_GRPC:
            try:
                ready = self._grpc("ModelReady", oip.ModelReadyRequest(name=spec.model),
                                   oip.ModelReadyResponse, timeout).ready
            except grpc.RpcError as exc:
                raise Unavailable(f"the {spec.where} does not answer: {exc.code().name}: "
                                  f"{exc.details()}") from exc
            if not ready:
                raise Unavailable(f"the {spec.where} says the model is not ready")
            self._check_names(self.read_metadata())
            return
        if spec.protocol == TORCHSERVE:
            self._probe_torchserve(timeout)
            return
        if spec.protocol == KSERVE_V1:
            path = f"/v1/models/{spec.model}"
            response = self._get(path, timeout)
            if response.status_code != 200:
                raise Unavailable(f"the {spec.where} answered GET {path} with HTTP "
                                  f"{response.status_code}: {response.text[:200]}")
            if _json(response, spec).get("ready") is False:
                raise Unavailable(f"the {spec.where} says the model is not ready")
            return
        body = self.read_metadata()
        path = f"/v2/models/{spec.model}/ready"
        ready = self._get(path, timeout).status_code
        if ready != 200:
            raise Unavailable(f"the {spec.where} says the model is not ready (GET "
                              f"{path}: HTTP {ready})")
        self._check_names(body)
        if spec.binary_data is None:
            self.binary_data = BINARY_EXTENSION in self._extensions(timeout)

    def _extensions(self, timeout: float) -> list[str]:
        """The protocol extensions the V2 server lists (``GET /v2``); none when it does not
        say (a proxy that routes only the model's paths, say)."""
        try:
            response = self._get("/v2", timeout)
            listed = response.json().get("extensions") if response.status_code == 200 else []
        except (Unavailable, ValueError, AttributeError):
            return []
        return [str(each) for each in listed] if isinstance(listed, list) else []

    def _check_names(self, body: dict[str, Any]) -> None:
        """Unavailable when V2 metadata lacks the manifest's input or output name."""
        spec = self.spec
        inputs = [i.get("name") for i in body.get("inputs", []) if isinstance(i, dict)]
        outputs = [o.get("name") for o in body.get("outputs", []) if isinstance(o, dict)]
        if inputs and self.input_name not in inputs:
            raise Unavailable(f"the {spec.where} has no input {self.input_name!r} (the "
                              f"manifest's input.name); its inputs: {inputs}")
        if outputs and self.output_name not in outputs:
            raise Unavailable(f"the {spec.where} has no output {self.output_name!r} (the "
                              f"manifest's outputs.logits); its outputs: {outputs}")

    def describe(self) -> dict[str, str]:
        """What ``GetModel`` shows of the predictor: where it is and, over V2, what its
        metadata says (platform, versions)."""
        spec = self.spec
        shown = {"remote.protocol": spec.protocol, "remote.url": spec.url,
                 "remote.model": spec.model, "remote.max_batch": str(spec.max_batch)}
        if spec.protocol in (V2_REST, TORCHSERVE):
            shown["remote.binary_data"] = str(self.binary_data).lower()
        for key in ("platform", "versions"):
            if self.metadata.get(key):
                shown[f"remote.{key}"] = str(self.metadata[key])[:200]
        return shown

    def run(self, inputs: np.ndarray, state: RemoteState | None = None,
            count: Callable[[int, int], None] | None = None,
            fixed_batch: int = 0) -> np.ndarray:
        """The class scores of float32 ``inputs`` (already in the model's layout), in
        chunks of ``max_batch`` sent ``concurrency`` at a time. A predictor whose model
        takes exactly ``fixed_batch`` inputs gets chunks of that size, the last one padded
        by repeating its final input (the padding's scores dropped). ``count(calls,
        bytes)`` is told each finished call."""
        size = fixed_batch or self.spec.max_batch
        parts = [inputs[start:start + size] for start in range(0, inputs.shape[0], size)]
        kept = parts[-1].shape[0]
        if fixed_batch and kept < fixed_batch:
            parts[-1] = np.concatenate([parts[-1],
                                        np.repeat(parts[-1][-1:], fixed_batch - kept, axis=0)])
        if state is not None:
            state.check()
        deadline = state.deadline if state is not None else None
        if len(parts) == 1:
            return self._call(parts[0], deadline, state, count)[:kept]
        futures = [self._pool.submit(self._call, part, deadline, state, count)
                   for part in parts]
        try:
            scores = [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()
        scores[-1] = scores[-1][:kept]
        return np.concatenate(scores)

    def _call(self, batch: np.ndarray, deadline: float | None, state: RemoteState | None,
              count: Callable[[int, int], None] | None) -> np.ndarray:
        """One remote call with its retries, each bounded by the time the request has left."""
        spec = self.spec
        prepared = self._request(batch)
        attempt_once = self._grpc_attempt if spec.protocol == V2_GRPC else self._rest_attempt
        for attempt in range(spec.retries + 1):
            if state is not None:
                state.check()
            timeout = spec.timeout_seconds
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise DeadlineExceeded(f"the request's deadline passed while the {spec.where}"
                                           " was computing")
            try:
                scores = attempt_once(prepared, batch.shape[0], timeout, deadline, count)
            except _Retry as retry:
                problem = str(retry)
            else:
                if np.isnan(scores).any():  # no target or map is made of them
                    raise Unavailable(f"the {spec.where} answered NaN scores for "
                                      f"{int(np.isnan(scores).any(axis=1).sum())} of "
                                      f"{batch.shape[0]} inputs")
                return scores
            if attempt < spec.retries:
                time.sleep(RETRY_PAUSE_SECONDS * (2 ** attempt))
        raise Unavailable(f"the {spec.where} is unavailable after {spec.retries + 1} "
                          f"attempts: {problem}")

    def _rest_attempt(self, prepared: Any, rows: int, timeout: float, deadline: float | None,
                      count: Callable[[int, int], None] | None) -> np.ndarray:
        spec = self.spec
        path, body, headers = prepared
        ends = time.monotonic() + timeout
        try:
            with self._client.stream("POST", spec.url + path, content=body, headers=headers,
                                     timeout=timeout) as streamed:
                response = _read_answer(streamed, ends, spec)
        except httpx.TimeoutException as exc:
            _check_deadline(deadline, spec, exc)
            raise _Retry(f"no answer within {timeout:g} s (remote.timeout_seconds)") from exc
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        except httpx.DecodingError as exc:
            raise Unavailable(f"the {spec.where} answered a body that does not decode as its "
                              f"content-encoding says: {exc}") from exc
        if count is not None:
            count(1, len(body) + len(response.content))
        if response.status_code == 200:
            try:
                return self._scores(response, rows)
            except (ValueError, TypeError, AttributeError) as exc:  # what the predictor sent
                raise Unavailable(f"the {spec.where} answered a batch of {rows} with a body "
                                  f"that is not its protocol's: {type(exc).__name__}: "
                                  f"{str(exc)[:200]}") from exc
        problem = f"HTTP {response.status_code}: {response.text[:300]}"
        if response.status_code in RETRY_STATUSES:
            raise _Retry(problem)
        raise Unavailable(f"the {spec.where} refused a batch of {rows}: {problem}")

    def _grpc_attempt(self, request: Any, rows: int, timeout: float, deadline: float | None,
                      count: Callable[[int, int], None] | None) -> np.ndarray:
        spec = self.spec
        try:
            response = self._grpc("ModelInfer", request, oip.ModelInferResponse, timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                _check_deadline(deadline, spec, exc)
                raise _Retry(f"no answer within {timeout:g} s (remote.timeout_seconds)") from exc
            problem = f"gRPC {code.name}: {str(exc.details())[:300]}"
            if code in GRPC_RETRY_CODES:
                raise _Retry(problem) from exc
            raise Unavailable(f"the {spec.where} refused a batch of {rows}: {problem}") from exc
        if count is not None:
            count(1, request.ByteSize() + response.ByteSize())
        found = [i for i, o in enumerate(response.outputs) if o.name == self.output_name]
        if not found and len(response.outputs) == 1:
            found = [0]
        if not found:
            raise Unavailable(f"the {spec.where} answered without the output "
                              f"{self.output_name!r} (outputs.logits); it sent "
                              f"{[o.name for o in response.outputs]}")
        output = response.outputs[found[0]]
        if len(response.raw_output_contents) > found[0]:
            scores = np.frombuffer(response.raw_output_contents[found[0]], dtype="<f4")
        else:
            scores = np.asarray(output.contents.fp32_contents, dtype=np.float32)
        shape = list(output.shape)
        if shape and math.prod(shape) == scores.size:
            scores = scores.reshape(shape)
        if scores.ndim != 2 or scores.shape[0] != rows:
            raise Unavailable(f"the {spec.where} answered {rows} inputs with scores of shape "
                              f"{list(scores.shape)}; expected {rows}×classes")
        return scores.astype(np.float32)

    def _request(self, batch: np.ndarray) -> Any:
        """The path, body and extra headers of one call (float32 values written exactly:
        as JSON numbers, nine digits each (``core.json_numbers``), or with binary data as
        raw little-endian bytes after the JSON, or base64 over TorchServe)."""
        spec = self.spec
        if spec.protocol == V2_GRPC:
            return oip.ModelInferRequest(
                model_name=spec.model,
                inputs=[oip.ModelInferRequest.InferInputTensor(
                    name=self.input_name, datatype=spec.datatype, shape=list(batch.shape))],
                outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(
                    name=self.output_name)],
                raw_input_contents=[batch.astype("<f4", copy=False).tobytes()])
        if spec.protocol == KSERVE_V1:
            return (f"/v1/models/{spec.model}:predict",
                    b'{"instances": ' + json_array(batch) + b"}", {})
        tensor: dict[str, Any] = {"name": self.input_name, "shape": list(batch.shape),
                                  "datatype": spec.datatype}
        if spec.protocol == TORCHSERVE:
            data = (json.dumps(base64.b64encode(batch.astype("<f4", copy=False).tobytes())
                               .decode()).encode()
                    if self.binary_data else json_array(batch, nested=False))
            return f"/predictions/{spec.model}", _with_data(tensor, data), {}
        output: dict[str, Any] = {"name": self.output_name}
        path = f"/v2/models/{spec.model}/infer"
        if not self.binary_data:
            return path, (b'{"inputs": [' + _with_data(tensor, json_array(batch, nested=False))
                          + b'], "outputs": ' + json.dumps([output]).encode() + b"}"), {}
        raw = batch.astype("<f4", copy=False).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        output["parameters"] = {"binary_data": True}
        header = json.dumps({"inputs": [tensor], "outputs": [output]}).encode()
        return path, header + raw, {"content-type": "application/octet-stream",
                                    BINARY_HEADER: str(len(header))}

    def _scores(self, response: httpx.Response, rows: int) -> np.ndarray:
        """The class-score output of one answer, N×classes float32."""
        spec = self.spec
        if spec.protocol == TORCHSERVE:
            scores = self._torchserve_scores(response)
            if scores.ndim != 2 or scores.shape[0] != rows:
                raise Unavailable(f"the {spec.where} answered {rows} inputs with scores of "
                                  f"shape {list(scores.shape)}; expected {rows}×classes")
            return scores
        length = response.headers.get(BINARY_HEADER)
        raw = b""
        if length is not None and length.isdigit():
            body = json.loads(response.content[:int(length)])
            raw = response.content[int(length):]
        else:
            body = _json(response, spec)
        if spec.protocol == KSERVE_V1:
            predictions = body.get("predictions")
            if (isinstance(predictions, list) and predictions
                    and isinstance(predictions[0], dict)):
                predictions = [p.get(self.output_name) for p in predictions]
            scores = _array(predictions, spec)
        else:
            outputs = body.get("outputs")
            found = [o for o in outputs or [] if isinstance(o, dict)
                     and o.get("name") == self.output_name]
            if not found and isinstance(outputs, list) and len(outputs) == 1:
                found = outputs
            if not found:
                names = [o.get("name") for o in outputs or [] if isinstance(o, dict)]
                raise Unavailable(f"the {spec.where} answered without the output "
                                  f"{self.output_name!r} (outputs.logits); it sent {names}")
            output = found[0]
            size = (output.get("parameters") or {}).get("binary_data_size")
            if isinstance(size, int) and raw:
                offset = 0  # binary outputs follow the JSON in the order it lists them
                for each in outputs:
                    if each is output:
                        break
                    offset += int((each.get("parameters") or {}).get("binary_data_size", 0))
                scores = np.frombuffer(raw[offset:offset + size], dtype="<f4").astype(
                    np.float32)
            else:
                scores = _array(output.get("data"), spec)
            shape = output.get("shape")
            if isinstance(shape, list) and shape and math.prod(shape) == scores.size:
                scores = scores.reshape(shape)
        if scores.ndim != 2 or scores.shape[0] != rows:
            raise Unavailable(f"the {spec.where} answered {rows} inputs with scores of shape "
                              f"{list(scores.shape)}; expected {rows}×classes")
        return scores


    def _torchserve_scores(self, response: httpx.Response) -> np.ndarray:
        """A TorchServe handler's answer: the score rows, or a tensor ``{shape, data}``
        (data as numbers or base64 float32), either one possibly under ``outputs.logits``."""
        spec = self.spec
        try:
            body = response.json()
        except ValueError as exc:
            raise Unavailable(f"the {spec.where} answered with something other than JSON: "
                              f"{response.text[:120]!r}") from exc
        if isinstance(body, dict) and self.output_name in body:
            body = body[self.output_name]
        if not isinstance(body, dict):
            return _array(body, spec)
        data = body.get("data")
        if isinstance(data, str):
            try:
                scores = np.frombuffer(base64.b64decode(data, validate=True), "<f4")
            except (binascii.Error, ValueError) as exc:
                raise Unavailable(f"the {spec.where} answered data that is neither numbers "
                                  "nor base64 float32") from exc
            scores = scores.astype(np.float32)
        else:
            scores = _array(data, spec)
        shape = body.get("shape")
        if isinstance(shape, list) and shape and math.prod(shape) == scores.size:
            scores = scores.reshape(shape)
        return scores


class _Retry(Exception):  # noqa: N818 - a signal within _call, never raised beyond it
    """One attempt failed in a way worth another: the message says how."""


def _check_deadline(deadline: float | None, spec: RemoteSpec, cause: Exception) -> None:
    """DeadlineExceeded when a timed-out call was bounded by the request's deadline."""
    if deadline is not None and time.monotonic() >= deadline - 1e-3:
        raise DeadlineExceeded(f"the request's deadline passed while the {spec.where} was "
                               "computing") from cause


def _grpc_channel(spec: RemoteSpec) -> grpc.Channel:
    """A channel to a V2 gRPC predictor: TLS when ``tls`` is given, no message size cap."""
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    tls = spec.tls
    if not (tls.ca_file or tls.cert_file or spec.secure):
        return grpc.insecure_channel(spec.url, options=options)

    def read(path: str) -> bytes | None:
        return open(path, "rb").read() if path else None  # noqa: PTH123, SIM115

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca_file), private_key=read(tls.key_file),
        certificate_chain=read(tls.cert_file))
    return grpc.secure_channel(spec.url, credentials, options=options)


def _with_data(tensor: dict[str, Any], data: bytes) -> bytes:
    """The JSON object ``tensor`` with ``data`` (JSON text already) as its last member."""
    return json.dumps(tensor).encode()[:-1] + b', "data": ' + data + b"}"


def _read_answer(response: httpx.Response, ends: float, spec: RemoteSpec) -> httpx.Response:
    """``response`` read whole by ``ends`` (monotonic) and within ``MAX_ANSWER_BYTES``: a
    predictor that trickles its answer is stopped at the call's bound, not at each read's."""
    coding = response.headers.get("content-encoding", "")
    if len([c for c in coding.split(",") if c.strip().lower() not in ("", "identity")]) > 1:
        raise Unavailable(f"the {spec.where} answered with content-encoding {coding[:80]!r}: "
                          "one coding at most is decoded (each can multiply the size by a "
                          "thousand)")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise Unavailable(f"the {spec.where} answered more than "
                              f"{MAX_ANSWER_BYTES / (1 << 20):g} MiB for one call")
        if time.monotonic() > ends:
            raise httpx.ReadTimeout("the answer did not end in time", request=response.request)
        chunks.append(chunk)
    headers = [(key, value) for key, value in response.headers.raw
               if key.lower() not in (b"content-encoding", b"content-length")]  # decoded
    return httpx.Response(response.status_code, headers=headers, content=b"".join(chunks),
                          request=response.request)


def _json(response: httpx.Response, spec: RemoteSpec) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise Unavailable(f"the {spec.where} answered with something other than JSON: "
                          f"{response.text[:120]!r}") from exc
    if not isinstance(body, dict):
        raise Unavailable(f"the {spec.where} answered with JSON that is not an object")
    return body


def _is_json_object(response: httpx.Response) -> bool:
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False


def _array(values: Any, spec: RemoteSpec) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise Unavailable(f"the {spec.where} answered with scores that are not numbers") from exc
