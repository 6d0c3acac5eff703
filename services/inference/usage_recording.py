"""Every billed call of a request becomes a ledger row, through the outbox: the answer's
row with the route decision behind it, and one row per overhead (a classification, an
escalated first attempt, an embedding). The reply's cost is priced here with the
catalog the ledger uses."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from google.protobuf import timestamp_pb2
from opentelemetry import metrics

from costmesh.cache.v1 import cache_pb2
from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from services.common.pricing import PriceCatalog, Usage
from services.inference.admission import Admission
from services.inference.call import Call, overhead
from services.inference.outbox import UsageOutbox
from services.inference.outbox_file import AlsoWrite
from services.inference.settings import InferenceSettings

# The ledger keeps a route reason of at most this many characters; a longer one (an
# intent name from someone's training data) is cut rather than lose the row.
MAX_ROUTE_REASON = 1000

_METER = metrics.get_meter("costmesh.inference")
_REQUESTS = _METER.create_counter(
    "costmesh.requests",
    unit="{request}",
    description="Answered requests, by team, feature, cache outcome, tier and model",
)
_COST = _METER.create_counter(
    "costmesh.cost",
    unit="nano_usd",
    description="What calls cost (answers and overhead), in nano-USD, by team, feature and model",
)
_BASELINE_COST = _METER.create_counter(
    "costmesh.cost.baseline",
    unit="nano_usd",
    description="What the answered requests would have cost on the feature's baseline "
    "model with no cache, in nano-USD (the counterfactual savings are measured against)",
)
_ESCALATIONS = _METER.create_counter(
    "costmesh.escalations",
    unit="{request}",
    description="Answers replaced by a stronger model's, by feature and first model",
)
_OUTCOMES = {
    types_pb2.CACHE_OUTCOME_MISS: "miss",
    types_pb2.CACHE_OUTCOME_EXACT: "exact",
    types_pb2.CACHE_OUTCOME_SEMANTIC: "semantic",
    types_pb2.CACHE_OUTCOME_BYPASS: "bypass",
}


# Given the priced response, the write that remembers it for replays (idempotency).
Remember = Callable[[inference_pb2.CompleteResponse], AlsoWrite]


@dataclass(frozen=True)
class _Row:
    record: ledger_pb2.UsageRecord
    cost: int | None  # None: a model this process cannot price


class UsageRecorder:
    def __init__(
        self,
        settings: InferenceSettings,
        prices: PriceCatalog,
        outbox: UsageOutbox,
        admission: Admission,
        timeout: float,
    ) -> None:
        self._settings = settings
        self._prices = prices
        self._outbox = outbox
        self._admission = admission
        self._timeout = timeout

    async def record(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        baseline_usage: types_pb2.TokenUsage,
        looked_up: cache_pb2.LookupResponse | None,
        remember: Remember | None = None,
    ) -> None:
        """The answer's row and its overhead's, written as one unit; with `remember`
        (the write that keeps the priced response for repeats of its request_id) in
        the same transaction, so no kill can leave rows without it or it without rows."""
        rows = [self._answer_row(call, response, baseline_usage)]
        rows += self._overhead_rows(call, response, looked_up)
        await self._write(rows, None if remember is None else remember(response))

    async def record_overhead(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        looked_up: cache_pb2.LookupResponse | None,
    ) -> None:
        """What was paid for on the way, also when the call failed."""
        if rows := self._overhead_rows(call, response, looked_up):
            await self._write(rows, None)

    async def settled(self) -> None:
        """Every row recorded so far has been offered to the ledger."""
        await self._outbox.settled()

    def _answer_row(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        baseline_usage: types_pb2.TokenUsage,
    ) -> _Row:
        return self._row(
            call,
            response,
            request_id=call.usage_id,
            model=response.model,
            provider=response.provider,
            tier=response.tier,
            usage=response.usage,
            baseline_usage=baseline_usage,
            cache_outcome=response.cache_outcome,
            escalated=response.escalated,
            latency_ms=int((time.monotonic() - call.started) * 1000),
            purpose=ledger_pb2.CALL_PURPOSE_ANSWER,
            route_probabilities=[
                types_pb2.TierProbability(tier=p.tier, probability=min(max(p.probability, 0), 1))
                for p in call.route.probabilities
            ],
            route_reason=call.route.reason[:MAX_ROUTE_REASON],
            route_out_of_domain=call.route.out_of_domain,
            cache_source_request_id=response.cache_source_request_id,
        )

    def _overhead_rows(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        looked_up: cache_pb2.LookupResponse | None,
    ) -> list[_Row]:
        """A row per billed call around the answer (taken off the call: recorded once)."""
        if looked_up is not None and looked_up.embedding_usage.input_tokens:
            call.overhead.append(
                overhead(
                    self._settings,
                    looked_up.embedding_model,
                    looked_up.embedding_usage,
                    ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING,
                )
            )
        rows = [
            self._row(
                call,
                response,
                request_id=uuid.uuid4().hex,
                model=paid.model,
                provider=paid.provider,
                tier=call.route.tier,
                usage=paid.usage,
                baseline_usage=types_pb2.TokenUsage(),
                purpose=paid.purpose,
            )
            for paid in call.overhead
        ]
        call.overhead.clear()
        return rows

    def _row(self, call: Call, response: inference_pb2.CompleteResponse, **fields: Any) -> _Row:
        """One ledger row of this call, priced; its cost adds to the reply's. A model
        this process has no price for leaves the reply `cost_pending`."""
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        record = ledger_pb2.UsageRecord(
            client_request_id=call.request.request_id,
            trace_id=response.trace_id,
            time=now,
            team=call.principal.team,
            feature=call.request.feature,
            baseline_model=self._settings.features[call.request.feature].baseline_model,
            status=ledger_pb2.CALL_STATUS_OK,
            experiment=call.assignment.experiment,
            arm=call.assignment.arm,
            **fields,
        )
        cost = self._price(record)
        if cost is None:
            response.cost_pending = True
        else:
            response.cost_nano_usd += cost
        self._count(record, cost)
        return _Row(record, cost)

    async def _write(self, rows: list[_Row], also: AlsoWrite | None) -> None:
        """The rows on disk before the reply leaves, so they cannot be lost; the ledger
        gets them moments later in the background."""
        persisted = await self._outbox.enqueue([row.record for row in rows], self._timeout, also)
        # Counted on the way only once on disk: a record the outbox could not keep
        # was sent directly (or lost), and never acknowledged later.
        for row in rows:
            if persisted and row.cost:
                self._admission.on_the_way(row.record.team, row.record.request_id, row.cost)

    def _count(self, record: ledger_pb2.UsageRecord, cost: int | None) -> None:
        """The row in the metrics: cost always; requests, baseline and escalation for
        the answer's row."""
        who = {"costmesh.team": record.team, "costmesh.feature": record.feature}
        if cost:
            _COST.add(cost, {**who, "gen_ai.request.model": record.model})
        if record.purpose != ledger_pb2.CALL_PURPOSE_ANSWER:
            return
        _REQUESTS.add(
            1,
            {
                **who,
                "costmesh.cache.outcome": _OUTCOMES.get(record.cache_outcome, "none"),
                "costmesh.tier": types_pb2.Tier.Name(record.tier).removeprefix("TIER_").lower(),
                "gen_ai.request.model": record.model,
            },
        )
        baseline = ledger_pb2.UsageRecord(
            model=record.baseline_model, usage=record.baseline_usage, time=record.time
        )
        baseline_cost = self._price(baseline) if record.baseline_model else None
        if baseline_cost:
            _BASELINE_COST.add(baseline_cost, who)
        if record.escalated:
            _ESCALATIONS.add(1, who)

    def _price(self, record: ledger_pb2.UsageRecord) -> int | None:
        """The row's cost as the ledger will price it; None for an unpriced model."""
        usage = Usage(
            record.usage.input_tokens, record.usage.cached_input_tokens, record.usage.output_tokens
        )
        if usage.input_tokens == usage.output_tokens == 0:
            return 0
        if not self._prices.knows(record.model):
            return None
        when = record.time.ToDatetime(tzinfo=UTC)
        return self._prices.cost(record.model, usage, when, batch=record.batch).cost_nano_usd
