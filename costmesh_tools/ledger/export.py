"""`costmesh ledger export`: every usage record as CSV, plain or as a FinOps FOCUS feed.

The plain CSV carries every field of the ledger's record. The FOCUS form uses the
column names of the FinOps Open Cost and Usage Specification 1.x, so the rows load
into a FinOps tool beside the cloud bills: one row per call, costs in US dollars to
the nano-dollar, the team as the sub-account, and team, feature, experiment and arm
as tags."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2

FORMATS = ("csv", "focus")
_NANO = Decimal("0.000000001")
_PROBABILITY_TIERS = (types_pb2.TIER_SIMPLE, types_pb2.TIER_MODERATE, types_pb2.TIER_COMPLEX)

PLAIN_HEADER = [
    "time", "request_id", "client_request_id", "trace_id", "team", "feature", "model",
    "provider", "tier", "input_tokens", "cached_input_tokens", "output_tokens", "cache_outcome",
    "escalated", "batch", "latency_ms", "cost_nano_usd", "counterfactual_cost_nano_usd",
    "price_version", "purpose", "route_reason", "p_simple", "p_moderate", "p_complex",
    "status", "experiment", "arm", "baseline_model", "baseline_input_tokens",
    "baseline_cached_input_tokens", "baseline_output_tokens", "cache_source_request_id",
    "route_out_of_domain",
]  # fmt: skip

FOCUS_HEADER = [
    "BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency",
    "BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd",
    "ChargeCategory", "ChargeDescription", "ChargeFrequency", "ServiceCategory", "ServiceName",
    "ProviderName", "PublisherName", "InvoiceIssuerName", "SubAccountId", "SubAccountName",
    "ResourceId", "ResourceName", "ResourceType", "SkuId", "ConsumedQuantity", "ConsumedUnit",
    "PricingQuantity", "PricingUnit", "Tags",
]  # fmt: skip


def header(fmt: str) -> Sequence[str]:
    return FOCUS_HEADER if fmt == "focus" else PLAIN_HEADER


def line(record: ledger_pb2.UsageRecord, fmt: str) -> Iterable[object]:
    return _focus(record) if fmt == "focus" else _plain(record)


def _plain(r: ledger_pb2.UsageRecord) -> Iterable[object]:
    probabilities = {p.tier: p.probability for p in r.route_probabilities}
    return [
        r.time.ToDatetime(UTC).isoformat(), r.request_id, r.client_request_id, r.trace_id,
        r.team, r.feature, r.model, r.provider, _name(types_pb2.Tier.Name(r.tier), "TIER_"),
        r.usage.input_tokens, r.usage.cached_input_tokens, r.usage.output_tokens,
        _name(types_pb2.CacheOutcome.Name(r.cache_outcome), "CACHE_OUTCOME_"),
        int(r.escalated), int(r.batch), r.latency_ms, r.cost_nano_usd,
        r.counterfactual_cost_nano_usd, r.price_version,
        _name(ledger_pb2.CallPurpose.Name(r.purpose), "CALL_PURPOSE_"), r.route_reason,
        *(probabilities.get(tier, 0.0) for tier in _PROBABILITY_TIERS),
        _name(ledger_pb2.CallStatus.Name(r.status), "CALL_STATUS_"), r.experiment,
        _name(types_pb2.Arm.Name(r.arm), "ARM_"), r.baseline_model,
        r.baseline_usage.input_tokens, r.baseline_usage.cached_input_tokens,
        r.baseline_usage.output_tokens, r.cache_source_request_id, int(r.route_out_of_domain),
    ]  # fmt: skip


def _focus(r: ledger_pb2.UsageRecord) -> Iterable[object]:
    """One FOCUS charge: the call's cost (list, contracted and billed alike: the ledger
    prices at list rates), in the calendar month it falls in."""
    when = r.time.ToDatetime(UTC)
    month_start = datetime(when.year, when.month, 1, tzinfo=UTC)
    month_end = datetime(when.year + when.month // 12, when.month % 12 + 1, 1, tzinfo=UTC)
    cost = str(Decimal(r.cost_nano_usd) * _NANO)
    purpose = _name(ledger_pb2.CallPurpose.Name(r.purpose), "CALL_PURPOSE_")
    outcome = _name(types_pb2.CacheOutcome.Name(r.cache_outcome), "CACHE_OUTCOME_")
    tags = {
        "costmesh/team": r.team,
        "costmesh/feature": r.feature,
        "costmesh/experiment": r.experiment,
        "costmesh/arm": _name(types_pb2.Arm.Name(r.arm), "ARM_"),
        "costmesh/tier": _name(types_pb2.Tier.Name(r.tier), "TIER_"),
        "costmesh/cache_outcome": outcome,
        "costmesh/purpose": purpose,
    }
    tokens = r.usage.input_tokens + r.usage.output_tokens
    return [
        cost, cost, cost, cost, "USD",
        _iso(month_start), _iso(month_end), _iso(when), _iso(when),
        "Usage", f"{purpose} by {r.model or 'cache'} ({outcome})", "Usage-Based",
        "AI and Machine Learning", "costmesh",
        r.provider, r.provider, r.provider, r.team, r.team,
        r.request_id, r.feature, "LLM call", r.model,
        tokens, "Tokens", tokens, "Tokens",
        json.dumps({k: v for k, v in tags.items() if v and v != "unspecified"}, sort_keys=True),
    ]  # fmt: skip


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _name(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix).lower()
