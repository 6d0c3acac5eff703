"""OpenTelemetry metrics: read by Prometheus at the front door's /metrics, exported by
OTLP when the OTEL_* variables ask (as traces are).

Instruments live beside what they measure, made from the global meter provider
(`opentelemetry.metrics.get_meter`), so recording costs nothing until `costmesh serve`
installs a provider. Names follow the OpenTelemetry semantic conventions where one
exists (`rpc.server.duration`, `gen_ai.client.token.usage`,
`gen_ai.client.operation.duration`); the mesh's own start with `costmesh.`. Money is
counted in nano-USD, as the ledger counts it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.common.config import ConfigError

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST
_EXPORTERS = ("otlp", "prometheus", "none")


@dataclass
class Metering:
    """A process's meter provider and the registry its Prometheus reader fills."""

    provider: MeterProvider
    registry: CollectorRegistry

    def exposition(self) -> bytes:
        """Every metric in Prometheus's text format, as of now."""
        return bytes(generate_latest(self.registry))

    def shutdown(self) -> None:
        self.provider.shutdown()


def setup_metrics(default_service_name: str, env: Mapping[str, str] | None = None) -> Metering:
    """Prometheus always (its own registry, read at /metrics); OTLP when
    OTEL_METRICS_EXPORTER says so, or when only an OTLP endpoint is set."""
    env = os.environ if env is None else env
    registry = CollectorRegistry(auto_describe=True)
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry)]
    endpoint_set = any(
        env.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )
    wanted = env.get("OTEL_METRICS_EXPORTER") or ("otlp" if endpoint_set else "none")
    for name in (n.strip() for n in wanted.split(",")):
        if name not in _EXPORTERS:
            raise ConfigError(
                f"OTEL_METRICS_EXPORTER: unsupported exporter {name!r} "
                f"(expected {', '.join(_EXPORTERS)})"
            )
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # noqa: PLC0415
                OTLPMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    service = env.get("OTEL_SERVICE_NAME") or default_service_name
    provider = MeterProvider(
        metric_readers=readers, resource=Resource.create({SERVICE_NAME: service})
    )
    return Metering(provider, registry)
