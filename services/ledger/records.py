"""A UsageRecord from a writer becomes a priced UsageRow, or an error naming its field."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.limits import MAX_REQUEST_ID
from services.common.pricing import PriceCatalog, Usage
from services.ledger.rows import UsageRow

MAX_ID = MAX_REQUEST_ID
MAX_ROUTE_REASON = 1000
MAX_EXPERIMENT = 100
# Where each tier's probability is stored (UsageRow.p_simple and so on).
PROBABILITY_FIELDS = {
    types_pb2.TIER_SIMPLE: "p_simple",
    types_pb2.TIER_MODERATE: "p_moderate",
    types_pb2.TIER_COMPLEX: "p_complex",
}
# Bounds that keep every sum far inside BIGINT: a record beyond them is malformed.
MAX_TOKENS = 10**12
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


def to_row(index: int, record: ledger_pb2.UsageRecord, catalog: PriceCatalog) -> UsageRow:
    """Check, then price the call and its counterfactual at the call's own time."""
    field = f"records[{index}]"
    _check_text(field, record)
    _check_ids(field, record)
    _check_labels(field, record)
    probabilities = _probabilities(f"{field}.route_probabilities", record.route_probabilities)
    usage = _usage(f"{field}.usage", record.usage)
    # Without baseline usage the call's own tokens are what the baseline would use.
    baseline_tokens = record.baseline_usage if record.HasField("baseline_usage") else record.usage
    baseline = _usage(f"{field}.baseline_usage", baseline_tokens)
    when = _time(f"{field}.time", record)
    _check_priced(f"{field}.model", record.model, usage, catalog)
    priced = catalog.cost(record.model, usage, when, batch=record.batch)
    if record.baseline_model:
        _check_priced(f"{field}.baseline_model", record.baseline_model, baseline, catalog)
        # Same batch terms: the provider's batch discount is not costmesh's saving.
        counterfactual = catalog.cost(
            record.baseline_model, baseline, when, batch=record.batch
        ).cost_nano_usd
    else:
        counterfactual = priced.cost_nano_usd  # no baseline: no savings claimed
    return UsageRow(
        request_id=record.request_id,
        trace_id=record.trace_id,
        time_us=int(when.timestamp() * 1_000_000),
        day=when.strftime("%Y-%m-%d"),
        team=record.team,
        feature=record.feature,
        model=record.model,
        provider=record.provider,
        tier=record.tier,
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        output_tokens=usage.output_tokens,
        cache_outcome=record.cache_outcome,
        escalated=record.escalated,
        batch=record.batch,
        latency_ms=record.latency_ms,
        status=record.status or ledger_pb2.CALL_STATUS_OK,
        cost_nano_usd=priced.cost_nano_usd,
        price_version=priced.version,
        client_request_id=record.client_request_id,
        baseline_model=record.baseline_model,
        counterfactual_cost_nano_usd=counterfactual,
        purpose=record.purpose,
        route_reason=record.route_reason,
        experiment=record.experiment,
        arm=record.arm,
        cache_source_request_id=record.cache_source_request_id,
        route_out_of_domain=record.route_out_of_domain,
        **probabilities,
    )


def _check_text(field: str, record: ledger_pb2.UsageRecord) -> None:
    """PostgreSQL cannot store NUL in text: such a record could never be taken."""
    for descriptor, value in record.ListFields():
        if isinstance(value, str) and "\x00" in value:
            raise InvalidArgument(f"{field}.{descriptor.name}", "must not contain NUL")


def _check_ids(field: str, record: ledger_pb2.UsageRecord) -> None:
    if not record.request_id or len(record.request_id) > MAX_ID:
        raise InvalidArgument(f"{field}.request_id", f"required, at most {MAX_ID} characters")
    for name in ("client_request_id", "cache_source_request_id"):
        if len(getattr(record, name)) > MAX_ID:
            raise InvalidArgument(f"{field}.{name}", f"at most {MAX_ID} characters")
    for name in ("team", "feature", "model"):
        if not getattr(record, name):
            raise InvalidArgument(f"{field}.{name}", "required")


def _check_labels(field: str, record: ledger_pb2.UsageRecord) -> None:
    """Purpose, experiment and arm, and the router's reason."""
    _check_enum(f"{field}.purpose", record.purpose, ledger_pb2.CallPurpose.values())
    _check_enum(f"{field}.arm", record.arm, types_pb2.Arm.values())
    if record.arm != types_pb2.ARM_UNSPECIFIED and not record.experiment:
        # As inference refuses it: an arm outside an experiment would compare nothing.
        raise InvalidArgument(f"{field}.arm", "an arm needs the experiment it belongs to")
    for name, limit in (("route_reason", MAX_ROUTE_REASON), ("experiment", MAX_EXPERIMENT)):
        if len(getattr(record, name)) > limit:
            raise InvalidArgument(f"{field}.{name}", f"at most {limit} characters")


def _check_enum(field: str, value: int, known: Iterable[int]) -> None:
    # Proto3 enums are open: a newer writer may send a value this ledger cannot name.
    if value not in known:
        raise InvalidArgument(field, f"unknown value {value}")


def _probabilities(
    field: str, probabilities: Iterable[types_pb2.TierProbability]
) -> dict[str, float]:
    """The router's probability per tier as row columns; tiers not given are 0."""
    columns: dict[str, float] = {}
    for i, entry in enumerate(probabilities):
        column = PROBABILITY_FIELDS.get(entry.tier)
        if column is None:
            raise InvalidArgument(f"{field}[{i}].tier", "must be SIMPLE, MODERATE or COMPLEX")
        if column in columns:
            raise InvalidArgument(f"{field}[{i}].tier", "each tier at most once")
        if not 0.0 <= entry.probability <= 1.0:  # NaN fails this too
            raise InvalidArgument(f"{field}[{i}].probability", "must be between 0 and 1")
        columns[column] = entry.probability
    return columns


def _time(field: str, record: ledger_pb2.UsageRecord) -> datetime:
    """The call's time: now when unset; refused when no report could ever show it."""
    now = datetime.now(UTC)
    if not record.HasField("time"):
        return now
    when = record.time.ToDatetime(UTC)
    if not EARLIEST <= when <= now + timedelta(days=1):
        raise InvalidArgument(field, f"must be between {EARLIEST:%Y-%m-%d} and tomorrow")
    return when


def _usage(field: str, tokens: types_pb2.TokenUsage) -> Usage:
    usage = Usage(tokens.input_tokens, tokens.cached_input_tokens, tokens.output_tokens)
    counts = (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens)
    if min(counts) < 0:
        raise InvalidArgument(field, "token counts must not be negative")
    if max(counts) > MAX_TOKENS:
        raise InvalidArgument(field, f"token counts must not exceed {MAX_TOKENS:,}")
    if usage.cached_input_tokens > usage.input_tokens:
        raise InvalidArgument(f"{field}.cached_input_tokens", "exceeds input_tokens")
    return usage


def _check_priced(field: str, model: str, usage: Usage, catalog: PriceCatalog) -> None:
    if usage.input_tokens + usage.output_tokens > 0 and not catalog.knows(model):
        # Not the record's fault: the catalog lacks the model. Writers keep the
        # record and retry once the ledger's configuration has the price.
        raise FailedPrecondition(
            f"{field}: no price for model {model!r} in catalog {catalog.version}",
            reason="MODEL_NOT_PRICED",
        )
