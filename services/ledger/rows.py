"""What the ledger stores and the SQL both of its stores (SQLite, PostgreSQL) share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass, fields
from datetime import date, timedelta
from typing import Protocol

# Group-by dimensions and the column each reads; week and month fold days.
GROUPS = ("", "team", "feature", "model", "tier", "day", "week", "month")
_DIMENSION_COLUMN = {"": "''", "week": "day", "month": "day"}

_SUMMED = (
    "calls", "input_tokens", "output_tokens", "cost_nano_usd",
    "counterfactual_cost_nano_usd", "cached_calls", "escalated_calls",
)  # fmt: skip

# The usage table in the SQL both engines accept. Money and token counts are BIGINT:
# integer nano-USD overflows 32 bits at $2.15.
USAGE_TABLE = """
    CREATE TABLE usage (
        request_id TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        time_us BIGINT NOT NULL,
        day TEXT NOT NULL,
        team TEXT NOT NULL,
        feature TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        tier INTEGER NOT NULL,
        input_tokens BIGINT NOT NULL,
        cached_input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cache_outcome INTEGER NOT NULL,
        escalated INTEGER NOT NULL,
        batch INTEGER NOT NULL,
        latency_ms BIGINT NOT NULL,
        status INTEGER NOT NULL,
        cost_nano_usd BIGINT NOT NULL,
        price_version TEXT NOT NULL,
        client_request_id TEXT NOT NULL,
        PRIMARY KEY (team, request_id)
    );
    CREATE INDEX usage_time ON usage (time_us)
"""
# Fills the daily rollup from the rows (the migration runs it once, on old data).
ROLLUP_REBUILD = """
    INSERT INTO usage_daily
        SELECT day, team, feature, model, tier, COUNT(*), SUM(input_tokens),
            SUM(output_tokens), SUM(cost_nano_usd), SUM(counterfactual_cost_nano_usd),
            SUM(CASE WHEN cache_outcome IN (2, 3) THEN 1 ELSE 0 END), SUM(escalated)
        FROM usage GROUP BY day, team, feature, model, tier
"""
# Version 2: the counterfactual cost (what the call would have cost on the feature's
# baseline model without cache or routing), and a daily rollup kept in step with
# every insert, so a month of spend reads a few thousand rows, not millions.
COUNTERFACTUAL_AND_ROLLUP = f"""
    ALTER TABLE usage ADD COLUMN baseline_model TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN counterfactual_cost_nano_usd BIGINT NOT NULL DEFAULT 0;
    UPDATE usage SET counterfactual_cost_nano_usd = cost_nano_usd;
    CREATE TABLE usage_daily (
        day TEXT NOT NULL,
        team TEXT NOT NULL,
        feature TEXT NOT NULL,
        model TEXT NOT NULL,
        tier INTEGER NOT NULL,
        calls BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_nano_usd BIGINT NOT NULL,
        counterfactual_cost_nano_usd BIGINT NOT NULL,
        cached_calls BIGINT NOT NULL,
        escalated_calls BIGINT NOT NULL,
        PRIMARY KEY (day, team, feature, model, tier)
    );
    {ROLLUP_REBUILD}
"""
# Each entry upgrades the schema by one version, in place; append, never edit.
MIGRATIONS: tuple[str, ...] = (USAGE_TABLE, COUNTERFACTUAL_AND_ROLLUP)


@dataclass(frozen=True)
class UsageRow:
    """One call as stored; costs are integer nano-USD."""

    request_id: str
    trace_id: str
    time_us: int
    day: str
    team: str
    feature: str
    model: str
    provider: str
    tier: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cache_outcome: int
    escalated: bool
    batch: bool
    latency_ms: int
    status: int
    cost_nano_usd: int
    price_version: str
    client_request_id: str = ""
    baseline_model: str = ""
    counterfactual_cost_nano_usd: int = 0

    def values(self) -> tuple[object, ...]:
        """Column values in order, booleans as 0/1 (both engines store INTEGER)."""
        return tuple(int(v) if isinstance(v, bool) else v for v in astuple(self))

    @classmethod
    def from_values(cls, values: Sequence[object]) -> UsageRow:
        row = cls(*values)  # type: ignore[arg-type]
        return cls(**{**row.__dict__, "escalated": bool(row.escalated), "batch": bool(row.batch)})


@dataclass(frozen=True)
class SpendTotal:
    """Sums for one group; `keys` holds its value for each grouping dimension."""

    keys: tuple[str, ...]
    calls: int
    input_tokens: int
    output_tokens: int
    cost_nano_usd: int
    counterfactual_cost_nano_usd: int
    cached_calls: int
    escalated_calls: int

    def plus(self, other: SpendTotal) -> SpendTotal:
        return SpendTotal(self.keys, *(getattr(self, f) + getattr(other, f) for f in _SUMMED))

    @property
    def key(self) -> str:
        return self.keys[0]


COLUMNS = [f.name for f in fields(UsageRow)]
EXPORT_PAGE = 500


class UsageStore(Protocol):
    """The ledger's storage; methods block, so callers on an event loop use a thread."""

    def record(self, rows: Sequence[UsageRow]) -> list[tuple[int, bool]]:
        """Insert rows; for each, the cost now on file and whether it was a repeat."""

    def spend(
        self,
        groups: tuple[str, ...],
        start_us: int,
        end_us: int,
        team: str = "",
        feature: str = "",
    ) -> list[SpendTotal]:
        """Sums per group (one or two dimensions of GROUPS) over [start_us, end_us),
        optionally for one team and feature."""

    def export(self, start_us: int, end_us: int, team: str = "") -> Iterator[list[UsageRow]]:
        """Pages of rows in time order, so a month never sits in memory at once."""

    def close(self) -> None: ...


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
        self, start_us: int, end_us: int, team: str, feature: str
    ) -> tuple[str, list[object]]:
        clauses = [f"time_us >= {self.mark}", f"time_us < {self.mark}"]
        params: list[object] = [start_us, end_us]
        for column, value in (("team", team), ("feature", feature)):
            if value:
                clauses.append(f"{column} = {self.mark}")
                params.append(value)
        return " AND ".join(clauses), params

    def rollup_upsert(self) -> str:
        m = self.mark
        keys = "day, team, feature, model, tier"
        updates = ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in _SUMMED)
        return (
            f"INSERT INTO usage_daily ({keys}, {', '.join(_SUMMED)})"
            f" VALUES ({', '.join([m] * 12)})"
            f" ON CONFLICT ({keys}) DO UPDATE SET {updates}"
        )

    def spend_raw(self, groups: tuple[str, ...], where: str) -> str:
        """Sums over individual rows, for the partial days at a range's edges."""
        return (
            f"SELECT {_dimensions(groups)}, COUNT(*), SUM(input_tokens), SUM(output_tokens),"
            " SUM(cost_nano_usd), SUM(counterfactual_cost_nano_usd),"
            " SUM(CASE WHEN cache_outcome IN (2, 3) THEN 1 ELSE 0 END), SUM(escalated)"
            f" FROM usage WHERE {where} GROUP BY {_positions(groups)}"
        )

    def spend_rollup(self, groups: tuple[str, ...], team: str, feature: str) -> str:
        """Sums over whole days [first, end) from the rollup."""
        clauses = [f"day >= {self.mark}", f"day < {self.mark}"]
        clauses += [f"{c} = {self.mark}" for c, v in (("team", team), ("feature", feature)) if v]
        sums = ", ".join(f"SUM({c})" for c in _SUMMED)
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
    ) -> list[SpendTotal]:
        """Totals over [start_us, end_us): whole days from the rollup, edges from rows."""
        first_day, end_day, edges = plan_range(start_us, end_us)
        filters = [v for v in (team, feature) if v]
        totals = []
        if first_day:
            rows = query(self.spend_rollup(groups, team, feature), [first_day, end_day, *filters])
            totals += [spend_total(len(groups), r) for r in rows]
        for edge_start, edge_end in edges:
            where, params = self.where(edge_start, edge_end, team, feature)
            raw = query(self.spend_raw(groups, where), params)
            totals += [spend_total(len(groups), r) for r in raw]
        return fold(groups, totals)

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
    """The rollup increment one new row contributes."""
    cached = int(row.cache_outcome in (2, 3))
    return (
        row.day, row.team, row.feature, row.model, row.tier, 1, row.input_tokens,
        row.output_tokens, row.cost_nano_usd, row.counterfactual_cost_nano_usd, cached,
        int(row.escalated),
    )  # fmt: skip


DAY_US = 86_400_000_000
# "No upper bound": the last day dates can name.
END_OF_TIME_US = (date(9999, 12, 31) - date(1970, 1, 1)).days * DAY_US


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
        bucketed = SpendTotal(keys, *(getattr(total, f) for f in _SUMMED))
        merged[keys] = bucketed if found is None else found.plus(bucketed)
    return [merged[k] for k in sorted(merged)]


def _bucket(group: str, key: str) -> str:
    if group == "month":
        return key[:7]
    if group == "week":
        year, week, _ = date.fromisoformat(key).isocalendar()
        return f"{year}-W{week:02d}"
    return key
