"""Inline SVG bar charts for the savings report's HTML page: drawn here, in Python, so the
page needs no script, font or fetch. Every chart carries a title and a description."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from html import escape

from costmesh_tools.casestudy.report import CACHE, ArmStats, Comparison, SavingsReport
from costmesh_tools.casestudy.report_table import ARM_TITLES, dollars, percent, sections

BEFORE = "#7b8794"  # the control arm
AFTER = "#1b8a5a"  # the treatment arm
CACHE_COLOUR = "#e5a50a"
PALETTE = ("#3a6ea5", "#8e4fb3", "#17a2a8", "#c2453d", "#4a5568", "#d9822b", "#6b8e23")

_WIDTH = 960
_LABEL = 230  # left column, for category names
_VALUE = 150  # right margin, for the value written after a bar
_BAR = 20
_GAP = 4
_GROUP_GAP = 18
_LEGEND = 34
_INSIDE = 'text-anchor="middle" fill="#fff"'
_INK = 'fill="#1f2933"'
_MUTED = 'fill="#52606d"'
_MAX_LABEL = 30  # characters of a category name before it is cut (the full one is a tooltip)


@dataclass(frozen=True)
class Caption:
    """What a chart is called and what it shows, for its <title> and <desc>."""

    chart_id: str
    title: str
    description: str


@dataclass(frozen=True)
class Series:
    """One bar per category; a None value is drawn as a note, not a bar."""

    name: str
    colour: str
    values: tuple[Decimal | None, ...]


def bar_chart(
    caption: Caption,
    categories: Sequence[str],
    series: Sequence[Series],
    value_text: Callable[[Decimal], str],
    maximum: Decimal | None = None,
) -> str:
    """Horizontal bars grouped by category, one bar a series, on one linear scale."""
    values = [v for s in series for v in s.values if v is not None]
    top = maximum if maximum is not None else max([*values, Decimal(0)])
    scale = (_WIDTH - _LABEL - _VALUE) / float(top) if top > 0 else 0.0
    group = len(series) * (_BAR + _GAP) - _GAP
    height = _LEGEND + len(categories) * (group + _GROUP_GAP)
    parts = [_legend([(s.name, s.colour) for s in series])]
    for i, category in enumerate(categories):
        y = _LEGEND + i * (group + _GROUP_GAP)
        parts.append(_category(category, y + group / 2))
        for j, s in enumerate(series):
            value, bar_y = s.values[i], y + j * (_BAR + _GAP)
            if value is None:
                parts.append(_text(_LABEL + 4, bar_y + _BAR / 2, f"{s.name}: no answers", _MUTED))
            else:
                tip = f"{category}, {s.name}: {value_text(value)}"
                width = max(float(value) * scale, 1.0)  # a zero still shows where it would be
                parts.append(_bar(tip, s.colour, width, bar_y, value_text(value)))
    return _svg(caption, height, parts)


def stacked_chart(
    caption: Caption,
    bars: Sequence[tuple[str, Sequence[tuple[str, Decimal]]]],
    colours: Mapping[str, str],
) -> str:
    """One 100% bar per (label, [(segment, share 0..1)]): each segment's share of it."""
    names = list(dict.fromkeys(name for _, segments in bars for name, _ in segments))
    parts = [_legend([(n, colours[n]) for n in names])]
    span = _WIDTH - _LABEL - _VALUE
    for i, (label, segments) in enumerate(bars):
        y = _LEGEND + i * (_BAR + _GROUP_GAP)
        parts.append(_category(label, y + _BAR / 2))
        x = float(_LABEL)
        for name, share in segments:
            width = float(share) * span
            tip = f"{label}: {name} {share * 100:.1f}%"
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{_BAR}" '
                f'fill="{colours[name]}"><title>{escape(tip)}</title></rect>'
            )
            if share >= Decimal("0.06"):
                inside = f"{share * 100:.0f}%"
                parts.append(_text(x + width / 2, y + _BAR / 2, inside, _INSIDE))
            x += width
    height = _LEGEND + len(bars) * (_BAR + _GROUP_GAP)
    return _svg(caption, height, parts)


def model_colours(models: Sequence[str], cache: str) -> dict[str, str]:
    """A colour per model, stable within a report; the cache always amber."""
    others = [m for m in models if m != cache]
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(others)}
    colours[cache] = CACHE_COLOUR
    return colours


def _bar(tip: str, colour: str, width: float, y: float, text: str) -> str:
    return (
        f'<rect x="{_LABEL}" y="{y}" width="{width:.1f}" height="{_BAR}" fill="{colour}">'
        f"<title>{escape(tip)}</title></rect>" + _text(_LABEL + width + 6, y + _BAR / 2, text, _INK)
    )


def _category(name: str, middle: float) -> str:
    shown = name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "…"
    return (
        f'<text x="{_LABEL - 10}" y="{middle:.1f}" text-anchor="end" '
        f'dominant-baseline="middle" fill="#1f2933"><title>{escape(name)}</title>'
        f"{escape(shown)}</text>"
    )


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    parts, x = [], float(_LABEL)
    for name, colour in entries:
        parts.append(f'<rect x="{x:.1f}" y="6" width="14" height="14" fill="{colour}"/>')
        parts.append(_text(x + 20, 13, name, _INK))
        x += 40 + 7.5 * len(name)
    return "".join(parts)


def _text(x: float, y: float, text: str, attributes: str) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" dominant-baseline="middle" {attributes}>'
        f"{escape(text)}</text>"
    )


def _svg(caption: Caption, height: float, parts: Sequence[str]) -> str:
    ident = escape(caption.chart_id)
    return (
        f'<svg id="{ident}" class="chart" role="img" aria-labelledby="{ident}-title '
        f'{ident}-desc" viewBox="0 0 {_WIDTH} {height:.0f}" width="{_WIDTH}" '
        f'height="{height:.0f}">'
        f'<title id="{ident}-title">{escape(caption.title)}</title>'
        f'<desc id="{ident}-desc">{escape(caption.description)}</desc>' + "".join(parts) + "</svg>"
    )


def report_charts(report: SavingsReport) -> list[tuple[str, str]]:
    """(heading, svg): cost per feature, model mix per arm, cache hit rate per feature."""
    comparisons = [c for _, c in sections(report)]
    names = [heading for heading, _ in sections(report)]
    what = "measured cost"
    cost: Callable[[ArmStats], Decimal] = lambda s: Decimal(s.cost_nano_usd)  # noqa: E731
    if report.requests_per_day is not None:
        what = "projected monthly cost"
        cost = lambda s: Decimal(s.monthly_cost_nano_usd or 0)  # noqa: E731
    costs = bar_chart(
        Caption(
            "chart-cost",
            f"Cost before and after, per feature ({what})",
            f"Horizontal bars: the {what} of each feature under the baseline policy "
            "(control) and under the optimised policy (treatment).",
        ),
        names,
        _arm_series(comparisons, cost),
        dollars,
    )
    mix = stacked_chart(
        Caption(
            "chart-mix",
            "Model mix per arm",
            "Stacked bars: the share of answers each model gave, and the cache's share.",
        ),
        [
            (f"{_short(heading)}: {word}", [(m, n / Decimal(s.requests)) for m, n in s.model_mix])
            for heading, c in sections(report)
            for word, (_, s) in zip(("before", "after"), c.arms(), strict=True)
            if s is not None
        ],
        model_colours(report.models, CACHE),
    )
    hits = bar_chart(
        Caption(
            "chart-cache",
            "Cache hit rate per feature",
            "Horizontal bars: the share of each feature's requests answered from the cache.",
        ),
        names,
        _arm_series(comparisons, lambda s: s.cache_hit_rate),
        percent,
        maximum=Decimal(1),
    )
    return [(f"Cost per feature ({what})", costs), ("Model mix", mix), ("Cache hit rate", hits)]


def _short(name: str) -> str:
    """A feature name short enough to leave room for the arm in a bar's label."""
    return name if len(name) <= _MAX_LABEL - 8 else name[: _MAX_LABEL - 9] + "…"


def _arm_series(
    comparisons: Sequence[Comparison], get: Callable[[ArmStats], Decimal]
) -> list[Series]:
    def values(arm: str) -> tuple[Decimal | None, ...]:
        stats = [dict(c.arms())[arm] for c in comparisons]
        return tuple(None if s is None else get(s) for s in stats)

    return [
        Series(ARM_TITLES[0], BEFORE, values("control")),
        Series(ARM_TITLES[1], AFTER, values("treatment")),
    ]
