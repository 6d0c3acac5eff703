"""The OpenAI-compatible HTTP front door: `OpenAI(base_url=".../v1")` works unchanged.

Every chat call goes through the inference service's own `Complete` or
`StreamComplete` handler, in process, with the caller's key: the same validation,
cache, routing, budgets, ledger rows and trace as a gRPC caller gets. The front door
only translates (services/front_door/openai_wire.py) and adds its own SERVER span."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.auth import Principal
from services.common.metrics import PROMETHEUS_CONTENT_TYPE
from services.front_door import openai_wire as wire
from services.front_door.openai_wire import WireError

# A call's deadline inside the mesh: the provider timeout and retries fit well within.
CALL_TIMEOUT_SECONDS = 600.0
# The largest request body read: the mesh refuses a message of a million characters
# anyway, and an unbounded read would let any caller exhaust memory.
MAX_BODY_BYTES = 16 * 1024 * 1024
# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code)
_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "insufficient_quota", "insufficient_quota"),
    grpc.StatusCode.CANCELLED: (499, "api_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "api_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "api_error", "timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "api_error", None),
}


class FrontDoor:
    """The ASGI application; `channel` reaches this process's inference service (None
    in a process without it: /metrics only)."""

    def __init__(
        self,
        channel: grpc.aio.Channel | None,
        models: Sequence[str],
        authenticate: Callable[[str], Principal | None],
        tracer: trace.Tracer,
        *,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        """`metrics`: the process's metrics in Prometheus's text format, served at
        GET /metrics without a key, as Prometheus scrapes."""
        self._inference = inference_pb2_grpc.InferenceServiceStub(channel) if channel else None
        self._models = frozenset(models)
        self._listed = [wire.AUTO_MODEL, *sorted(models)]
        self._authenticate = authenticate
        self._tracer = tracer
        self._metrics = metrics
        routes = []
        if channel is not None:
            routes += [
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._get_model, methods=["GET"]),
            ]
        if metrics is not None:
            routes.append(Route("/metrics", self._scrape, methods=["GET"]))
        self.app = Starlette(
            routes=routes,
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    async def _chat(self, request: Request) -> Response:
        """A stream's span ends with its last event, any other call's with its reply."""
        span = self._server_span(request)
        streaming = False
        with trace.use_span(span, end_on_exit=False):
            try:
                key = self._check_key(request)  # before the body is read: strangers cost nothing
                call = wire.parse_chat(await _json(request), request.headers, self._models)
                metadata = (("authorization", f"Bearer {key}"),)
                if call.stream:
                    response: Response = await self._stream(call, metadata, span)
                    streaming = True
                else:
                    response = await self._complete(call, metadata)
            except WireError as exc:
                response = _error(exc)
            except grpc.aio.AioRpcError as exc:
                response = _error(from_rpc_error(exc))
            except BaseException:
                _finish_span(span, 500)
                raise
        if not streaming:
            _finish_span(span, response.status_code)
        return response

    async def _complete(
        self, call: wire.ChatCall, metadata: tuple[tuple[str, str], ...]
    ) -> Response:
        assert self._inference is not None  # the route exists only with it
        reply = await self._inference.Complete(
            call.request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
        )
        return JSONResponse(
            wire.completion(reply, wire.now()),
            headers={f"x-costmesh-{k}": v for k, v in wire.costmesh_fields(reply).items()},
        )

    async def _stream(
        self, call: wire.ChatCall, metadata: tuple[tuple[str, str], ...], span: trace.Span
    ) -> Response:
        """The first piece is awaited before answering, so a refused request gets its
        HTTP status; a failure after that arrives as an `error` event, as OpenAI sends."""
        assert self._inference is not None  # the route exists only with it
        stream = self._inference.StreamComplete(
            inference_pb2.StreamCompleteRequest(request=call.request),
            metadata=metadata,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        pieces = aiter(stream)
        first = await anext(pieces, None)
        return StreamingResponse(
            self._events(call, first, pieces, span),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _events(
        self,
        call: wire.ChatCall,
        first: inference_pb2.StreamCompleteResponse | None,
        pieces: AsyncIterator[inference_pb2.StreamCompleteResponse],
        span: trace.Span,
    ) -> AsyncIterator[bytes]:
        failed = False
        try:
            async for event in self._chunks(call, first, pieces):
                failed = failed or event.startswith(b'data: {"error"')
                yield event
        finally:
            close = getattr(pieces, "aclose", None)
            try:
                if close is not None:
                    await asyncio.shield(close())
            finally:
                if failed:  # the status was sent (200); the stream itself failed
                    span.set_status(Status(StatusCode.ERROR, "stream failed"))
                _finish_span(span, 200)

    async def _chunks(
        self,
        call: wire.ChatCall,
        first: inference_pb2.StreamCompleteResponse | None,
        pieces: AsyncIterator[inference_pb2.StreamCompleteResponse],
    ) -> AsyncIterator[bytes]:
        created = wire.now()
        # One id on every chunk, known before the mesh's request id is.
        call_id = f"chatcmpl-{call.request.request_id or uuid.uuid4().hex}"
        model = call.asked_model
        started = False
        try:
            piece = first
            while piece is not None:
                if piece.HasField("summary"):
                    summary = piece.summary
                    if not started:
                        yield _event(wire.chunk(call_id, created, summary.model,
                                                {"role": "assistant", "content": ""}))  # fmt: skip
                    done = wire.chunk(call_id, created, summary.model, {},
                                      summary.finish_reason or "stop")  # fmt: skip
                    if call.include_usage:
                        yield _event(done)
                        done = {**wire.chunk(call_id, created, summary.model, {}),
                                "choices": [], "usage": wire.usage(summary)}  # fmt: skip
                    yield _event({**done, "costmesh": wire.costmesh_fields(summary)})
                    break
                delta: dict[str, Any] = {"content": piece.delta}
                if not started:
                    delta = {"role": "assistant", **delta}
                    started = True
                yield _event(wire.chunk(call_id, created, model, delta))
                piece = await anext(pieces, None)
        except grpc.aio.AioRpcError as exc:
            yield _event(from_rpc_error(exc).body())
        yield b"data: [DONE]\n\n"

    async def _list_models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except WireError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [_model(m) for m in self._listed]})

    async def _get_model(self, request: Request) -> Response:
        try:
            self._check_key(request)
            name = request.path_params["model"]
            if name not in self._listed:
                raise WireError(404, f"The model {name!r} does not exist in this mesh",
                                param="model", code="model_not_found")  # fmt: skip
        except WireError as exc:
            return _error(exc)
        return JSONResponse(_model(name))

    async def _scrape(self, request: Request) -> Response:
        assert self._metrics is not None  # the route exists only with it
        return Response(self._metrics(), media_type=PROMETHEUS_CONTENT_TYPE)

    def _check_key(self, request: Request) -> str:
        key = _bearer(request)
        if self._authenticate(key) is None:
            raise WireError(401, "Incorrect API key provided", code="invalid_api_key",
                            kind="authentication_error")  # fmt: skip
        return key

    def _server_span(self, request: Request) -> trace.Span:
        return self._tracer.start_span(
            f"{request.method} {request.url.path}",
            context=propagate.extract(dict(request.headers)),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.url.path,
                "costmesh.transport": "http",
            },
        )


def _finish_span(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def _bearer(request: Request) -> str:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise WireError(
            401,
            "You didn't provide an API key: send Authorization: Bearer <costmesh API key>",
            code="missing_api_key",
            kind="authentication_error",
        )
    return key.strip()


async def _json(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WireError(400, f"the request body is not valid JSON: {exc}") from None


def _too_large() -> WireError:
    return WireError(413, f"the request body is over {MAX_BODY_BYTES // (1024 * 1024)} MiB",
                     code="request_too_large")  # fmt: skip


def from_rpc_error(exc: grpc.aio.AioRpcError) -> WireError:
    """The mesh's status in OpenAI's shape, OpenAI's codes kept (clients branch on
    them): a BadRequest detail names the param; the ErrorInfo reason (docs/errors.md)
    rides along as `costmesh_reason` and the x-costmesh-error-reason header."""
    status, kind, code = _ERRORS.get(exc.code(), (500, "api_error", None))
    param = None
    reason = ""
    raw = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
    if isinstance(raw, bytes):
        for detail in status_pb2.Status.FromString(raw).details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                param = bad.field_violations[0].field if bad.field_violations else None
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
    return WireError(
        status, exc.details() or exc.code().name, param=param, code=code, kind=kind,
        reason=reason,
    )  # fmt: skip


def _error(exc: WireError) -> Response:
    headers = {"x-costmesh-error-reason": exc.reason} if exc.reason else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "costmesh"}


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(WireError(404, f"no route {request.method} {request.url.path}: the "
                            "front door serves /v1/chat/completions and /v1/models",
                            code="unknown_url"))  # fmt: skip


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error(WireError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed"))  # fmt: skip
