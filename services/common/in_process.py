"""Calls between services of one process without a socket, like grpc-java's in-process
transport: the caller's generated stub, the callee's registered handler, the same
protobuf messages, authentication and error statuses; no serialising, no HTTP/2.

`InProcessServer` takes what a service registers on a grpc.aio.Server; `channel()`
gives a channel the generated stubs accept. Each side gets its own copy of every
message, as over the wire, so neither can change what the other holds. A call
still shows as the callee's server span in the trace.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple, cast

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

IN_PROCESS = "in-process"  # the peer address meaning "this process"


class _CallDetails(NamedTuple):  # the fields of grpc.HandlerCallDetails
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Context:
    """The parts of grpc.aio.ServicerContext that costmesh's handlers and edge use."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def done(self) -> bool:
        return False

    def peer(self) -> str:
        return IN_PROCESS

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> None:
        raise grpc.aio.AioRpcError(
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*trailing_metadata),
            details=details,
        )


def _copy(message: Message) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


class InProcessServer:
    """Handlers by method path, registered the way generated code registers on a server,
    wrapped by the same server interceptors (authentication, error statuses)."""

    def __init__(
        self, interceptors: Sequence[grpc.aio.ServerInterceptor], provider: trace.TracerProvider
    ) -> None:
        self._interceptors = list(interceptors)
        self._tracer = provider.get_tracer(__name__)
        self._generic: list[Any] = []  # grpc.GenericRpcHandler
        self._registered: dict[str, Any] = {}  # grpc.RpcMethodHandler, by method path
        self._handlers: dict[str, Any] = {}  # the same, inside the interceptors

    # -- what generated add_*Servicer_to_server calls --------------------------------
    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._registered.update({f"/{service}/{name}": h for name, h in handlers.items()})

    def channel(self) -> grpc.aio.Channel:
        """A channel for generated stubs: it has what they use of grpc.aio.Channel."""
        return cast("grpc.aio.Channel", InProcessChannel(self))

    async def handler(self, method: str) -> Any:
        """The method's handler inside every interceptor, resolved once per method."""
        found = self._handlers.get(method)
        if found is not None:
            return found
        details = _CallDetails(method, ())
        handler = self._registered.get(method) or next(
            (h for g in self._generic if (h := g.service(details)) is not None),
            None,
        )
        if handler is None:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNIMPLEMENTED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=f"{method} is not served in this process",
            )
        for interceptor in reversed(self._interceptors):
            handler = await interceptor.intercept_service(
                _constant(handler),
                details,  # type: ignore[arg-type]
            )
        self._handlers[method] = handler
        return handler

    def span(self, method: str) -> trace.Span:
        service, _, name = method.lstrip("/").partition("/")
        return self._tracer.start_span(
            method,
            kind=trace.SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "costmesh.transport": IN_PROCESS,
            },
        )


def _constant(handler: Any) -> Callable[[Any], Any]:
    async def continuation(_: Any) -> Any:
        return handler

    return continuation


def _record_status(span: trace.Span, code: grpc.StatusCode, details: str = "") -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {details}"))


class _UnaryUnary:
    def __init__(self, server: InProcessServer, method: str) -> None:
        self._server, self._method = server, method

    async def __call__(
        self,
        request: Message,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a stub's signature, as grpc's
        metadata: Sequence[tuple[str, str]] | None = None,
        **_: Any,
    ) -> Message:
        handler = await self._server.handler(self._method)
        deadline = None if timeout is None else time.monotonic() + timeout
        context = _Context(tuple(metadata or ()), deadline)
        span = self._server.span(self._method)
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                async with asyncio.timeout(timeout):
                    response = await handler.unary_unary(_copy(request), context)
            except TimeoutError:
                late = _deadline_exceeded()
                _record_status(span, late.code(), late.details() or "")
                raise late from None
            except grpc.aio.AioRpcError as exc:
                _record_status(span, exc.code(), exc.details() or "")
                raise
            _record_status(span, grpc.StatusCode.OK)
            return _copy(response)


class _UnaryStream:
    def __init__(self, server: InProcessServer, method: str) -> None:
        self._server, self._method = server, method

    def __call__(
        self,
        request: Message,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        **_: Any,
    ) -> AsyncIterator[Message]:
        return self._stream(_copy(request), timeout, tuple(metadata or ()))

    async def _stream(
        self,
        request: Message,
        timeout: float | None,  # noqa: ASYNC109 - applied to each wait for the callee
        metadata: tuple[tuple[str, str], ...],
    ) -> AsyncIterator[Message]:
        """The callee's messages as they come. The callee runs in a context of its own
        (as it would in a server): what it sets, such as the principal its edge
        authenticated, never leaks into the caller between messages. The deadline
        bounds each wait for the callee, never the caller's own work between messages
        (a timeout around a yield would cancel the caller)."""
        handler = await self._server.handler(self._method)
        deadline = None if timeout is None else time.monotonic() + timeout
        span = self._server.span(self._method)
        callee = contextvars.copy_context()
        stream = handler.unary_stream(request, _Context(metadata, deadline)).__aiter__()

        async def step() -> Message | None:
            """The callee's next message, None at its end."""
            with trace.use_span(span, end_on_exit=False, record_exception=False):
                return cast(Message | None, await anext(stream, None))

        code, details = grpc.StatusCode.OK, ""
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    async with asyncio.timeout(left):
                        response = await asyncio.create_task(step(), context=callee)
                except TimeoutError:
                    late = _deadline_exceeded()
                    code, details = late.code(), late.details() or ""
                    raise late from None
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                    raise
                if response is None:
                    break
                yield _copy(response)
        finally:
            try:  # a caller cancelled while it waits is cancelled here again: end the span anyway
                await asyncio.shield(asyncio.create_task(stream.aclose(), context=callee))
            finally:
                _record_status(span, code, details)
                span.end()


def _deadline_exceeded() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Deadline Exceeded",
    )


class _Unsupported:
    def __init__(self, method: str) -> None:
        self._method = method

    def __call__(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError(f"{self._method}: client streaming is not served in process")


class InProcessChannel:
    """What generated stubs need of a channel, answered by an InProcessServer."""

    def __init__(self, server: InProcessServer) -> None:
        self._server = server

    def unary_unary(self, method: str, *_: Any, **__: Any) -> _UnaryUnary:
        return _UnaryUnary(self._server, method)

    def unary_stream(self, method: str, *_: Any, **__: Any) -> _UnaryStream:
        return _UnaryStream(self._server, method)

    def stream_unary(self, method: str, *_: Any, **__: Any) -> _Unsupported:
        return _Unsupported(method)

    def stream_stream(self, method: str, *_: Any, **__: Any) -> _Unsupported:
        return _Unsupported(method)

    async def close(self) -> None:
        return None
