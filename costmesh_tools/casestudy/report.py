"""The savings report of an experiment: control arm against treatment arm, from ledger rows.

A request is its answer row (purpose ANSWER); the rows around it (an escalated attempt,
a billed routing call, a billed embedding) are overhead: their tokens and cost count
towards the request, but they are not requests. Money stays integer nano-USD (Decimal
where it is divided); only latencies and rates are fractions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_tools.casestudy.ablation import Ablation
from costmesh_tools.casestudy.projection import Projection
from costmesh_tools.casestudy.quality import Judge, Quality, Truth, is_hit
from services.inference.experiments import ARM_NAMES

CACHE = "cache"  # the model mix's name for answers served from the cache
SIMULATED_NOTICE = (
    "SIMULATED provider: answers, tokens and latencies are simulated; "
    "costs are real prices applied to simulated token counts."
)
_ANSWER = (ledger_pb2.CALL_PURPOSE_ANSWER, ledger_pb2.CALL_PURPOSE_UNSPECIFIED)
# Where a row's saving (its counterfactual cost minus its cost) comes from, in the
# order the report lists them. Overhead rows have no counterfactual: they only cost.
EXACT_HITS = "cache: exact repeats"
SEMANTIC_HITS = "cache: rewordings (semantic)"
ROUTING = "routing to cheaper models"
BATCH = "batch API on the baseline model"
BASELINE = "answers on the baseline model"
_OVERHEAD_LEVERS = {
    ledger_pb2.CALL_PURPOSE_ROUTING: "routing calls to an LLM",
    ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT: "escalations (first attempts)",
    ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING: "cache embeddings",
}
OTHER_OVERHEAD = "other overhead"
LEVERS = (
    EXACT_HITS, SEMANTIC_HITS, ROUTING, BATCH, BASELINE, *_OVERHEAD_LEVERS.values(), OTHER_OVERHEAD
)  # fmt: skip


class EmptyReportError(ValueError):
    """There are no answers in an experiment arm to report on."""


@dataclass(frozen=True)
class Latency:
    """Answer latencies; the percentiles are nearest-rank, so observed values."""

    mean_ms: Decimal
    p50_ms: int
    p95_ms: int


@dataclass(frozen=True)
class ArmStats:
    """One arm's numbers for one feature, or for all of them."""

    requests: int
    overhead_rows: int
    billed_tokens: int  # input + output tokens of every row, overhead included
    cost_nano_usd: int  # every row, overhead included
    overhead_cost_nano_usd: int
    counterfactual_cost_nano_usd: int
    model_mix: tuple[tuple[str, int], ...]  # (model or CACHE, answers), most first
    exact_hits: int
    semantic_hits: int
    latency: Latency
    quality: Quality
    daily_cost_nano_usd: int | None  # projected; None without a volume to project on
    monthly_cost_nano_usd: int | None
    # (lever, nano-USD saved against the counterfactual), in LEVERS order, for every
    # lever with a row; they sum to counterfactual minus cost, to the nano-dollar.
    levers: tuple[tuple[str, int], ...]

    @property
    def cache_hits(self) -> int:
        return self.exact_hits + self.semantic_hits

    @property
    def cache_hit_rate(self) -> Decimal:
        return Decimal(self.cache_hits) / self.requests

    @property
    def tokens_per_request(self) -> Decimal:
        return Decimal(self.billed_tokens) / self.requests

    @property
    def cost_per_request_nano_usd(self) -> Decimal:
        return Decimal(self.cost_nano_usd) / self.requests

    def share(self, model: str) -> Decimal:
        """The share of answers `model` (or CACHE) gave."""
        return Decimal(dict(self.model_mix).get(model, 0)) / self.requests


@dataclass(frozen=True)
class Savings:
    """What the treatment saves against the control.

    `fraction` compares cost per request, so arms of different sizes compare fairly;
    the amounts are the projected costs, control minus treatment.
    """

    fraction: Decimal | None  # None when the control cost nothing
    daily_nano_usd: int | None
    monthly_nano_usd: int | None


@dataclass(frozen=True)
class Comparison:
    """Before (control) and after (treatment) for one feature, or for all; an arm
    without answers is None, and so are the savings then."""

    feature: str
    control: ArmStats | None
    treatment: ArmStats | None
    savings: Savings | None

    def arms(self) -> tuple[tuple[str, ArmStats | None], ...]:
        return ("control", self.control), ("treatment", self.treatment)


@dataclass(frozen=True)
class SavingsReport:
    experiment: str
    features: tuple[Comparison, ...]  # by feature name
    total: Comparison
    requests_per_day: Decimal | None  # the volume the projections are made for
    projection_basis: str  # where that volume came from, or why there is none
    simulated: bool
    labels_known: bool  # some request has an intent label: false hits can be judged
    tiers_known: bool  # some request has a true tier: complex-on-small can be judged
    models: tuple[str, ...]  # every model of any mix, most answers first
    notes: tuple[str, ...]  # missing arms, rows left out, models without a tier
    ablation: Ablation | None = None  # each lever's measured share, when ablation arms ran


def build_report(
    records: Iterable[ledger_pb2.UsageRecord],
    truth: Mapping[str, Truth] | None = None,
    model_tiers: Mapping[str, str] | None = None,
    requests_per_day: Decimal | float | None = None,
    simulated: bool = False,
    *,
    basis: str = "",
) -> SavingsReport:
    """The savings report of one experiment's ledger rows.

    `truth` is keyed by client request id; `model_tiers` names each model's tier (a
    model missing from it is never counted as small). Projections scale each arm's cost
    to `requests_per_day`: the whole traffic under that arm's policy, at the arm's
    feature mix. Without it the volume is every answer of both arms over the time the
    rows span, which fits traffic split between the arms, not a replay that sends each
    request through both. `basis` says where a `requests_per_day` came from (empty: it
    was given). Raises EmptyReportError when no arm has an answer.
    """
    rows = list(records)
    in_arms = [r for r in rows if r.arm in ARM_NAMES]
    _require_answers(rows, in_arms)
    truth = truth or {}
    model_tiers = model_tiers or {}
    judge = Judge.of(truth, model_tiers, in_arms)
    answers = [r for r in in_arms if _is_answer(r)]
    projection = Projection.of(requests_per_day, len(answers), [r.time for r in in_arms], basis)
    arm_requests = Counter(r.arm for r in answers)
    features = tuple(
        _compare(name, [r for r in in_arms if r.feature == name], arm_requests, projection, judge)
        for name in sorted({r.feature for r in in_arms})
    )
    total = _compare("all features", in_arms, arm_requests, projection, judge)
    return SavingsReport(
        experiment=", ".join(sorted({r.experiment for r in in_arms})),
        features=features,
        total=total,
        requests_per_day=projection.requests_per_day,
        projection_basis=projection.basis,
        simulated=simulated,
        labels_known=any(t.label is not None for t in truth.values()),
        tiers_known=any(t.tier is not None for t in truth.values()),
        models=_models(total),
        notes=_notes(len(rows) - len(in_arms), features, total, _untiered(in_arms, model_tiers)),
    )


def _require_answers(
    rows: Sequence[ledger_pb2.UsageRecord], in_arms: Sequence[ledger_pb2.UsageRecord]
) -> None:
    if not rows:
        problem = "no ledger rows: check the experiment name and the time range"
    elif not in_arms:
        problem = f"none of the {len(rows)} ledger rows ran in a control or treatment arm"
    elif not any(_is_answer(r) for r in in_arms):
        problem = f"the experiment's {len(in_arms)} ledger rows are all overhead, no answers"
    else:
        return
    raise EmptyReportError(f"nothing to report: {problem}")


def _compare(
    feature: str,
    rows: Sequence[ledger_pb2.UsageRecord],
    arm_requests: Mapping[types_pb2.Arm.ValueType, int],
    projection: Projection,
    judge: Judge,
) -> Comparison:
    control, treatment = (
        _arm_stats([r for r in rows if r.arm == arm], arm_requests[arm], projection, judge)
        for arm in (types_pb2.ARM_CONTROL, types_pb2.ARM_TREATMENT)
    )
    savings = None if control is None or treatment is None else _savings(control, treatment)
    return Comparison(feature, control, treatment, savings)


def _arm_stats(
    rows: Sequence[ledger_pb2.UsageRecord], arm_requests: int, projection: Projection, judge: Judge
) -> ArmStats | None:
    """`arm_requests` (all features) is what the arm's daily volume is spread over."""
    answers = [r for r in rows if _is_answer(r)]
    if not answers:
        return None
    overhead = [r for r in rows if not _is_answer(r)]
    cost = sum(r.cost_nano_usd for r in rows)
    outcomes = Counter(r.cache_outcome for r in answers)
    mix = Counter(CACHE if is_hit(r) else (r.model or "(unknown)") for r in answers)
    return ArmStats(
        requests=len(answers),
        overhead_rows=len(overhead),
        billed_tokens=sum(r.usage.input_tokens + r.usage.output_tokens for r in rows),
        cost_nano_usd=cost,
        overhead_cost_nano_usd=sum(r.cost_nano_usd for r in overhead),
        counterfactual_cost_nano_usd=sum(r.counterfactual_cost_nano_usd for r in rows),
        model_mix=tuple(sorted(mix.items(), key=lambda item: (-item[1], item[0]))),
        exact_hits=outcomes[types_pb2.CACHE_OUTCOME_EXACT],
        semantic_hits=outcomes[types_pb2.CACHE_OUTCOME_SEMANTIC],
        latency=_latency([r.latency_ms for r in answers]),
        quality=judge.quality(answers),
        daily_cost_nano_usd=projection.daily(cost, arm_requests),
        monthly_cost_nano_usd=projection.monthly(cost, arm_requests),
        levers=_levers(rows),
    )


def _levers(rows: Sequence[ledger_pb2.UsageRecord]) -> tuple[tuple[str, int], ...]:
    """Each row's saving, counterfactual minus cost, credited to what made it."""
    saved: Counter[str] = Counter()
    for row in rows:
        saved[_lever(row)] += row.counterfactual_cost_nano_usd - row.cost_nano_usd
    return tuple((lever, saved[lever]) for lever in LEVERS if lever in saved)


def _lever(row: ledger_pb2.UsageRecord) -> str:
    if not _is_answer(row):
        return _OVERHEAD_LEVERS.get(row.purpose, OTHER_OVERHEAD)
    if row.cache_outcome == types_pb2.CACHE_OUTCOME_EXACT:
        return EXACT_HITS
    if row.cache_outcome == types_pb2.CACHE_OUTCOME_SEMANTIC:
        return SEMANTIC_HITS
    if row.baseline_model and row.model != row.baseline_model:
        return ROUTING
    return BATCH if row.batch else BASELINE


def _latency(values: Sequence[int]) -> Latency:
    ordered = sorted(values)
    return Latency(
        mean_ms=Decimal(sum(ordered)) / len(ordered),
        p50_ms=_nearest_rank(ordered, 50),
        p95_ms=_nearest_rank(ordered, 95),
    )


def _nearest_rank(ordered: Sequence[int], percentile: int) -> int:
    rank = -(-percentile * len(ordered) // 100)  # ceil, without floats
    return ordered[max(rank, 1) - 1]


def _savings(control: ArmStats, treatment: ArmStats) -> Savings:
    before = control.cost_per_request_nano_usd
    fraction = 1 - treatment.cost_per_request_nano_usd / before if before else None

    def saved(a: int | None, b: int | None) -> int | None:
        return None if a is None or b is None else a - b

    return Savings(
        fraction=fraction,
        daily_nano_usd=saved(control.daily_cost_nano_usd, treatment.daily_cost_nano_usd),
        monthly_nano_usd=saved(control.monthly_cost_nano_usd, treatment.monthly_cost_nano_usd),
    )


def _models(total: Comparison) -> tuple[str, ...]:
    counts: Counter[str] = Counter()
    for _, stats in total.arms():
        if stats is not None:
            counts.update(dict(stats.model_mix))
    return tuple(sorted(counts, key=lambda m: (-counts[m], m)))


def _untiered(rows: Iterable[ledger_pb2.UsageRecord], model_tiers: Mapping[str, str]) -> list[str]:
    """Models that gave an answer but have no tier (only when tiers were given at all)."""
    if not model_tiers:
        return []
    answered = {r.model for r in rows if _is_answer(r) and not is_hit(r) and r.model}
    return sorted(answered - set(model_tiers))


def _notes(
    left_out: int, features: Sequence[Comparison], total: Comparison, untiered: Sequence[str]
) -> tuple[str, ...]:
    notes: list[str] = []
    present = [name for name, stats in total.arms() if stats is not None]
    if len(present) == 1:
        notes.append(f"only the {present[0]} arm has answers: nothing to compare it with")
    else:
        notes += [
            f"{c.feature}: no {name} answers"
            for c in features
            for name, stats in c.arms()
            if stats is None
        ]
    if left_out:
        notes.append(f"{left_out} rows outside the control and treatment arms were left out")
    if untiered:
        notes.append(f"models without a tier (never counted as small): {', '.join(untiered)}")
    return tuple(notes)


def _is_answer(record: ledger_pb2.UsageRecord) -> bool:
    return record.purpose in _ANSWER
