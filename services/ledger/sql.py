"""The SQL both ledger stores run, written once with the engine's placeholder, and the
arithmetic that turns partial results into spend totals (rollup days plus edge rows)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, timedelta

from services.ledger.rows import (
    COLUMNS,
    DAY_US,
    END_OF_TIME_US,
    EXPORT_PAGE,
    GROUPS,
    ROW_SUMS,
    SUMMED,
    SpendTotal,
    UsageRow,
)

_DIMENSION_COLUMN = {"": "''", "week": "day", "month": "day"}
# The condition of the usage_experiment index (migration 4): a query for one experiment
# repeats it, so that both engines can prove the partial index covers the rows asked for.
EXPERIMENT_ROWS = "experiment <> ''"

# Runs one SELECT with its parameters and returns every row.
Query = Callable[[str, list[object]], list[Sequence[object]]]


class Sql:
    """The statements of both stores, written once with the engine's placeholder."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def insert(self) -> str:
        placeholders = ", ".join(self.mark for _ in COLUMNS)
        return (
            f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({placeholders}) "
            "ON CONFLICT (team, request_id) DO NOTHING"
        )

    def existing_cost(self) -> str:
        return (
            f"SELECT cost_nano_usd FROM usage WHERE team = {self.mark} AND request_id = {self.mark}"
        )

    def where(
        self, start_us: int, end_us: int, *, team: str = "", feature: str = "", experiment: str = ""
    ) -> tuple[str, list[object]]:
        clauses = [f"time_us >= {self.mark}", f"time_us < {self.mark}"]
        params: list[object] = [start_us, end_us]
        for column, value in (("team", team), ("feature", feature), ("experiment", experiment)):
            if value:
                clauses.append(f"{column} = {self.mark}")
                params.append(value)
        if experiment:
            clauses.append(EXPERIMENT_ROWS)
        return " AND ".join(clauses), params

    def rollup_upsert(self) -> str:
        m = self.mark
        keys = "day, team, feature, model, tier"
        updates = ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in SUMMED)
        return (
            f"INSERT INTO usage_daily ({keys}, {', '.join(SUMMED)})"
            f" VALUES ({', '.join([m] * (5 + len(SUMMED)))})"
            f" ON CONFLICT ({keys}) DO UPDATE SET {updates}"
        )

    def spend_raw(self, groups: tuple[str, ...], where: str) -> str:
        """Sums over individual rows, for the partial days at a range's edges."""
        return (
            f"SELECT {_dimensions(groups)}, {ROW_SUMS}"
            f" FROM usage WHERE {where} GROUP BY {_positions(groups)}"
        )

    def spend_rollup(self, groups: tuple[str, ...], team: str, feature: str) -> str:
        """Sums over whole days [first, end) from the rollup."""
        clauses = [f"day >= {self.mark}", f"day < {self.mark}"]
        clauses += [f"{c} = {self.mark}" for c, v in (("team", team), ("feature", feature)) if v]
        sums = ", ".join(f"SUM({c})" for c in SUMMED)
        return (
            f"SELECT {_dimensions(groups)}, {sums} FROM usage_daily"
            f" WHERE {' AND '.join(clauses)} GROUP BY {_positions(groups)}"
        )

    def spend(
        self,
        query: Query,
        groups: tuple[str, ...],
        start_us: int,
        end_us: int,
        *,
        team: str,
        feature: str,
        experiment: str = "",
    ) -> list[SpendTotal]:
        """Totals over [start_us, end_us): whole days from the rollup, edges from rows.
        The rollup has no experiment or arm: by either, every row of the range is read."""
        if experiment or "arm" in groups:
            start_us, end_us = max(start_us, 0), min(end_us, END_OF_TIME_US)
            edges = [(start_us, end_us)] if start_us < end_us else []
            first_day, end_day = "", ""
        else:
            first_day, end_day, edges = plan_range(start_us, end_us)
        filters = [v for v in (team, feature) if v]
        totals = []
        if first_day:
            rows = query(self.spend_rollup(groups, team, feature), [first_day, end_day, *filters])
            totals += [spend_total(len(groups), r) for r in rows]
        for edge_start, edge_end in edges:
            where, params = self.where(
                edge_start, edge_end, team=team, feature=feature, experiment=experiment
            )
            raw = query(self.spend_raw(groups, where), params)
            totals += [spend_total(len(groups), r) for r in raw]
        return fold(groups, totals)

    def export(
        self, query: Query, start_us: int, end_us: int, *, team: str, experiment: str = ""
    ) -> Iterator[list[UsageRow]]:
        """Pages of rows in time order (keyset pagination), never a month at once."""
        start_us, end_us = max(start_us, 0), min(end_us, END_OF_TIME_US)
        where, params = self.where(start_us, end_us, team=team, experiment=experiment)
        last: tuple[object, ...] = (-1, "", "")
        while page := query(self.export_page(where), [*params, *last]):
            yield [UsageRow.from_values(values) for values in page]
            last = (page[-1][2], page[-1][4], page[-1][0])

    def export_page(self, where: str) -> str:
        m = self.mark
        return (
            f"SELECT {', '.join(COLUMNS)} FROM usage WHERE {where}"
            f" AND (time_us, team, request_id) > ({m}, {m}, {m})"
            f" ORDER BY time_us, team, request_id LIMIT {EXPORT_PAGE}"
        )


def _dimensions(groups: tuple[str, ...]) -> str:
    if not 1 <= len(groups) <= 2 or any(g not in GROUPS for g in groups):
        raise ValueError(f"expected one or two of {GROUPS}, got {groups!r}")
    return ", ".join(_DIMENSION_COLUMN.get(g, g) for g in groups)


def _positions(groups: tuple[str, ...]) -> str:
    return ", ".join(str(i + 1) for i in range(len(groups)))


def spend_total(dimensions: int, values: Sequence[object]) -> SpendTotal:
    """A result row as a SpendTotal; SUMs come back as Decimal from PostgreSQL."""
    keys = tuple(str(v) for v in values[:dimensions])
    return SpendTotal(keys, *(int(n) for n in values[dimensions:]))  # type: ignore[call-overload]


def rollup_increments(inserted: Iterable[UsageRow]) -> list[tuple[object, ...]]:
    """One rollup upsert per key, keys in sorted order: concurrent writers then take
    the rollup's row locks in the same order and cannot deadlock one another."""
    sums: dict[tuple[object, ...], list[int]] = {}
    for row in inserted:
        values = rollup_values(row)
        key, increments = values[:5], values[5:]
        total = sums.setdefault(key, [0] * len(increments))
        for i, value in enumerate(increments):
            total[i] += int(value)  # type: ignore[call-overload]
    return [(*key, *sums[key]) for key in sorted(sums)]


def rollup_values(row: UsageRow) -> tuple[object, ...]:
    """The rollup increment one new row contributes: overhead rows (not answers) add
    their cost and tokens but no call, cached, escalated or out-of-domain call (as
    ROW_SUMS)."""
    answer = int(row.is_answer)
    cached = answer * int(row.cache_outcome in (2, 3))
    return (
        row.day, row.team, row.feature, row.model, row.tier, answer, row.input_tokens,
        row.output_tokens, row.cost_nano_usd, row.counterfactual_cost_nano_usd, cached,
        answer * int(row.escalated), answer * int(row.route_out_of_domain),
    )  # fmt: skip


def plan_range(start_us: int, end_us: int) -> tuple[str, str, list[tuple[int, int]]]:
    """Split [start_us, end_us) into whole UTC days, read from the rollup as
    [first_day, end_day), and the partial edges, read from the rows."""
    start_us, end_us = max(start_us, 0), min(end_us, END_OF_TIME_US)
    if start_us >= end_us:
        return "", "", []
    first = -(-start_us // DAY_US)  # the first midnight at or after start
    last = end_us // DAY_US  # the last midnight at or before end
    if first >= last:
        return "", "", [(start_us, end_us)]
    edges = [(a, b) for a, b in ((start_us, first * DAY_US), (last * DAY_US, end_us)) if a < b]
    return _day(first), _day(last), edges


def _day(days_since_epoch: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=days_since_epoch)).isoformat()


def fold(groups: tuple[str, ...], totals: Iterable[SpendTotal]) -> list[SpendTotal]:
    """Merge partial totals by keys (days into weeks or months when asked), sorted."""
    merged: dict[tuple[str, ...], SpendTotal] = {}
    for total in totals:
        keys = tuple(_bucket(g, k) for g, k in zip(groups, total.keys, strict=True))
        found = merged.get(keys)
        bucketed = SpendTotal(keys, *(getattr(total, f) for f in SUMMED))
        merged[keys] = bucketed if found is None else found.plus(bucketed)
    return [merged[k] for k in sorted(merged)]


def _bucket(group: str, key: str) -> str:
    if group == "month":
        return key[:7]
    if group == "week":
        year, week, _ = date.fromisoformat(key).isocalendar()
        return f"{year}-W{week:02d}"
    return key
