"""`costmesh ledger report|export` (chargeback, or an experiment's arms compared, from a
running ledger) and `costmesh economics self-host|fine-tune`."""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TextIO

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_tools.casestudy.report import EmptyReportError, SavingsReport, build_report
from costmesh_tools.casestudy.report_render import (
    render_csv,
    render_html,
    render_table_page,
    render_terminal,
)
from costmesh_tools.cli_support import (
    add_tls_arguments,
    open_channel,
    positive_decimal,
    usd,
    write_grid,
)
from costmesh_tools.cli_support import decimal as _decimal
from costmesh_tools.ledger import export
from costmesh_tools.ledger.economics import (
    LedgerLoad,
    SelfHostVerdict,
    fine_tune,
    ledger_load,
    self_host,
)
from services.common.config import load_config

_BY = {name.removeprefix("GROUP_BY_").lower(): value for name, value in ledger_pb2.GroupBy.items()}
_BY.pop("unspecified")
_DEFAULT_BY = "team,feature"
# An experiment's rows spanning less than this say no daily volume (a replay's).
_MIN_SPAN_SECONDS = 3_600
_RENDER: dict[str, Callable[[SavingsReport], str]] = {
    "table": render_terminal,
    "csv": render_csv,
    "html": render_html,
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `ledger` and `economics` commands to the costmesh parser."""
    ledger = commands.add_parser("ledger", help="chargeback reports from a running ledger")
    sub = ledger.add_subparsers(dest="ledger_command", required=True)
    report = sub.add_parser(
        "report",
        help="spend, savings, cache hit rate and model mix; or an experiment's arms compared",
    )
    _connection(report)
    report.add_argument("--by", help=f"one or two of: {', '.join(_BY)} (default {_DEFAULT_BY})")
    report.add_argument(
        "--format", choices=tuple(_RENDER), default="table", help="table, csv or one HTML page"
    )
    report.add_argument("--out", type=Path, metavar="PATH", help="write the report to this file")
    experiment = report.add_argument_group("experiments")
    experiment.add_argument(
        "--experiment", default="", metavar="NAME", help="compare its control and treatment arms"
    )
    experiment.add_argument(
        "--requests-per-day",
        type=positive_decimal,
        metavar="N",
        help="the daily volume to project costs at (default: what the rows span)",
    )
    experiment.add_argument(
        "--config", metavar="PATH", help="mesh TOML over the embedded defaults (the models' tiers)"
    )
    report.set_defaults(handler=_report)
    export_cmd = sub.add_parser(
        "export", help="every usage record of the period, as CSV or a FinOps FOCUS feed"
    )
    _connection(export_cmd)
    export_cmd.add_argument(
        "--format",
        choices=export.FORMATS,
        default="csv",
        help="csv: every ledger field; focus: FOCUS 1.x column names "
        "(BilledCost, ChargePeriodStart, SubAccountId = team, Tags, ...)",
    )
    export_cmd.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help="write here (whole, or nothing on failure) instead of stdout",
    )
    export_cmd.set_defaults(handler=_export)

    economics = commands.add_parser("economics", help="self-hosting and fine-tuning arithmetic")
    esub = economics.add_subparsers(dest="economics_command", required=True)
    host = esub.add_parser(
        "self-host",
        help="GPUs for the peak load (plus spares and operations) against the API, and the "
        "breakeven; the API's price and the load from the ledger (--from-ledger) or given",
    )
    for flag in ("--gpu-usd-per-hour", "--gpu-requests-per-second"):
        host.add_argument(flag, type=_decimal, required=True)
    given = host.add_argument_group("the load and the API's price, given")
    given.add_argument("--requests-per-second", type=_decimal, help="the mean load")
    given.add_argument("--api-usd-per-request", type=_decimal)
    given.add_argument(
        "--peak-requests-per-second", type=_decimal, help="the load to size for (default: mean)"
    )
    rows = host.add_argument_group("... or read from the ledger's rows")
    rows.add_argument(
        "--from-ledger",
        action="store_true",
        help="price a request as the rows' cost over the answered requests, and take the "
        "mean and peak load from their times (--addr, --key, --from, --to, --team, --feature)",
    )
    rows.add_argument("--feature", default="", help="only this feature's rows")
    rows.add_argument(
        "--peak-percentile",
        type=_decimal,
        default=Decimal(99),
        help="the peak: this percentile of the requests per second of each minute (default 99)",
    )
    _connection(host)
    host.add_argument(
        "--spare-gpus", type=int, default=1, help="GPUs beyond the peak's need (default 1: N+1)"
    )
    host.add_argument(
        "--ops-usd-per-month",
        type=_decimal,
        default=Decimal(0),
        help="people and tooling to run the GPUs, per month (default 0: say yours)",
    )
    host.set_defaults(handler=_self_host)
    tune = esub.add_parser("fine-tune", help="training cost paid back by a per-request saving")
    for flag in ("--training-usd", "--saving-usd-per-request", "--requests-per-day"):
        tune.add_argument(flag, type=_decimal, required=True)
    tune.set_defaults(handler=_fine_tune)


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--addr", default="127.0.0.1:50051", help="the mesh or the ledger")
    parser.add_argument("--key", default=os.environ.get("COSTMESH_API_KEY", ""),
                        help="API key (default: $COSTMESH_API_KEY)")  # fmt: skip
    parser.add_argument("--from", dest="start", type=date.fromisoformat, help="first day (UTC)")
    parser.add_argument("--to", dest="end", type=date.fromisoformat, help="last day, included")
    parser.add_argument("--team", default="", help="only this team")
    add_tls_arguments(parser)


def _limit(request: ledger_pb2.QuerySpendRequest | ledger_pb2.ExportUsageRequest,
           args: argparse.Namespace) -> None:  # fmt: skip
    """--from and --to as the request's time range; the last day is included."""
    if args.start is not None:
        request.start_time.FromDatetime(datetime.combine(args.start, time(), tzinfo=UTC))
    if args.end is not None:
        end = datetime.combine(args.end, time(), tzinfo=UTC) + timedelta(days=1)
        request.end_time.FromDatetime(end)


def _stub(
    args: argparse.Namespace,
) -> tuple[ledger_pb2_grpc.LedgerServiceStub, tuple[tuple[str, str]]]:
    channel = open_channel(args.addr, args)
    return ledger_pb2_grpc.LedgerServiceStub(channel), (("authorization", f"Bearer {args.key}"),)


def _report(args: argparse.Namespace, out: TextIO) -> int:
    """The report goes to --out only once it is whole: a failure leaves no file."""
    problem = _report_problem(args)
    if problem:
        print(f"costmesh: {problem}", file=sys.stderr)
        return 2
    text = io.StringIO()
    code = (_experiment_report if args.experiment else _spend_report)(args, text)
    if code == 0 and args.out is not None:
        args.out.write_text(text.getvalue(), encoding="utf-8")
        out.write(f"wrote the {args.format} report to {args.out}\n")
    elif code == 0:
        out.write(text.getvalue())
    return code


def _report_problem(args: argparse.Namespace) -> str:
    """Options that do not go together, as one line; empty when they do."""
    if args.experiment:
        return "--by does not apply to --experiment reports" if args.by is not None else ""
    dims = _dimensions(args)
    if not 1 <= len(dims) <= 2 or any(d not in _BY for d in dims):
        return f"--by takes one or two of {', '.join(_BY)}"
    experiment_only = {
        "--requests-per-day": args.requests_per_day is not None,
        "--config": args.config is not None,
    }
    given = [flag for flag, used in experiment_only.items() if used]
    return f"{given[0]} needs --experiment" if given else ""


def _experiment_report(args: argparse.Namespace, out: TextIO) -> int:
    """The experiment's rows, compared by the case study's savings report."""
    from costmesh_simulator.stand_in import model_tiers  # noqa: PLC0415 - `--help` stays light
    from services.providers.client import SIMULATED  # noqa: PLC0415

    tiers = model_tiers(load_config(args.config, dict(os.environ)))
    stub, metadata = _stub(args)
    request = ledger_pb2.ExportUsageRequest(team=args.team, experiment=args.experiment)
    _limit(request, args)
    records = [item.record for item in stub.ExportUsage(request, metadata=metadata, timeout=3600)]
    if args.requests_per_day is None and records and _span_seconds(records) < _MIN_SPAN_SECONDS:
        print(
            f"costmesh: experiment {args.experiment!r}: its rows span less than an hour (a "
            "replay's rows are compressed in time): give --requests-per-day to project costs",
            file=sys.stderr,
        )
        return 2
    try:
        report = build_report(
            records,
            model_tiers=tiers,
            requests_per_day=args.requests_per_day,
            simulated=any(r.provider == SIMULATED for r in records),
        )
    except EmptyReportError as exc:
        print(f"costmesh: experiment {args.experiment!r}: {exc}", file=sys.stderr)
        return 1
    out.write(_RENDER[args.format](report))
    return 0


def _span_seconds(records: list[ledger_pb2.UsageRecord]) -> float:
    times = [r.time.seconds + r.time.nanos / 1e9 for r in records]
    return max(times) - min(times)


def _dimensions(args: argparse.Namespace) -> list[str]:
    return [d.strip() for d in (args.by or _DEFAULT_BY).split(",") if d.strip()]


def _spend_report(args: argparse.Namespace, out: TextIO) -> int:
    dims = _dimensions(args)
    stub, metadata = _stub(args)
    request = ledger_pb2.QuerySpendRequest(group_by=_BY[dims[0]], team=args.team)
    if len(dims) == 2:
        request.then_by = _BY[dims[1]]
    _limit(request, args)
    spend = stub.QuerySpend(request, metadata=metadata, timeout=30)
    by_model = ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_MODEL, team=args.team)
    _limit(by_model, args)
    mix = stub.QuerySpend(by_model, metadata=metadata, timeout=30)
    if not spend.rows:
        print(f"costmesh: no usage rows {_period(args)}", file=sys.stderr)
    if args.format == "html":
        by = " and ".join(dims)
        tables = [
            (f"By {by}", *_rows(dims, spend, "table")),
            ("Model mix", *_rows(["model"], mix, "table")),
        ]
        out.write(render_table_page("costmesh spend report", f"Spend {_period(args)}.", tables))
        return 0
    _print_rows(out, args.format, dims, spend)
    if args.format == "table":
        out.write("\nmodel mix\n")
        _print_rows(out, "table", ["model"], mix)
    return 0


def _print_rows(
    out: TextIO, fmt: str, dims: Sequence[str], spend: ledger_pb2.QuerySpendResponse
) -> None:
    header, lines = _rows(dims, spend, fmt)
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(lines)
        return
    write_grid(out, header, lines, "table")


def _rows(
    dims: Sequence[str], spend: ledger_pb2.QuerySpendResponse, fmt: str
) -> tuple[list[str], list[list[str]]]:
    """The header and the lines (a TOTAL line last) of a spend table."""
    header = [*dims, "calls", "cost_usd", "without_costmesh_usd", "savings_usd", "savings_pct",
              "cache_hit_pct", "escalation_pct", "cost_share_pct",
              "out_of_domain_pct"]  # fmt: skip
    lines = [_line(r, dims, spend.total_cost_nano_usd, fmt) for r in spend.rows]
    total = ledger_pb2.SpendRow(
        key="TOTAL",
        calls=sum(r.calls for r in spend.rows),
        cost_nano_usd=spend.total_cost_nano_usd,
        counterfactual_cost_nano_usd=spend.total_counterfactual_cost_nano_usd,
        savings_nano_usd=spend.total_savings_nano_usd,
        cached_calls=sum(r.cached_calls for r in spend.rows),
        escalated_calls=sum(r.escalated_calls for r in spend.rows),
        out_of_domain_calls=sum(r.out_of_domain_calls for r in spend.rows),
    )
    lines.append(_line(total, dims, spend.total_cost_nano_usd, fmt))
    return header, lines


def _line(row: ledger_pb2.SpendRow, dims: Sequence[str], total: int, fmt: str) -> list[str]:
    keys = [row.key, row.second_key][: len(dims)]
    exact = fmt == "csv"
    return [
        *keys,
        str(row.calls),
        usd(row.cost_nano_usd, exact),
        usd(row.counterfactual_cost_nano_usd, exact),
        usd(row.savings_nano_usd, exact),
        _pct(row.savings_nano_usd, row.counterfactual_cost_nano_usd),
        _pct(row.cached_calls, row.calls),
        _pct(row.escalated_calls, row.calls),
        _pct(row.cost_nano_usd, total),
        _pct(row.out_of_domain_calls, row.calls),
    ]


def _pct(part: int, whole: int) -> str:
    return f"{Decimal(100) * part / whole:.1f}" if whole else "-"


def _export(args: argparse.Namespace, out: TextIO) -> int:
    """Rows as they stream. The header waits for the first row and --out is written
    whole or not at all, so a refused or failed export leaves nothing behind."""
    stub, metadata = _stub(args)
    request = ledger_pb2.ExportUsageRequest(team=args.team)
    _limit(request, args)
    rows = stub.ExportUsage(request, metadata=metadata, timeout=3600)
    if args.out is None:
        written = _write_export(rows, args.format, out)
    else:
        partial = args.out.with_name(f".{args.out.name}.partial")
        try:
            with partial.open("w", newline="", encoding="utf-8") as file:
                written = _write_export(rows, args.format, file)
            partial.replace(args.out)
        finally:
            partial.unlink(missing_ok=True)
        print(f"costmesh: wrote {written} rows to {args.out}", file=sys.stderr)
    if not written:
        print(f"costmesh: no usage rows {_period(args)}", file=sys.stderr)
    return 0


def _write_export(rows: Iterable[ledger_pb2.ExportUsageResponse], fmt: str, out: TextIO) -> int:
    writer = csv.writer(out)
    written = 0
    for item in rows:
        if not written:
            writer.writerow(export.header(fmt))
        writer.writerow(export.line(item.record, fmt))
        written += 1
    if not written:
        writer.writerow(export.header(fmt))  # a valid, empty feed
    return written


def _period(args: argparse.Namespace) -> str:
    """The filter in words, for a result with no rows."""
    start = args.start.isoformat() if args.start else "the first"
    end = args.end.isoformat() if args.end else "now"
    team = f" for team {args.team!r}" if args.team else ""
    return f"between {start} and {end}{team} (UTC days; --from/--to and --team choose)"


def _name(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix).lower()


def _self_host(args: argparse.Namespace, out: TextIO) -> int:
    given = {
        "--requests-per-second": args.requests_per_second is not None,
        "--api-usd-per-request": args.api_usd_per_request is not None,
        "--peak-requests-per-second": args.peak_requests_per_second is not None,
    }
    ledger_only = {
        "--feature": bool(args.feature), "--team": bool(args.team),
        "--from": args.start is not None, "--to": args.end is not None,
        "--peak-percentile": args.peak_percentile != Decimal(99),
    }  # fmt: skip
    clash = [f for f, named in (given if args.from_ledger else ledger_only).items() if named]
    if clash:
        why = (
            "the ledger gives it" if args.from_ledger else "it reads the ledger: add --from-ledger"
        )
        print(f"costmesh: economics self-host: {clash[0]}: {why}", file=sys.stderr)
        return 2
    if not 0 < args.peak_percentile <= 100:
        print(
            "costmesh: economics self-host: --peak-percentile must be in (0, 100]", file=sys.stderr
        )
        return 2
    if args.from_ledger:
        load = _ledger_load(args)
        mean, price, peak = (
            load.requests_per_second,
            load.api_usd_per_request,
            load.peak_requests_per_second,
        )
        out.write(
            f"from the ledger: {load.requests:,} requests cost ${load.cost_usd:,.6f} over "
            f"{load.seconds / 3600:,.1f} hours: ${price:.6f} a request, {mean:.3f} requests/s "
            f"on average, {peak:.3f} at the {args.peak_percentile}th percentile minute\n"
        )
    else:
        given = {"--requests-per-second": args.requests_per_second,
                 "--api-usd-per-request": args.api_usd_per_request}  # fmt: skip
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            print(f"costmesh: economics self-host: give {' and '.join(missing)}, or --from-ledger",
                  file=sys.stderr)  # fmt: skip
            return 2
        mean, price, peak = (
            args.requests_per_second,
            args.api_usd_per_request,
            args.peak_requests_per_second,
        )
    v = self_host(
        args.gpu_usd_per_hour, args.gpu_requests_per_second, mean, price,
        peak_requests_per_second=peak, spare_gpus=args.spare_gpus,
        ops_usd_per_month=args.ops_usd_per_month,
    )  # fmt: skip
    spares = f" + {args.spare_gpus} spare" if args.spare_gpus else ""
    out.write(
        f"self-hosting: ${v.self_host_usd_per_month:,.2f} a month ({v.serving_gpus} GPU for the "
        f"peak{spares}, {v.utilisation * 100:.0f}% used on average; operations "
        f"${args.ops_usd_per_month:,.2f})\n"
        f"API: ${v.api_usd_per_month:,.2f} a month\n"
        f"{_cheaper(v)}; {_breakeven(v)}\n"
    )
    return 0


def _cheaper(v: SelfHostVerdict) -> str:
    if v.api_usd_per_month == 0:
        return "the API costs nothing at no load"
    if v.api_over_self_host >= 1:
        return f"the API costs {v.api_over_self_host:.1f}x self-hosting"
    return f"self-hosting costs {1 / v.api_over_self_host:.1f}x the API"


def _breakeven(v: SelfHostVerdict) -> str:
    if v.breakeven_requests_per_second is None:
        return "the API is cheaper at any load (a GPU's traffic costs it less than the GPU)"
    return (
        f"breakeven at {v.breakeven_requests_per_second:.2f} requests/s on average, on "
        f"{v.breakeven_gpus} GPU (its peak's and the spares)"
    )


def _ledger_load(args: argparse.Namespace) -> LedgerLoad:
    """The rows of the period (and team, feature) as a price per request and a load."""
    stub, metadata = _stub(args)
    request = ledger_pb2.ExportUsageRequest(team=args.team)
    _limit(request, args)
    answers, cost, first, last = [], 0, None, None
    answer_purposes = (ledger_pb2.CALL_PURPOSE_ANSWER, ledger_pb2.CALL_PURPOSE_UNSPECIFIED)
    for item in stub.ExportUsage(request, metadata=metadata, timeout=3600):
        row = item.record
        if args.feature and row.feature != args.feature:
            continue
        at = row.time.ToMicroseconds()
        first, last = min(first or at, at), max(last or at, at)
        cost += row.cost_nano_usd
        if row.purpose in answer_purposes:
            answers.append(at)
    if first is None or last is None:
        raise ValueError(f"no usage rows {_period(args)}")
    start = request.start_time.ToMicroseconds() if request.HasField("start_time") else first
    end = request.end_time.ToMicroseconds() if request.HasField("end_time") else last + 1_000_000
    # A period reaching into the future would count hours that have not happened.
    end = min(end, max(int(datetime.now(UTC).timestamp() * 1_000_000), last + 1_000_000))
    return ledger_load(answers, cost, start, end, args.peak_percentile)


def _fine_tune(args: argparse.Namespace, out: TextIO) -> int:
    v = fine_tune(args.training_usd, args.saving_usd_per_request, args.requests_per_day)
    payback = "never" if v.payback_days is None else f"in {v.payback_days:.1f} days"
    out.write(f"saves ${v.saving_usd_per_month:,.2f} a month; pays back {payback}\n")
    return 0
