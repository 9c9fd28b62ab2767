"""The HTTP/JSON API: the same calls as gRPC (``protocol.calls``), read from JSON or a form.

Routes (``/openapi.json`` describes them): the native API under ``/api/v1`` in the proto's
JSON mapping (``explain``, ``explain/stream`` as server-sent events, ``predict``, ``models``,
``models/{model}``), KServe V1 under ``/v1/models``, health at ``/healthz`` and ``/readyz``,
and the explorer at ``/explorer/``. A call's framing is HTTP's: ``x-request-id`` in and out,
``x-timeout-ms`` as its deadline, ``Authorization: Bearer`` with the gRPC server's tokens; a
failure is its gRPC status mapped to HTTP (``saliency_service.protocol.status``) with a JSON body
``{"error": {"code", "status", "message", "request_id"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from saliency_service.core.errors import Cancelled, InvalidInput, ServiceError
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol import kserve
from saliency_service.protocol.calls import CallInfo, Calls, request_id_from
from saliency_service.protocol.json_messages import (
    BodyTooLarge,
    loads_json,
    parse,
    set_plain_params,
    shown,
    to_json,
)
from saliency_service.protocol.method_params import ParamError, parse_assignments
from saliency_service.protocol.status import http_status_of, status_of
from saliency_service.protocol.stream_updates import (
    LatestUpdates,
    drained,
    superseded_progress,
)
from saliency_service.serving.metrics import Metrics
from saliency_service.serving.security import bearer_token_valid

T = TypeVar("T")
log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
RECORDED = "saliency.recorded"  # scope key: the request reached Calls, which records it
TIMEOUT_HEADER = "x-timeout-ms"
OFF_LOOP_BYTES = 256 * 1024  # bodies from this size on are parsed on a worker thread
# Served without a token, like gRPC health: probes, the description and the explorer's page
# and files (its data routes, /explorer/cell and the like, need the token).
OPEN_PATHS = ("/", "/healthz", "/readyz", "/openapi.json", "/favicon.ico", "/explorer",
              "/explorer/", "/explorer/index.html", "/explorer/explorer.js",
              "/explorer/explorer.css")
OPEN_PREFIXES: tuple[str, ...] = ()
UNAUTHENTICATED_MESSAGE = ("missing or invalid bearer token: send the header "
                           "'Authorization: Bearer <token>'")


class ClientGone(Cancelled):
    """The client closed the connection before the answer."""


def error_body(code: grpc.StatusCode, message: str, request_id: str,
               http_status: int | None = None) -> dict[str, Any]:
    return {"error": {"code": http_status or http_status_of(code), "status": code.name,
                      "message": message, "request_id": request_id}}


def error_response(error: ServiceError, request_id: str) -> JSONResponse:
    code = status_of(error)
    status = 413 if isinstance(error, BodyTooLarge) else http_status_of(code)
    return JSONResponse(error_body(code, str(error), request_id, status), status_code=status,
                        headers={REQUEST_ID_HEADER: request_id})


def call_info(request: Request) -> CallInfo:
    """The call's request id (the client's ``x-request-id`` when sane) and its deadline from
    ``x-timeout-ms``."""
    request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    deadline = None
    timeout = request.headers.get(TIMEOUT_HEADER)
    if timeout is not None:
        try:
            milliseconds = float(timeout)
        except ValueError:
            milliseconds = math.nan
        if not (math.isfinite(milliseconds) and milliseconds > 0):
            raise InvalidInput(f"{TIMEOUT_HEADER}={shown(timeout)} must be a positive number "
                               "of milliseconds")
        deadline = time.monotonic() + milliseconds / 1000.0
    return CallInfo("http", request_id, deadline)


def _entered(request: Request) -> None:
    """Marks the request as handed to ``Calls``, which records it from then on."""
    request.scope[RECORDED] = True


async def watched(request: Request, awaitable: Awaitable[T]) -> T:
    """The result of ``awaitable`` (a call of ``Calls``), cancelled (so the call records
    CANCELLED and its worker stops) if the client disconnects first."""
    _entered(request)
    task = asyncio.ensure_future(awaitable)

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():  # the client left first: the call is recording its cancellation
        await asyncio.wait((task,))
    if task.cancelled():
        raise ClientGone("the client closed the connection")
    return task.result()


def _form_value(descriptor: Any, name: str, text: str) -> Any:
    """A text form field as the JSON value of the request field it names."""
    field = descriptor.fields_by_name.get(name)
    if field is None:
        return text  # refused by parse with the list of fields
    if field.message_type is not None or field.is_repeated:
        return loads_json(text, f"form field {name!r}")
    if field.type == field.TYPE_BOOL:
        return text.strip().lower() in ("1", "true", "yes", "on")
    return text


def _request_field(text: str) -> dict[str, Any]:
    given = loads_json(text, "form field 'request'")
    if not isinstance(given, dict):
        raise InvalidInput("form field 'request' must be a JSON object")
    return given


class HttpApi:
    """The routes over one server's calls."""

    def __init__(self, calls: Calls, ready: Callable[[], bool], max_body_bytes: int) -> None:
        self.calls = calls
        self.ready = ready
        self.max_body_bytes = max_body_bytes

    # ---- reading a request ---------------------------------------------------------------

    async def body(self, request: Request) -> bytearray:
        """The request body, refused beyond ``--max-message-bytes`` as gRPC refuses a
        message: at once when its ``content-length`` says so, else once that much has come.
        One buffer holds it (no copy of the whole at the end)."""
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and (
                len(declared) > 18 or int(declared) > self.max_body_bytes):
            raise self._too_large(declared)
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > self.max_body_bytes:
                raise self._too_large(f"over {len(body) + len(chunk)}")
            body += chunk
        request._body = body  # where the form parser reads it
        return body

    def _too_large(self, size: str) -> BodyTooLarge:
        size = size if len(size) <= 24 else size[:23] + "…"
        return BodyTooLarge(f"request body of {size} bytes exceeds the limit "
                            f"max_message_bytes={self.max_body_bytes} (--max-message-bytes)")

    async def parsed(self, request: Request, reader: Callable[[bytes | bytearray], T]) -> T:
        """``reader`` applied to the body (``b"{}"`` when empty); a large body is read on a
        worker thread, so the event loop goes on answering other calls and probes."""
        body = await self.body(request) or b"{}"
        if len(body) < OFF_LOOP_BYTES:
            return reader(body)
        return await asyncio.to_thread(reader, body)

    async def message(self, request: Request, message_class: type[T]) -> T:
        """A request message from its JSON body, or from a multipart form: a ``request`` field
        (JSON), fields named after request fields, ``param`` fields (``steps=64``: the method's
        parameters, as the CLI's ``--param``), and ``image`` files (PNG or JPEG) as the
        input's images."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await self.parsed(request, lambda body: parse(  # type: ignore[type-var]
                loads_json(body), message_class))
        request._body = bytes(await self.body(request))  # the form parser takes bytes
        descriptor = message_class.DESCRIPTOR  # type: ignore[attr-defined]
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        plain: list[str] = []  # param=name=value, as the CLI's --param
        try:
            async with request.form(max_part_size=self.max_body_bytes) as form:
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if name != "image":
                            raise InvalidInput(f"file field {name!r}: send images as 'image'")
                        images.append(await value.read())
                    elif name == "request":
                        fields.update(_request_field(value))
                    elif name == "param":
                        plain.append(value)
                    else:
                        fields[name] = _form_value(descriptor, name, value)
        except HTTPException as exc:
            raise InvalidInput(f"malformed multipart form: {exc.detail}") from exc
        message: Any = parse(fields, message_class)  # type: ignore[type-var]
        if plain:
            if not isinstance(message, pb.ExplainRequest):
                raise InvalidInput("param fields are method parameters: Explain takes them")
            try:
                values = parse_assignments(plain)
            except ParamError as exc:
                raise InvalidInput(str(exc).replace("--param", "param")) from exc
            set_plain_params(message, values)
        if images:
            if message.input.WhichOneof("kind") == "tensor":
                raise InvalidInput("the form has both a tensor input and image files; send one")
            message.input.images.images.extend(images)
        return message  # type: ignore[no-any-return]

    # ---- routes --------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        post, get = ["POST"], ["GET"]
        return [
            Route("/api/v1/explain", self._endpoint(self.explain), methods=post),
            Route("/api/v1/explain/stream", self._endpoint(self.explain_stream), methods=post),
            Route("/api/v1/predict", self._endpoint(self.predict), methods=post),
            Route("/api/v1/models", self._endpoint(self.list_models), methods=get),
            Route("/api/v1/models/{model}", self._endpoint(self.get_model), methods=get),
            Route("/v1/models", self._endpoint(self.kserve_models), methods=get),
            Route("/v1/models/{name}:predict", self._endpoint(self.kserve_predict),
                  methods=post),
            Route("/v1/models/{name}:explain", self._endpoint(self.kserve_explain),
                  methods=post),
            Route("/v1/models/{name}", self._endpoint(self.kserve_model), methods=get),
            Route("/healthz", self.live, methods=get),
            Route("/readyz", self.readiness, methods=get),
        ]

    def _endpoint(self, handler: Callable[[Request, CallInfo], Awaitable[Response]]
                  ) -> Callable[[Request], Awaitable[Response]]:
        """The route: reads the call's framing, runs ``handler`` and answers a domain error
        with its status."""
        async def endpoint(request: Request) -> Response:
            try:
                call = call_info(request)
            except ServiceError as exc:
                call = CallInfo("http", request_id_from(request.headers.get(REQUEST_ID_HEADER)))
                self._refused(request, call, exc)
                return error_response(exc, call.request_id)
            try:
                response = await handler(request, call)
            except ServiceError as exc:
                if not request.scope.get(RECORDED):
                    self._refused(request, call, exc)
                return error_response(exc, call.request_id)
            except Exception as exc:  # noqa: BLE001 - a bug: answered and logged once, here
                return _internal_response(call.request_id, exc)
            response.headers[REQUEST_ID_HEADER] = call.request_id
            return response

        return endpoint

    def _refused(self, request: Request, call: CallInfo, error: ServiceError) -> None:
        """Records a request refused before it reached ``Calls`` (which records the others):
        counted in the metrics, and one log line without a traceback — a client's mistake."""
        code = status_of(error)
        self.calls.metrics.transport_requests.labels(call.transport, code.name).inc()
        reason = str(error)
        log.info("request %s %s refused %s: %s", request.method, request.url.path[:200],
                 code.name, reason if len(reason) <= 300 else reason[:299] + "…",
                 extra={"event": "request", "request_id": call.request_id,
                        "transport": call.transport, "code": code.name})

    async def explain(self, request: Request, call: CallInfo) -> Response:
        message = await self.message(request, pb.ExplainRequest)
        return _json(await watched(request, self.calls.explain(message, call)))

    async def explain_stream(self, request: Request, call: CallInfo) -> Response:
        """Server-sent events: ``progress`` (a ``Progress``) while a long method runs, then one
        ``result`` (the ``ExplainResponse``) or ``error``. A request refused before it starts
        is answered with its HTTP status instead."""
        message = await self.message(request, pb.ExplainRequest)
        _entered(request)
        queue: LatestUpdates[pb.Progress] = LatestUpdates(supersede=superseded_progress)
        task = asyncio.ensure_future(self.calls.explain(message, call, queue.put))
        first = asyncio.ensure_future(queue.get())
        try:
            await watched(request, asyncio.wait((task, first),
                                                return_when=asyncio.FIRST_COMPLETED))
        except ClientGone:
            task.cancel()
            first.cancel()
            raise
        if not first.done():
            first.cancel()
            task.result()  # a refusal raises here, answered with its status

        async def events() -> AsyncIterator[bytes]:
            if first.done() and not first.cancelled():
                yield _event("progress", to_json(first.result()))
            async for progress in drained(queue, task):
                yield _event("progress", to_json(progress))
            try:
                yield _event("result", to_json(await task))
            except ServiceError as exc:
                yield _event("error", error_body(status_of(exc), str(exc), call.request_id))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    async def predict(self, request: Request, call: CallInfo) -> Response:
        message = await self.message(request, pb.PredictRequest)
        return _json(await watched(request, self.calls.predict(message, call)))

    async def list_models(self, request: Request, call: CallInfo) -> Response:
        return _json(self.calls.list_models())

    async def get_model(self, request: Request, call: CallInfo) -> Response:
        version = request.query_params.get("version", "0")
        if not (version.isascii() and version.isdigit()):
            raise InvalidInput(f"version={shown(version)} must be a non-negative integer "
                               "(0 = latest)")
        return _json(self.calls.get_model(parse(
            {"model": request.path_params["model"], "version": version},
            pb.GetModelRequest)))

    # ---- KServe V1 -----------------------------------------------------------------------

    async def kserve_models(self, request: Request, call: CallInfo) -> Response:
        names = sorted({status.name for status in self.calls.list_models().models})
        return JSONResponse({"models": names})

    async def kserve_model(self, request: Request, call: CallInfo) -> Response:
        name = request.path_params["name"]
        statuses = [s for s in self.calls.list_models().models if s.name == name]
        if not statuses:
            self.calls.get_model(pb.GetModelRequest(model=name))  # raises NOT_FOUND
        ready = any(s.ready for s in statuses)  # 503 when not, as KServe's probes expect
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    async def kserve_predict(self, request: Request, call: CallInfo) -> Response:
        name = request.path_params["name"]
        message = await self.parsed(
            request, lambda body: kserve.predict_request(
                name, kserve.parse_body(body, self.max_body_bytes)))
        response = await watched(request, self.calls.predict(message, call))
        return JSONResponse(kserve.predict_response(response))

    async def kserve_explain(self, request: Request, call: CallInfo) -> Response:
        name = request.path_params["name"]
        message = await self.parsed(
            request, lambda body: kserve.explain_request(
                name, kserve.parse_body(body, self.max_body_bytes)))
        response = await watched(request, self.calls.explain(message, call))
        return JSONResponse(kserve.explain_response(response))

    # ---- health --------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "SERVING"})

    async def readiness(self, request: Request) -> Response:
        ready = self.ready()
        return JSONResponse({"status": "SERVING" if ready else "NOT_SERVING"},
                            status_code=200 if ready else 503)


def _json(message: Message) -> JSONResponse:
    return JSONResponse(to_json(message))


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class BearerAuth:
    """ASGI middleware refusing calls without an accepted bearer token (HTTP 401)."""

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...], metrics: Metrics) -> None:
        self.app = app
        self.tokens = tuple(token.encode() for token in tokens)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthenticated").inc()
        request_id = request_id_from(_header(scope, b"x-request-id"))
        response = JSONResponse(
            error_body(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, request_id),
            status_code=401, headers={"www-authenticate": "Bearer",
                                      REQUEST_ID_HEADER: request_id})
        await response(scope, receive, send)

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization")
        return value is not None and bearer_token_valid(value, self.tokens)


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


async def _internal(request: Request, exc: Exception) -> Response:
    """A server bug outside the routes: INTERNAL in the API's JSON error shape (the traceback
    goes to the log)."""
    return _internal_response(request_id_from(request.headers.get(REQUEST_ID_HEADER)), exc)


def _internal_response(request_id: str, exc: Exception) -> Response:
    """A server bug: INTERNAL in the API's JSON error shape, its traceback logged once."""
    log.error("HTTP request %s failed: %s", request_id, type(exc).__name__, exc_info=exc,
              extra={"event": "internal_error", "request_id": request_id,
                     "transport": "http", "code": "INTERNAL"})
    message = (f"internal error ({type(exc).__name__}); request id {request_id} — quote it to "
               "the operator, whose log has the traceback")
    return JSONResponse(error_body(grpc.StatusCode.INTERNAL, message, request_id),
                        status_code=500, headers={REQUEST_ID_HEADER: request_id})


async def _not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in the API's JSON error shape."""
    status = getattr(exc, "status_code", 500)
    code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
        status, grpc.StatusCode.INVALID_ARGUMENT)
    message = (f"no route {request.method} {request.url.path}; the routes are listed at "
               "/openapi.json")
    request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    return JSONResponse(error_body(code, message, request_id, status), status_code=status,
                        headers={REQUEST_ID_HEADER: request_id})


def build_app(calls: Calls, metrics: Metrics, tokens: tuple[str, ...],
              ready: Callable[[], bool], max_body_bytes: int,
              extra_routes: list[BaseRoute] | None = None) -> ASGIApp:
    """The ASGI application; ``extra_routes`` (the explorer, the description) are served
    beside the API."""
    api = HttpApi(calls, ready, max_body_bytes)
    # The form parser warns of each malformed form, which the API answers and logs itself.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    app = Starlette(routes=[*api.routes(), *(extra_routes or [])],
                    exception_handlers={HTTPException: _not_found, Exception: _internal})
    return BearerAuth(app, tokens, metrics) if tokens else app
