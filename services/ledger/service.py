"""LedgerService servicer: proto <-> domain translation around the store and the catalog."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.auth import Principal, require_role
from services.common.config import Config
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.limits import check_printable
from services.common.pricing import PriceCatalog
from services.common.server import ServiceDef
from services.ledger.records import PROBABILITY_FIELDS, to_row
from services.ledger.rows import END_OF_TIME_US, SpendTotal, UsageRow, UsageStore
from services.ledger.stores import open_store

SERVICE_NAME = "costmesh.ledger.v1.LedgerService"
MAX_RECORDS_PER_CALL = 1000
_GROUPS = {
    ledger_pb2.GROUP_BY_UNSPECIFIED: "",
    ledger_pb2.GROUP_BY_TEAM: "team",
    ledger_pb2.GROUP_BY_FEATURE: "feature",
    ledger_pb2.GROUP_BY_MODEL: "model",
    ledger_pb2.GROUP_BY_DAY: "day",
    ledger_pb2.GROUP_BY_TIER: "tier",
    ledger_pb2.GROUP_BY_WEEK: "week",
    ledger_pb2.GROUP_BY_MONTH: "month",
    ledger_pb2.GROUP_BY_ARM: "arm",
}
# Enum keys as names instead of numbers; a call in no experiment has the arm
# "unspecified".
_KEY_NAMES = {
    "tier": {
        str(types_pb2.TIER_UNSPECIFIED): "unspecified",
        str(types_pb2.TIER_SIMPLE): "simple",
        str(types_pb2.TIER_MODERATE): "moderate",
        str(types_pb2.TIER_COMPLEX): "complex",
    },
    "arm": {
        str(types_pb2.ARM_UNSPECIFIED): "unspecified",
        str(types_pb2.ARM_TREATMENT): "treatment",
        str(types_pb2.ARM_CONTROL): "control",
    },
}


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, store: UsageStore, catalog: PriceCatalog) -> None:
        self._store = store
        self._catalog = catalog

    async def RecordUsage(
        self, request: ledger_pb2.RecordUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.RecordUsageResponse:
        require_role("service")
        if len(request.records) > MAX_RECORDS_PER_CALL:
            raise InvalidArgument("records", f"at most {MAX_RECORDS_PER_CALL} per call")
        rows = [to_row(i, r, self._catalog) for i, r in enumerate(request.records)]
        results = await asyncio.to_thread(self._store.record, rows)
        trace.get_current_span().set_attributes(
            {
                "costmesh.ledger.records": len(rows),
                "costmesh.ledger.duplicates": sum(dup for _, dup in results),
                "costmesh.ledger.price_version": self._catalog.version,
            }
        )
        return ledger_pb2.RecordUsageResponse(
            results=[
                ledger_pb2.RecordedUsage(
                    request_id=row.request_id, cost_nano_usd=cost, duplicate=dup
                )
                for row, (cost, dup) in zip(rows, results, strict=True)
            ]
        )

    async def QuerySpend(
        self, request: ledger_pb2.QuerySpendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.QuerySpendResponse:
        team = _visible_team(require_role("member", "admin", "service"), request.team)
        _check_filters(request, "team", "feature", "experiment")
        groups = _groups(request)
        start_us, end_us = _range(request, "start_time", "end_time")
        totals = await asyncio.to_thread(
            self._store.spend,
            groups,
            start_us,
            end_us,
            team=team,
            feature=request.feature,
            experiment=request.experiment,
        )
        if _KEY_NAMES.keys() & set(groups):
            totals = sorted((_named_keys(groups, t) for t in totals), key=lambda t: t.keys)
        cost = sum(t.cost_nano_usd for t in totals)
        counterfactual = sum(t.counterfactual_cost_nano_usd for t in totals)
        return ledger_pb2.QuerySpendResponse(
            rows=[_to_spend_row(t) for t in totals],
            total_cost_nano_usd=cost,
            total_counterfactual_cost_nano_usd=counterfactual,
            total_savings_nano_usd=counterfactual - cost,
        )

    async def ExportUsage(
        self, request: ledger_pb2.ExportUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ledger_pb2.ExportUsageResponse]:
        team = _visible_team(require_role("member", "admin", "service"), request.team)
        _check_filters(request, "team", "experiment")
        start_us, end_us = _range(request, "start_time", "end_time")
        pages = self._store.export(start_us, end_us, team=team, experiment=request.experiment)
        no_more: list[UsageRow] = []
        while page := await asyncio.to_thread(next, pages, no_more):
            for row in page:
                yield ledger_pb2.ExportUsageResponse(record=_to_record(row))


def _check_filters(request: Any, *fields: str) -> None:
    """A filter with a NUL or another control character matches no row, and PostgreSQL
    cannot even compare with one: refused, naming the field."""
    for field in fields:
        check_printable(field, getattr(request, field))


def _groups(request: ledger_pb2.QuerySpendRequest) -> tuple[str, ...]:
    for field in ("group_by", "then_by"):
        if getattr(request, field) not in _GROUPS:
            raise InvalidArgument(field, f"unknown value {getattr(request, field)}")
    if request.then_by == ledger_pb2.GROUP_BY_UNSPECIFIED:
        return (_GROUPS[request.group_by],)
    if request.then_by == request.group_by or not request.group_by:
        raise InvalidArgument("then_by", "needs a group_by, and a different one")
    return (_GROUPS[request.group_by], _GROUPS[request.then_by])


def _named_keys(groups: tuple[str, ...], total: SpendTotal) -> SpendTotal:
    """Tier and arm keys as names (simple, control, ...) instead of enum numbers."""
    keys = tuple(_KEY_NAMES.get(g, {}).get(k, k) for g, k in zip(groups, total.keys, strict=True))
    return replace(total, keys=keys)


def _visible_team(principal: Principal, requested: str) -> str:
    """Members only ever see their own team; admins and services see any."""
    if principal.role != "member":
        return requested
    if requested and requested != principal.team:
        raise PermissionDenied(f"team: a member key may only query its own team {principal.team!r}")
    return principal.team


def _range(request: Any, start_field: str, end_field: str) -> tuple[int, int]:
    start = _micros(getattr(request, start_field)) if request.HasField(start_field) else 0
    end = _micros(getattr(request, end_field)) if request.HasField(end_field) else END_OF_TIME_US
    if end <= start:
        raise InvalidArgument(end_field, "must be after start_time")
    return start, end


def _micros(ts: timestamp_pb2.Timestamp) -> int:
    return int(ts.seconds) * 1_000_000 + ts.nanos // 1000


def _to_spend_row(total: SpendTotal) -> ledger_pb2.SpendRow:
    return ledger_pb2.SpendRow(
        key=total.keys[0],
        second_key=total.keys[1] if len(total.keys) > 1 else "",
        calls=total.calls,
        input_tokens=total.input_tokens,
        output_tokens=total.output_tokens,
        cost_nano_usd=total.cost_nano_usd,
        cached_calls=total.cached_calls,
        counterfactual_cost_nano_usd=total.counterfactual_cost_nano_usd,
        savings_nano_usd=total.counterfactual_cost_nano_usd - total.cost_nano_usd,
        escalated_calls=total.escalated_calls,
        out_of_domain_calls=total.out_of_domain_calls,
    )


def _to_record(row: UsageRow) -> ledger_pb2.UsageRecord:
    when = timestamp_pb2.Timestamp()
    when.FromMicroseconds(row.time_us)
    return ledger_pb2.UsageRecord(
        request_id=row.request_id,
        trace_id=row.trace_id,
        time=when,
        team=row.team,
        feature=row.feature,
        model=row.model,
        provider=row.provider,
        tier=row.tier,  # type: ignore[arg-type]
        usage=types_pb2.TokenUsage(
            input_tokens=row.input_tokens,
            cached_input_tokens=row.cached_input_tokens,
            output_tokens=row.output_tokens,
        ),
        cache_outcome=row.cache_outcome,  # type: ignore[arg-type]
        escalated=bool(row.escalated),
        batch=bool(row.batch),
        latency_ms=row.latency_ms,
        status=row.status,  # type: ignore[arg-type]
        cost_nano_usd=row.cost_nano_usd,
        price_version=row.price_version,
        client_request_id=row.client_request_id,
        baseline_model=row.baseline_model,
        counterfactual_cost_nano_usd=row.counterfactual_cost_nano_usd,
        purpose=row.purpose,  # type: ignore[arg-type]
        route_probabilities=_route_probabilities(row),
        route_reason=row.route_reason,
        experiment=row.experiment,
        arm=row.arm,  # type: ignore[arg-type]
        cache_source_request_id=row.cache_source_request_id,
        route_out_of_domain=bool(row.route_out_of_domain),
    )


def _route_probabilities(row: UsageRow) -> list[types_pb2.TierProbability]:
    """Every tier's probability, or none when the writer gave none (all stored as 0)."""
    given = [(tier, getattr(row, column)) for tier, column in PROBABILITY_FIELDS.items()]
    if not any(probability for _, probability in given):
        return []
    return [types_pb2.TierProbability(tier=tier, probability=p) for tier, p in given]


def build(config: Config) -> ServiceDef:
    """The ledger service on the configured SQLite file."""
    ledger = config.section("ledger")
    data_dir = Path(config.section("server").get_str("data_dir"))
    store = open_store(ledger.get_str("database"), data_dir)
    catalog = PriceCatalog.from_config(config.section("models"), ledger.get_str("price_version"))
    servicer = LedgerServicer(store, catalog)

    async def stop() -> None:
        store.close()

    return ServiceDef(
        SERVICE_NAME,
        lambda server: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server),
        stop=stop,
    )
