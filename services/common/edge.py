"""The servicer edge: authenticate each call and turn exceptions into gRPC statuses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.rpc import status_pb2
from opentelemetry import metrics

from services.common import access, auth, errors

log = logging.getLogger(__name__)
# Health and reflection must answer without a key (load balancers and grpcurl).
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Every costmesh call, by service, method and status (OpenTelemetry RPC conventions):
# rate, errors and latency of each service, on either transport.
_DURATION = metrics.get_meter("costmesh.edge").create_histogram(
    "rpc.server.duration", unit="s", description="Duration of costmesh RPCs, by status"
)


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every costmesh handler: API key check, then error translation."""

    def __init__(
        self, keys: auth.KeyTable, table: Mapping[str, frozenset[str]] = access.ACCESS
    ) -> None:
        self._keys = keys
        self._table = table  # who may call which RPC

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        # Handlers are namedtuples: swap in the wrapped behaviour, keep the serializers.
        # Every kind is wrapped, so a future streaming RPC cannot skip authentication.
        fields: Any = handler
        if fields.request_deserializer is not None:
            fields = fields._replace(request_deserializer=_lenient(fields.request_deserializer))
        if fields.unary_unary is not None:
            return fields._replace(unary_unary=self._wrap_unary(fields.unary_unary, method))  # type: ignore[no-any-return]
        if fields.stream_unary is not None:
            return fields._replace(stream_unary=self._wrap_unary(fields.stream_unary, method))  # type: ignore[no-any-return]
        if fields.unary_stream is not None:
            return fields._replace(unary_stream=self._wrap_stream(fields.unary_stream, method))  # type: ignore[no-any-return]
        return fields._replace(stream_stream=self._wrap_stream(fields.stream_stream, method))  # type: ignore[no-any-return]

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> object:
        """The caller's principal, if the access table lets it call `method`."""
        principal = self._keys.authenticate(context.invocation_metadata() or ())
        if principal.role == "service":
            principal = dataclasses.replace(principal, service=_certificate_name(context))
        access.check(method, principal, self._table)
        return auth.set_current(principal)

    def _wrap_unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str
    ) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                token = self._authenticate(context, method)
                try:
                    _check_readable(request)
                    return await behavior(request, context)
                finally:
                    auth.reset_current(token)
            except BaseException as exc:
                code = _code_of(exc, context)
                if not isinstance(exc, Exception):
                    raise
                await _abort(context, exc, method)
            finally:
                _record(method, code, started)

        return unary

    def _wrap_stream(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                token = self._authenticate(context, method)
                try:
                    _check_readable(request)
                    async for response in behavior(request, context):
                        yield response
                finally:
                    # A stream the client cancelled is closed from another context,
                    # where the token cannot be reset; that context ends anyway.
                    with contextlib.suppress(ValueError):
                        auth.reset_current(token)
            except BaseException as exc:
                code = _code_of(exc, context)
                if not isinstance(exc, Exception):
                    raise
                await _abort(context, exc, method)
            finally:
                _record(method, code, started)

        return stream


def _certificate_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The service a verified client certificate names (its common name), or
    NO_CERTIFICATE when the connection carries none (plaintext, TLS without a client
    CA, or an in-process call, whose caller is this process's own inference). A
    certificate that names no service by a plain name is "(unnamed)", which no entry
    of the access table grants."""
    auth_context = getattr(context, "auth_context", None)
    properties = auth_context() if auth_context else {}
    if not properties.get("x509_pem_cert"):
        return access.NO_CERTIFICATE
    names = [n.decode(errors="replace") for n in properties.get("x509_common_name", ())]
    name = names[0] if len(names) == 1 else ""
    return name if name.replace("-", "").replace("_", "").isalnum() else "(unnamed)"


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status the caller sees, as the metrics count it."""
    if isinstance(exc, errors.ServiceError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        left = context.time_remaining()
        # Cancelled by its own deadline, the caller sees DEADLINE_EXCEEDED.
        late = left is not None and left <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
    if isinstance(exc, grpc.aio.AbortError):
        aborted = getattr(context, "code", None)
        code = aborted() if callable(aborted) else None
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


def _record(method: str, code: grpc.StatusCode, started: float) -> None:
    service, _, name = method.lstrip("/").partition("/")
    _DURATION.record(
        time.perf_counter() - started,
        {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            "rpc.grpc.status_code": code.value[0],
        },
    )


class _Unreadable:
    """A request whose bytes are not its message (malformed, or strings that are not
    UTF-8): the handler answers INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or whatever a deserializer may raise
            return _Unreadable(str(exc) or type(exc).__name__)

    return read


def _check_readable(request: Any) -> None:
    if isinstance(request, _Unreadable):
        raise errors.InvalidArgument(
            "request", f"not a valid message: {request.reason}", reason="MESSAGE_NOT_READABLE"
        )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    if isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError):
        raise exc
    if context.done():  # the client is gone (cancelled): nobody to tell
        return
    status: status_pb2.Status
    if isinstance(exc, errors.ServiceError):
        status = errors.to_rpc_status(exc)
    else:
        log.exception("unexpected error in %s", method)
        status = errors.internal_status()
    await context.abort(
        errors.status_code(status), status.message, errors.trailing_metadata(status)
    )
