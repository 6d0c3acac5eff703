"""Tracing is configured by the standard OTEL_* variables alone."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from services.common.config import ConfigError
from services.common.telemetry import exporters_from_env, setup_tracing


def _exporters(env: dict[str, str]) -> list[type]:
    return [type(e) for e in exporters_from_env(env)]


def test_service_name_comes_from_otel_service_name_else_the_default() -> None:
    named = setup_tracing("costmesh-cache", {"OTEL_SERVICE_NAME": "cache-eu-1"})
    default = setup_tracing("costmesh-cache", {})

    assert named.resource.attributes["service.name"] == "cache-eu-1"
    assert default.resource.attributes["service.name"] == "costmesh-cache"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, [OTLPSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "console"}, [ConsoleSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, [OTLPSpanExporter, ConsoleSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, []),
    ],
    ids=["nothing set", "endpoint set", "console", "both", "none wins"],
)
def test_exporters_follow_otel_traces_exporter(env: dict[str, str], expected: list[type]) -> None:
    assert _exporters(env) == expected


def test_an_unknown_exporter_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: unsupported exporter 'zipkin'"):
        setup_tracing("costmesh", {"OTEL_TRACES_EXPORTER": "zipkin"})


def test_spans_nobody_exports_are_not_recorded_but_keep_their_trace_ids() -> None:
    silent = setup_tracing("costmesh", {}).get_tracer("t")
    exported = setup_tracing("costmesh", {"OTEL_TRACES_EXPORTER": "console"}).get_tracer("t")

    with silent.start_as_current_span("call") as parent, silent.start_span("hop") as child:
        assert not parent.is_recording()
        assert parent.get_span_context().trace_id != 0  # the reply's trace_id
        assert child.get_span_context().trace_id == parent.get_span_context().trace_id
    with exported.start_span("call") as span:
        assert span.is_recording()
