"""The savings report for people and machines: a terminal table, CSV, and one
self-contained HTML page with inline SVG charts (no script, font or fetch)."""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Sequence
from decimal import Decimal
from html import escape

from costmesh_tools.casestudy.report import SIMULATED_NOTICE, ArmStats, Comparison, SavingsReport
from costmesh_tools.casestudy.report_charts import report_charts
from costmesh_tools.casestudy.report_table import (
    ABLATION_CAPTION,
    ABLATION_HEADER,
    ARM_TITLES,
    LEVER_CAPTION,
    LEVER_HEADER,
    Line,
    ablation_lines,
    headline,
    lever_lines,
    lines,
    projection_text,
    quality_lines,
    sections,
)
from costmesh_tools.cli_support import usd

WIDTH = 110  # the terminal table's widest line
_LABEL = 32
_CELL = 24


def render_terminal(report: SavingsReport) -> str:
    """An aligned before / after / change table per feature and in total, at most
    WIDTH columns wide; a simulated provider is said above and below it."""
    banner = _banner() if report.simulated else []
    out = [*banner, _cut(f'costmesh savings report: experiment "{report.experiment}"', WIDTH)]
    out += textwrap.wrap(projection_text(report), WIDTH)
    for heading, comparison in sections(report):
        out += ["", _row(_cut(heading, _LABEL), *ARM_TITLES, "change"), "-" * WIDTH]
        out += [_row(_cut(f"  {x.label}", _LABEL), x.before, x.after, x.change)
                for x in lines(comparison, report)]  # fmt: skip
    tables = []
    if (treatment := report.total.treatment) is not None:
        tables.append((LEVER_CAPTION, LEVER_HEADER, lever_lines(treatment)))
    if report.ablation is not None:
        tables.append((ABLATION_CAPTION, ABLATION_HEADER, ablation_lines(report.ablation)))
    for caption, header, rows in tables:
        out += ["", *textwrap.wrap(caption, WIDTH), _row(*header), "-" * WIDTH]
        out += [_row(_cut(f"  {label}", _LABEL), *cells) for label, *cells in rows]
    out += ["", *textwrap.wrap(headline(report), WIDTH)]
    out += [line for note in report.notes for line in textwrap.wrap(f"note: {note}", WIDTH)]
    return "\n".join([*out, *banner]) + "\n"


def _banner() -> list[str]:
    inner = WIDTH - 6
    body = [f"!! {line.ljust(inner)} !!" for line in textwrap.wrap(SIMULATED_NOTICE, inner)]
    return ["!" * WIDTH, *body, "!" * WIDTH]


def _row(label: str, before: str, after: str, change: str) -> str:
    cells = "".join(f"  {cell:>{_CELL}}" for cell in (before, after, change))
    return (label.ljust(_LABEL) + cells).rstrip()


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


CSV_HEADER = (
    "scope", "feature", "arm", "experiment", "simulated", "requests", "overhead_rows",
    "billed_tokens", "tokens_per_request", "exact_hits", "semantic_hits", "cache_hit_rate",
    "model_mix", "cost_usd", "overhead_cost_usd", "counterfactual_cost_usd",
    "cost_per_request_usd", "daily_cost_usd", "monthly_cost_usd", "savings_fraction",
    "savings_daily_usd", "savings_monthly_usd", "latency_mean_ms", "latency_p50_ms",
    "latency_p95_ms", "provider_answers", "escalated", "escalation_rate", "judged_hits",
    "false_hits", "false_hit_rate", "complex_requests", "complex_on_small",
    "complex_from_cache", "complex_on_small_rate", "saved_by_lever_usd",
    "saved_by_ablation_usd", "note",
)  # fmt: skip


def render_csv(report: SavingsReport) -> str:
    """One row per feature and arm, then the total's rows (scope "total"). Money is exact
    decimal dollars, rates are fractions, model_mix is `model=answers;…`, and a cell that
    does not apply is empty; the savings are on the treatment row, and the ablation's
    measured shares on the total's."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    scoped = [*(("feature", c.feature, c) for c in report.features), ("total", "", report.total)]
    for scope, feature, comparison in scoped:
        for arm, stats in comparison.arms():
            head = [scope, feature, arm, report.experiment, str(report.simulated).lower()]
            if stats is None:
                writer.writerow([*head, "0", *[""] * (len(CSV_HEADER) - 7), "no answers"])
                continue
            savings = _savings_cells(comparison) if arm == "treatment" else ["", "", ""]
            ablation = report.ablation if (scope, arm) == ("total", "treatment") else None
            shares = ablation.shares() if ablation is not None else []
            measured = ";".join(f"{lever}={_usd(saved)}" for lever, saved in shares)
            writer.writerow([*head, *_stats_cells(stats, savings), measured, ""])
    return buffer.getvalue()


def _stats_cells(s: ArmStats, savings: list[str]) -> list[str]:
    q = s.quality
    return [
        str(s.requests), str(s.overhead_rows), str(s.billed_tokens),
        _fraction(s.tokens_per_request), str(s.exact_hits), str(s.semantic_hits),
        _fraction(s.cache_hit_rate), ";".join(f"{m}={n}" for m, n in s.model_mix),
        _usd(s.cost_nano_usd), _usd(s.overhead_cost_nano_usd),
        _usd(s.counterfactual_cost_nano_usd), _usd(s.cost_per_request_nano_usd),
        _usd(s.daily_cost_nano_usd), _usd(s.monthly_cost_nano_usd), *savings,
        f"{s.latency.mean_ms:.3f}", str(s.latency.p50_ms), str(s.latency.p95_ms),
        str(q.provider_answers), str(q.escalated), _fraction(q.escalation_rate),
        str(q.judged_hits), str(q.false_hits), _fraction(q.false_hit_rate),
        str(q.complex_requests), str(q.complex_on_small), str(q.complex_from_cache),
        _fraction(q.complex_on_small_rate),
        ";".join(f"{lever}={_usd(saved)}" for lever, saved in s.levers),
    ]  # fmt: skip


def _savings_cells(c: Comparison) -> list[str]:
    if c.savings is None:
        return ["", "", ""]
    s = c.savings
    return [_fraction(s.fraction), _usd(s.daily_nano_usd), _usd(s.monthly_nano_usd)]


def _usd(nano_usd: int | Decimal | None) -> str:
    return "" if nano_usd is None else usd(nano_usd, exact=True)


def _fraction(value: Decimal | None) -> str:
    return "" if value is None else f"{value:.6f}"


# Nothing may be fetched: a stray external reference is blocked, and the browser says so.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2933;
margin:0;background:#f5f7fa}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:28px}h2{margin:32px 0 8px;font-size:20px}
.meta{color:#52606d}
.simulated{background:#fff4e5;border:3px solid #d9822b;color:#7a3e00;padding:12px 16px;
font-weight:600;border-radius:6px}
.headline{font-size:20px;font-weight:600;background:#e3f4ea;border-left:6px solid #1b8a5a;
padding:12px 16px}
table{border-collapse:collapse;background:#fff;width:100%;margin:8px 0 16px}
caption{text-align:left;font-weight:600;padding:6px 0}
th,td{border:1px solid #d9e2ec;padding:4px 10px;text-align:right}
th[scope=row],thead th:first-child{text-align:left}
thead th{background:#eef2f7}
svg.chart{background:#fff;border:1px solid #d9e2ec;max-width:100%;height:auto;font-size:13px}
"""


def render_html(report: SavingsReport) -> str:
    """One self-contained page: headline, totals, charts, quality proxies, each feature."""
    title = f"costmesh savings report: {report.experiment}"
    if report.simulated:
        title += " (SIMULATED provider)"
    *features, (total_heading, total) = sections(report)
    simulated = f'<p class="simulated" role="note">{escape(SIMULATED_NOTICE)}</p>'
    body = [
        f"<h1>Savings report</h1><p class=meta>Experiment <strong>{escape(report.experiment)}"
        f"</strong>. {escape(projection_text(report))}</p>",
        simulated if report.simulated else "",
        f'<p class="headline">{escape(headline(report))}</p>',
        _table(f"Totals: {total_heading}", lines(total, report)),
        _lever_tables(report),
        *(f"<h2>{escape(heading)}</h2>{svg}" for heading, svg in report_charts(report)),
        _quality_table(report),
        *(_table(heading, lines(c, report)) for heading, c in features),
        _notes(report.notes),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS.strip()}</style></head>\n<body><main>\n"
        + "\n".join(part for part in body if part)
        + "\n</main></body></html>\n"
    )


def render_table_page(
    title: str, note: str, tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]]]]
) -> str:
    """Any report's tables (heading, header, rows) as one self-contained page, with
    the savings report's style and its policy: nothing is fetched."""
    body = [f"<h1>{escape(title)}</h1><p class=meta>{escape(note)}</p>"]
    for heading, header, rows in tables:
        head = "".join(f'<th scope="col">{escape(h)}</th>' for h in header)
        cells = "".join(
            f'<tr><th scope="row">{escape(row[0])}</th>'
            + "".join(f"<td>{escape(cell)}</td>" for cell in row[1:])
            + "</tr>"
            for row in rows
        )
        body.append(
            f"<h2>{escape(heading)}</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{cells}</tbody></table>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS.strip()}</style></head>\n<body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )


def _table(heading: str, rows: list[Line]) -> str:
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in ("metric", *ARM_TITLES, "change"))
    body = "".join(
        f'<tr><th scope="row">{escape(x.label)}</th><td>{escape(x.before)}</td>'
        f"<td>{escape(x.after)}</td><td>{escape(x.change)}</td></tr>"
        for x in rows
    )
    return (
        f"<h2>{escape(heading)}</h2><table><caption>Each metric before (control) and after "
        f"(treatment), and the change</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _lever_tables(report: SavingsReport) -> str:
    """The saving by lever, row by row and (when ablation arms ran) measured."""
    tables = []
    if (treatment := report.total.treatment) is not None:
        tables.append((LEVER_CAPTION, LEVER_HEADER, lever_lines(treatment)))
    if report.ablation is not None:
        tables.append((ABLATION_CAPTION, ABLATION_HEADER, ablation_lines(report.ablation)))
    if not tables:
        return ""
    html = "<h2>Where the saving comes from</h2>"
    for caption, header, rows in tables:
        head = "".join(f'<th scope="col">{escape(h)}</th>' for h in header)
        body = "".join(
            f'<tr><th scope="row">{escape(label)}</th>'
            + "".join(f"<td>{escape(cell)}</td>" for cell in cells)
            + "</tr>"
            for label, *cells in rows
        )
        html += (
            f"<table><caption>{escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>"
        )
    return html


def _quality_table(report: SavingsReport) -> str:
    per_feature = [(heading, quality_lines(c, report)) for heading, c in sections(report)]
    labels = [x.label for x in per_feature[0][1]]
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in ("feature", "arm", *labels))
    rows = [
        f'<tr><th scope="row">{escape(heading)}</th><td>{arm}</td>'
        + "".join(f"<td>{escape(x.after if i else x.before)}</td>" for x in found)
        + "</tr>"
        for heading, found in per_feature
        for i, arm in enumerate(ARM_TITLES)
    ]
    return (
        "<h2>Quality proxies</h2><table><caption>Per feature and arm. A false hit is a cache "
        "hit whose source request has another intent label; complex requests on a small "
        "model leave out those answered from the cache.</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _notes(notes: tuple[str, ...]) -> str:
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"
