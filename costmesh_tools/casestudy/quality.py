"""Quality proxies of a savings report: false cache hits, complex requests answered by a
small model, escalations; judged against what is known of each request."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2

COMPLEX = "complex"
_HITS = (types_pb2.CACHE_OUTCOME_EXACT, types_pb2.CACHE_OUTCOME_SEMANTIC)


@dataclass(frozen=True)
class Truth:
    """What is known of a request: its intent label and its true tier
    (simple, moderate or complex); None where unknown."""

    label: str | None = None
    tier: str | None = None


@dataclass(frozen=True)
class Quality:
    """Proxies for answer quality.

    A false hit is a cache hit whose source request carries another intent label than
    its own, judged only where both labels are known. A complex request on a small
    model is one whose true tier is complex answered by a provider model whose tier is
    not complex; complex requests answered from the cache are counted apart, in
    `complex_from_cache`, and left out of that rate.
    """

    false_hits: int
    judged_hits: int
    complex_requests: int
    complex_on_small: int
    complex_from_cache: int
    escalated: int
    provider_answers: int

    @property
    def false_hit_rate(self) -> Decimal | None:
        return ratio(self.false_hits, self.judged_hits)

    @property
    def complex_on_small_rate(self) -> Decimal | None:
        return ratio(self.complex_on_small, self.complex_requests - self.complex_from_cache)

    @property
    def escalation_rate(self) -> Decimal | None:
        """Escalated answers over the answers a provider gave."""
        return ratio(self.escalated, self.provider_answers)


@dataclass(frozen=True)
class Judge:
    """Judges answers against the truth (keyed by client request id) and the models' tiers.

    A model missing from `model_tiers` is never counted as small.
    """

    truth: Mapping[str, Truth]
    model_tiers: Mapping[str, str]
    client_ids: Mapping[str, str]  # ledger request id -> client request id

    @classmethod
    def of(
        cls,
        truth: Mapping[str, Truth],
        model_tiers: Mapping[str, str],
        rows: Iterable[ledger_pb2.UsageRecord],
    ) -> Judge:
        tiers = {model: _normal(tier) for model, tier in model_tiers.items()}
        ids = {r.request_id: r.client_request_id for r in rows if r.client_request_id}
        return cls(truth, tiers, ids)

    def quality(self, answers: Sequence[ledger_pb2.UsageRecord]) -> Quality:
        judged = [self._false_hit(r) for r in answers if is_hit(r)]
        complex_outcomes = Counter(self._complex_outcome(r) for r in answers)
        provider = [r for r in answers if not is_hit(r)]
        return Quality(
            false_hits=judged.count(True),
            judged_hits=len(judged) - judged.count(None),
            complex_requests=complex_outcomes.total() - complex_outcomes[None],
            complex_on_small=complex_outcomes["small"],
            complex_from_cache=complex_outcomes["cache"],
            escalated=sum(1 for r in provider if r.escalated),
            provider_answers=len(provider),
        )

    def _false_hit(self, hit: ledger_pb2.UsageRecord) -> bool | None:
        own = self.truth.get(hit.client_request_id)
        source_id = hit.cache_source_request_id
        source = self.truth.get(self.client_ids.get(source_id, source_id))
        if own is None or source is None or own.label is None or source.label is None:
            return None
        return own.label != source.label

    def _complex_outcome(self, answer: ledger_pb2.UsageRecord) -> str | None:
        """None unless the request is truly complex; then who answered it: the cache, a
        small model, or a complex-tier (or unknown) model."""
        own = self.truth.get(answer.client_request_id)
        if own is None or _tier_name(own.tier) != COMPLEX:
            return None
        if is_hit(answer):
            return "cache"
        model_tier = self.model_tiers.get(answer.model)
        return "small" if model_tier is not None and model_tier != COMPLEX else COMPLEX


def is_hit(record: ledger_pb2.UsageRecord) -> bool:
    return record.cache_outcome in _HITS


def _tier_name(tier: str | None) -> str | None:
    return None if tier is None else _normal(tier)


def _normal(tier: str) -> str:
    """TIER_COMPLEX, Complex and complex alike."""
    return tier.strip().lower().removeprefix("tier_")


def ratio(part: int, whole: int) -> Decimal | None:
    return Decimal(part) / whole if whole else None
