"""What the ledger accepts from a writer, and how it prices the call and its baseline."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import timestamp_pb2

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from services.common.config import load_config
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.pricing import PriceCatalog
from services.ledger.records import to_row

CATALOG = PriceCatalog.from_config(load_config(env={}).section("models"), "v")


def record(**fields: object) -> ledger_pb2.UsageRecord:
    base: dict[str, object] = {
        "request_id": "r1",
        "team": "support",
        "feature": "tickets",
        "model": "gpt-4o-mini",
        "usage": types_pb2.TokenUsage(input_tokens=1000, output_tokens=500),
    }
    return ledger_pb2.UsageRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_without_baseline_usage_the_calls_own_tokens_price_the_baseline() -> None:
    row = to_row(0, record(baseline_model="gpt-4o"), CATALOG)

    assert row.cost_nano_usd == 1000 * 150 + 500 * 600
    assert row.counterfactual_cost_nano_usd == 1000 * 2500 + 500 * 10_000


def test_a_cache_hit_is_priced_on_the_tokens_its_answer_first_cost() -> None:
    hit = record(
        usage=types_pb2.TokenUsage(),
        cache_outcome=types_pb2.CACHE_OUTCOME_EXACT,
        baseline_model="gpt-4o",
        baseline_usage=types_pb2.TokenUsage(input_tokens=100, output_tokens=10),
    )

    row = to_row(0, hit, CATALOG)

    assert row.cost_nano_usd == 0
    assert row.counterfactual_cost_nano_usd == 100 * 2500 + 10 * 10_000


def test_a_batch_call_on_the_baseline_model_saves_nothing() -> None:
    row = to_row(0, record(model="gpt-4o", batch=True, baseline_model="gpt-4o"), CATALOG)

    assert (
        row.cost_nano_usd == row.counterfactual_cost_nano_usd == (1000 * 2500 + 500 * 10_000) // 2
    )


def test_no_baseline_claims_no_savings() -> None:
    row = to_row(0, record(), CATALOG)

    assert row.counterfactual_cost_nano_usd == row.cost_nano_usd


def _simple(probability: float) -> types_pb2.TierProbability:
    return types_pb2.TierProbability(tier=types_pb2.TIER_SIMPLE, probability=probability)


def _at(year: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime(year, 1, 1, tzinfo=UTC))
    return stamp


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"usage": types_pb2.TokenUsage(output_tokens=10**15)}, "records[3].usage"),
        ({"time": _at(1900)}, "records[3].time"),
        ({"time": _at(2999)}, "records[3].time"),
        ({"request_id": ""}, "records[3].request_id"),
        ({"client_request_id": "x" * 129}, "records[3].client_request_id"),
        ({"usage": types_pb2.TokenUsage(input_tokens=1, cached_input_tokens=2)},
         "records[3].usage.cached_input_tokens"),
        ({"purpose": 5}, "records[3].purpose"),
        ({"route_reason": "x" * 1001}, "records[3].route_reason"),
        ({"route_probabilities": [_simple(1.01)]}, "records[3].route_probabilities[0].probability"),
        ({"route_probabilities": [_simple(0.5), _simple(0.5)]},
         "records[3].route_probabilities[1].tier"),
        ({"route_probabilities": [types_pb2.TierProbability(probability=0.5)]},
         "records[3].route_probabilities[0].tier"),
        ({"experiment": "x\x00y", "arm": 1}, "records[3].experiment"),
        ({"client_request_id": "a\x00"}, "records[3].client_request_id"),
        ({"route_reason": "\x00"}, "records[3].route_reason"),
    ],
    ids=["absurd tokens", "too old", "future", "no id", "long client id", "cached > input",
         "unknown purpose", "long reason", "probability > 1", "tier twice", "no tier",
         "NUL in experiment", "NUL in client id", "NUL in reason"],
)  # fmt: skip
def test_malformed_records_are_refused_naming_the_field(
    fields: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        to_row(3, record(**fields), CATALOG)

    assert caught.value.field_violations[0][0] == field


def test_an_unpriced_model_is_a_precondition_not_a_malformed_record() -> None:
    with pytest.raises(FailedPrecondition, match=r"records\[0\]\.model: no price"):
        to_row(0, record(model="local-llama"), CATALOG)


def test_purpose_and_the_routers_view_are_kept_per_tier() -> None:
    probabilities = [
        types_pb2.TierProbability(tier=types_pb2.TIER_COMPLEX, probability=0.25),
        _simple(0.75),
    ]
    row = to_row(
        0,
        record(
            purpose=ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING,
            route_probabilities=probabilities,
            route_reason="short factual question",
        ),
        CATALOG,
    )

    assert (row.purpose, row.route_reason) == (4, "short factual question")
    assert (row.p_simple, row.p_moderate, row.p_complex) == (0.75, 0.0, 0.25)
    assert not row.is_answer
    assert to_row(0, record(), CATALOG).is_answer, "unspecified counts as the answer"
