"""OpenTelemetry from the standard OTEL_* variables, and the gRPC interceptors that carry it.

This is the one module where untyped OpenTelemetry calls are silenced for mypy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from services.common.config import ConfigError

log = logging.getLogger(__name__)
_EXPORTERS = ("otlp", "console", "none")


def setup_tracing(
    default_service_name: str, env: Mapping[str, str] | None = None
) -> TracerProvider:
    """A tracer provider configured only by OTEL_* variables.

    OTEL_TRACES_EXPORTER picks the exporters (otlp, console, none). When it is unset,
    traces go to OTLP if an OTLP endpoint is configured and are not exported otherwise,
    so a plain `costmesh serve` neither spams the console nor retries a missing collector.
    """
    env = os.environ if env is None else env
    name = env.get("OTEL_SERVICE_NAME") or default_service_name
    exporters = exporters_from_env(env)
    # Spans nobody exports are not recorded: their ids still flow (the reply's and
    # the ledger's trace_id, propagation to peers), their cost does not.
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}), sampler=None if exporters else ALWAYS_OFF
    )
    for exporter in exporters:
        # Console output is for people watching: print each span as it ends.
        if isinstance(exporter, ConsoleSpanExporter):
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def exporters_from_env(env: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER asks for (OTLP when only an endpoint is set)."""
    endpoint_set = any(
        env.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    wanted = env.get("OTEL_TRACES_EXPORTER") or ("otlp" if endpoint_set else "none")
    exporters: list[SpanExporter] = []
    for exporter_name in (n.strip() for n in wanted.split(",")):
        if exporter_name not in _EXPORTERS:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: unsupported exporter {exporter_name!r}"
                f" (expected {', '.join(_EXPORTERS)})"
            )
        if exporter_name == "otlp":
            # The exporter reads OTEL_EXPORTER_OTLP_* (endpoint, headers, insecure) itself.
            exporters.append(OTLPSpanExporter())
        elif exporter_name == "console":
            exporters.append(ConsoleSpanExporter())
    return exporters


def server_interceptors(provider: trace.TracerProvider) -> list[grpc.aio.ServerInterceptor]:
    """Starts a server span per RPC, continuing the caller's trace from metadata.

    Health and reflection are left untraced: probes would flood the traces, and the
    instrumentation breaks handlers that stream with context.write (health Watch).
    """
    untraced = filters.any_of(
        filters.service_prefix("grpc.health."), filters.service_prefix("grpc.reflection.")
    )
    interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=provider, filter_=filters.negate(untraced)
    )
    return [interceptor]


def client_interceptors(provider: trace.TracerProvider) -> list[Any]:
    """Starts a client span per outgoing RPC and injects its context into metadata."""
    return list(aio_client_interceptors(tracer_provider=provider))  # type: ignore[no-untyped-call]


def current_trace_id() -> str:
    """The 32-hex-digit id of the active trace, or empty when none is recording."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""
