"""What the ledger stores and the SQL both of its stores (SQLite, PostgreSQL) share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, fields
from typing import Protocol

# Group-by dimensions: the SQL expression for each.
GROUPS = {"team": "team", "feature": "feature", "model": "model", "day": "day", "": "''"}

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
# Each entry upgrades the schema by one version, in place; append, never edit.
MIGRATIONS: tuple[str, ...] = (USAGE_TABLE,)


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

    def values(self) -> tuple[object, ...]:
        """Column values in order, booleans as 0/1 (both engines store INTEGER)."""
        return tuple(int(v) if isinstance(v, bool) else v for v in astuple(self))

    @classmethod
    def from_values(cls, values: Sequence[object]) -> UsageRow:
        row = cls(*values)  # type: ignore[arg-type]
        return cls(**{**row.__dict__, "escalated": bool(row.escalated), "batch": bool(row.batch)})


@dataclass(frozen=True)
class SpendTotal:
    key: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost_nano_usd: int
    cached_calls: int


COLUMNS = [f.name for f in fields(UsageRow)]
EXPORT_PAGE = 500


class UsageStore(Protocol):
    """The ledger's storage; methods block, so callers on an event loop use a thread."""

    def record(self, rows: Sequence[UsageRow]) -> list[tuple[int, bool]]:
        """Insert rows; for each, the cost now on file and whether it was a repeat."""

    def spend(
        self, group: str, start_us: int, end_us: int, team: str = "", feature: str = ""
    ) -> list[SpendTotal]:
        """Sums per group over [start_us, end_us), optionally for one team and feature."""

    def export(self, start_us: int, end_us: int, team: str = "") -> Iterator[list[UsageRow]]:
        """Pages of rows in time order, so a month never sits in memory at once."""

    def close(self) -> None: ...


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

    def spend(self, group: str, where: str) -> str:
        return (
            f"SELECT {GROUPS[group]}, COUNT(*), SUM(input_tokens), SUM(output_tokens),"
            " SUM(cost_nano_usd), SUM(CASE WHEN cache_outcome IN (2, 3) THEN 1 ELSE 0 END)"
            f" FROM usage WHERE {where} GROUP BY 1 ORDER BY 1"
        )

    def export_page(self, where: str) -> str:
        m = self.mark
        return (
            f"SELECT {', '.join(COLUMNS)} FROM usage WHERE {where}"
            f" AND (time_us, team, request_id) > ({m}, {m}, {m})"
            f" ORDER BY time_us, team, request_id LIMIT {EXPORT_PAGE}"
        )


def spend_total(values: Sequence[object]) -> SpendTotal:
    """A result row as a SpendTotal; SUMs come back as Decimal from PostgreSQL."""
    key, *numbers = values
    calls, input_tokens, output_tokens, cost, cached = (int(n) for n in numbers)  # type: ignore[call-overload]
    return SpendTotal(str(key), calls, input_tokens, output_tokens, cost, cached)
