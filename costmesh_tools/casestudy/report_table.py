"""The before / after / change lines of a savings report, as text: what the terminal and
the HTML renderings both show, and the number formats they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from costmesh_tools.casestudy.ablation import Ablation
from costmesh_tools.casestudy.projection import DAYS_PER_MONTH
from costmesh_tools.casestudy.report import CACHE, ArmStats, Comparison, SavingsReport
from costmesh_tools.cli_support import usd

NO_ANSWERS = "no answers"
ARM_TITLES = ("before (control)", "after (treatment)")

Cell = Callable[[ArmStats], str]
Change = Callable[[ArmStats, ArmStats], str]


@dataclass(frozen=True)
class Line:
    label: str
    before: str
    after: str
    change: str


@dataclass(frozen=True)
class _Metric:
    label: str
    cell: Cell
    change: Change | None = None

    def line(self, c: Comparison) -> Line:
        """A missing arm reads "no answers", and the change is then blank."""
        before = NO_ANSWERS if c.control is None else self.cell(c.control)
        after = NO_ANSWERS if c.treatment is None else self.cell(c.treatment)
        if c.control is None or c.treatment is None or self.change is None:
            return Line(self.label, before, after, "")
        return Line(self.label, before, after, self.change(c.control, c.treatment))


def headline(report: SavingsReport) -> str:
    """The report in one sentence: the total saving, or why there is none."""
    total = report.total
    if total.savings is None:
        arm = "control" if total.control is not None else "treatment"
        return f"No saving to show: only the {arm} arm has answers."
    if total.savings.fraction is None:
        return "No saving to show: the control arm cost nothing."
    more = total.savings.fraction < 0  # the optimised policy can cost more: say so plainly
    share = f"{abs(total.savings.fraction) * 100:.1f}%"
    monthly = total.savings.monthly_nano_usd
    if monthly is None or total.control is None or total.treatment is None:
        return (
            f"The optimised policy {'raises' if more else 'cuts'} the cost per request by {share}."
        )
    amount = dollars(abs(monthly))
    return (
        f"The optimised policy {f'costs {amount} more' if more else f'saves {amount}'} a month "
        f"({share}): {dollars(total.control.monthly_cost_nano_usd)} before, "
        f"{dollars(total.treatment.monthly_cost_nano_usd)} after."
    )


def projection_text(report: SavingsReport) -> str:
    if report.requests_per_day is None:
        return report.projection_basis
    return (
        f"Projected at {report.requests_per_day:,.0f} requests a day "
        f"({report.projection_basis}); a month is {DAYS_PER_MONTH} days."
    )


def sections(report: SavingsReport) -> list[tuple[str, Comparison]]:
    """(heading, comparison): each feature then the total; one feature is its own total."""
    if len(report.features) == 1:
        return [(report.features[0].feature, report.total)]
    return [*((c.feature, c) for c in report.features), ("all features", report.total)]


def lines(c: Comparison, report: SavingsReport) -> list[Line]:
    mixed = {model for _, s in c.arms() if s is not None for model, _ in s.model_mix}
    metrics = [
        _Metric("requests", lambda s: f"{s.requests:,}"),
        _Metric(
            "tokens per request",
            lambda s: f"{s.tokens_per_request:,.1f}",
            _relative(lambda s: s.tokens_per_request),
        ),
        _Metric(
            "cache hit rate",
            lambda s: percent(s.cache_hit_rate),
            _points(lambda s: s.cache_hit_rate),
        ),
        *(_mix(model) for model in report.models if model in mixed),
        *_costs(projected=report.requests_per_day is not None),
        *(_Metric(f"latency {name} (ms)", _ms(get), _ms_change(get)) for name, get in _LATENCY),
    ]
    return [m.line(c) for m in metrics] + quality_lines(c, report)


LEVER_HEADER = ("lever", "saved", "share of the saving", "of counterfactual cost")
LEVER_CAPTION = (
    "Where the treatment's saving comes from, row by row from the ledger: each answer "
    "against its counterfactual (the feature's baseline model, no cache), and what the "
    "calls around it cost. The levers sum to the total."
)


def lever_lines(stats: ArmStats) -> list[tuple[str, str, str, str]]:
    """(lever, saved, share of the saving, share of the counterfactual cost) for each
    of an arm's levers, then their total; a negative amount is what a lever cost."""
    total = sum(saved for _, saved in stats.levers)
    whole = stats.counterfactual_cost_nano_usd

    def line(label: str, saved: int) -> tuple[str, str, str, str]:
        return label, dollars(saved), _share(saved, total), _share(saved, whole)

    return [*(line(lever, saved) for lever, saved in stats.levers), line("total", total)]


ABLATION_HEADER = ("lever", "cost with it off", "saved", "share of the saving")
ABLATION_CAPTION = (
    "Measured by ablation: the treatment replayed with each lever switched off. A lever's "
    "saving is its Shapley value: the mean of what switching it on saves from control and "
    "what switching it off last costs the treatment. The two sum to the total."
)


def ablation_lines(ablation: Ablation) -> list[tuple[str, str, str, str]]:
    """(lever, the treatment's cost with it off, its saving, its share of the saving),
    then control against the treatment."""
    saving = ablation.saving

    def exact(nano_usd: int) -> str:  # to the micro-dollar, so the column adds up
        return f"${Decimal(nano_usd) / 10**9:,.6f}"

    return [
        *((lever, exact(ablation.without[lever]), exact(saved), _share(saved, saving))
          for lever, saved in ablation.shares()),
        ("total (control)", exact(ablation.control), exact(saving), _share(saving, saving)),
    ]  # fmt: skip


def _share(part: int, whole: int) -> str:
    if not whole:
        return "n/a"
    return percent(Decimal(part) / whole) if part else "0.0%"


def quality_lines(c: Comparison, report: SavingsReport) -> list[Line]:
    """The quality proxies; those that need the truth read "n/a" where it is not known."""
    return [m.line(c) for m in _quality(report)]


def _mix(model: str) -> _Metric:
    label = "answered from the cache" if model == CACHE else f"answered by {model}"
    return _Metric(label, lambda s: percent(s.share(model)), _points(lambda s: s.share(model)))


def _costs(projected: bool) -> list[_Metric]:
    metrics = [
        _Metric("cost (measured)", lambda s: dollars(s.cost_nano_usd)),
        _Metric(
            "cost per 1,000 requests", lambda s: dollars(_per_1000(s)), _cost_change(_per_1000)
        ),
    ]
    if projected:
        metrics += [
            _Metric(
                "cost per day (projected)",
                lambda s: dollars(s.daily_cost_nano_usd),
                _cost_change(lambda s: s.daily_cost_nano_usd),
            ),
            _Metric(
                "cost per month (projected)",
                lambda s: dollars(s.monthly_cost_nano_usd),
                _cost_change(lambda s: s.monthly_cost_nano_usd),
            ),
        ]
    return metrics


def _quality(report: SavingsReport) -> list[_Metric]:
    def escalations(s: ArmStats) -> str:
        return of(s.quality.escalated, s.quality.provider_answers)

    def false_hits(s: ArmStats) -> str:
        if not report.labels_known:
            return "n/a"
        return of(s.quality.false_hits, s.quality.judged_hits) if s.cache_hits else "no hits"

    def on_small(s: ArmStats) -> str:
        q = s.quality
        provider_answered = q.complex_requests - q.complex_from_cache
        return of(q.complex_on_small, provider_answered) if report.tiers_known else "n/a"

    def from_cache(s: ArmStats) -> str:
        q = s.quality
        return of(q.complex_from_cache, q.complex_requests) if report.tiers_known else "n/a"

    return [
        _Metric("escalation rate", escalations),
        _Metric("false cache hits", false_hits),
        _Metric("complex on a small model", on_small),
        _Metric("complex from the cache", from_cache),
    ]


_LATENCY: tuple[tuple[str, Callable[[ArmStats], Decimal | int]], ...] = (
    ("mean", lambda s: s.latency.mean_ms),
    ("p50", lambda s: s.latency.p50_ms),
    ("p95", lambda s: s.latency.p95_ms),
)


def _ms(get: Callable[[ArmStats], Decimal | int]) -> Cell:
    return lambda s: f"{get(s):,.0f}"


def _ms_change(get: Callable[[ArmStats], Decimal | int]) -> Change:
    return lambda before, after: f"{get(after) - get(before):+,.0f} ms"


def _relative(get: Callable[[ArmStats], Decimal]) -> Change:
    def change(before: ArmStats, after: ArmStats) -> str:
        base = get(before)
        return f"{(get(after) - base) / base * 100:+.1f}%" if base else ""

    return change


def _points(get: Callable[[ArmStats], Decimal]) -> Change:
    return lambda before, after: f"{(get(after) - get(before)) * 100:+.1f} pts"


def _cost_change(get: Callable[[ArmStats], int | Decimal | None]) -> Change:
    def change(before: ArmStats, after: ArmStats) -> str:
        b, a = get(before), get(after)
        if b is None or a is None:
            return ""
        return dollars(a - b) + (f" ({(a - b) / b * 100:+.1f}%)" if b else "")

    return change


def _per_1000(s: ArmStats) -> Decimal:
    return s.cost_per_request_nano_usd * 1000


def dollars(nano_usd: int | Decimal | None) -> str:
    """$1,234.56 (or $0.004512 under a dollar) for people; n/a for None."""
    if nano_usd is None:
        return "n/a"
    amount = Decimal(nano_usd)
    text = usd(abs(amount), exact=False)
    return f"-${text}" if amount < 0 else f"${text}"


def percent(fraction: Decimal | None) -> str:
    return "n/a" if fraction is None else f"{fraction * 100:.1f}%"


def of(part: int, whole: int) -> str:
    """3 of 40 (7.5%); n/a when there is nothing to count in."""
    return f"{part:,} of {whole:,} ({Decimal(part) / whole * 100:.1f}%)" if whole else "n/a"
