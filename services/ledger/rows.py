"""What the ledger stores and the SQL both of its stores (SQLite, PostgreSQL) share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, fields
from datetime import date
from typing import Protocol

# Group-by dimensions and the column each reads; week and month fold days. The daily
# rollup has every dimension but the arm.
GROUPS = ("", "team", "feature", "model", "tier", "day", "week", "month", "arm")

SUMMED = (
    "calls", "input_tokens", "output_tokens", "cost_nano_usd",
    "counterfactual_cost_nano_usd", "cached_calls", "escalated_calls", "out_of_domain_calls",
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
# Part of migration 2 and so frozen: it runs before the purpose column exists.
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
# Version 3: what each call was for, and the router's view of the request. Only
# answers (purpose 0, written before purposes existed, or 1) are calls: overhead rows
# (escalated attempts, routing, cache embeddings) add cost and tokens, not calls, and
# are never cached or escalated calls. Every row written before is an answer, so the
# rollup needs no rebuild (which would rewrite it whole on a large ledger).
PURPOSE_AND_ROUTE = """
    ALTER TABLE usage ADD COLUMN purpose INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN route_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN p_simple DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN p_moderate DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN p_complex DOUBLE PRECISION NOT NULL DEFAULT 0;
"""
# Version 4: the experiment and arm a call ran in, and for a cache hit the request
# whose answer it reused. The rollup has no experiment or arm: spend by either reads
# the rows. The index holds experiment rows only, so upgrading a large ledger (every
# old row is in no experiment) writes no index entries, and calls outside experiments
# never pay for one; a query uses it when it repeats the index's condition
# (sql.EXPERIMENT_ROWS).
EXPERIMENTS = """
    ALTER TABLE usage ADD COLUMN experiment TEXT NOT NULL DEFAULT '';
    ALTER TABLE usage ADD COLUMN arm INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN cache_source_request_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX usage_experiment ON usage (experiment, time_us) WHERE experiment <> ''
"""
# Migration 5: whether the router found the request out of its classifier's domain.
OUT_OF_DOMAIN = """
    ALTER TABLE usage ADD COLUMN route_out_of_domain INTEGER NOT NULL DEFAULT 0
"""
# Migration 6: out-of-domain calls in the daily rollup, so a spend report counts them
# without reading the rows; filled in one grouped pass over the rows migration 5 began
# to mark (both engines accept UPDATE ... FROM: SQLite since 3.33).
OUT_OF_DOMAIN_ROLLUP = """
    ALTER TABLE usage_daily ADD COLUMN out_of_domain_calls BIGINT NOT NULL DEFAULT 0;
    UPDATE usage_daily SET out_of_domain_calls = marked.calls
    FROM (
        SELECT day, team, feature, model, tier, COUNT(*) AS calls FROM usage
        WHERE route_out_of_domain <> 0 AND purpose IN (0, 1)
        GROUP BY day, team, feature, model, tier
    ) AS marked
    WHERE usage_daily.day = marked.day AND usage_daily.team = marked.team
        AND usage_daily.feature = marked.feature AND usage_daily.model = marked.model
        AND usage_daily.tier = marked.tier
"""
# Each entry upgrades the schema by one version, in place; append, never edit.
MIGRATIONS: tuple[str, ...] = (
    USAGE_TABLE,
    COUNTERFACTUAL_AND_ROLLUP,
    PURPOSE_AND_ROUTE,
    EXPERIMENTS,
    OUT_OF_DOMAIN,
    OUT_OF_DOMAIN_ROLLUP,
)

# CallPurpose values that are calls (UNSPECIFIED, from older writers, and ANSWER).
ANSWER_PURPOSES = (0, 1)
_ANSWER = f"purpose IN {ANSWER_PURPOSES}"
# Sums over usage rows in SUMMED order, on the rule of migration 3 (which the rollup
# insert in sql.rollup_values follows too).
ROW_SUMS = (
    f"SUM(CASE WHEN {_ANSWER} THEN 1 ELSE 0 END), SUM(input_tokens), SUM(output_tokens),"
    " SUM(cost_nano_usd), SUM(counterfactual_cost_nano_usd),"
    f" SUM(CASE WHEN {_ANSWER} AND cache_outcome IN (2, 3) THEN 1 ELSE 0 END),"
    f" SUM(CASE WHEN {_ANSWER} AND escalated <> 0 THEN 1 ELSE 0 END),"
    f" SUM(CASE WHEN {_ANSWER} AND route_out_of_domain <> 0 THEN 1 ELSE 0 END)"
)


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
    purpose: int = 0  # CallPurpose; 0 (unspecified) counts as an answer
    route_reason: str = ""
    p_simple: float = 0.0
    p_moderate: float = 0.0
    p_complex: float = 0.0
    experiment: str = ""  # empty: in no experiment
    arm: int = 0  # types.v1.Arm
    cache_source_request_id: str = ""
    route_out_of_domain: bool = False

    @property
    def is_answer(self) -> bool:
        """Whether the row is a call, not overhead around one."""
        return self.purpose in ANSWER_PURPOSES

    def values(self) -> tuple[object, ...]:
        """Column values in order, booleans as 0/1 (both engines store INTEGER)."""
        return tuple(int(v) if isinstance(v, bool) else v for v in astuple(self))

    @classmethod
    def from_values(cls, values: Sequence[object]) -> UsageRow:
        row = cls(*values)  # type: ignore[arg-type]
        # Booleans come back as 0/1, and a SQLite column default may read as integer 0.
        exact: dict[str, object] = {
            name: bool(getattr(row, name)) for name in ("escalated", "batch", "route_out_of_domain")
        }
        exact |= {p: float(getattr(row, p)) for p in PROBABILITY_COLUMNS}
        return cls(**{**row.__dict__, **exact})


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
    out_of_domain_calls: int

    def plus(self, other: SpendTotal) -> SpendTotal:
        return SpendTotal(self.keys, *(getattr(self, f) + getattr(other, f) for f in SUMMED))

    @property
    def key(self) -> str:
        return self.keys[0]


COLUMNS = [f.name for f in fields(UsageRow)]
# The router's probability per tier, in tier order (SIMPLE=1, MODERATE=2, COMPLEX=3).
PROBABILITY_COLUMNS = ("p_simple", "p_moderate", "p_complex")
EXPORT_PAGE = 500
DAY_US = 86_400_000_000
# "No upper bound": the last day dates can name.
END_OF_TIME_US = (date(9999, 12, 31) - date(1970, 1, 1)).days * DAY_US


class UsageStore(Protocol):
    """The ledger's storage; methods block, so callers on an event loop use a thread."""

    def record(self, rows: Sequence[UsageRow]) -> list[tuple[int, bool]]:
        """Insert rows; for each, the cost now on file and whether it was a repeat."""

    def spend(
        self,
        groups: tuple[str, ...],
        start_us: int,
        end_us: int,
        *,
        team: str = "",
        feature: str = "",
        experiment: str = "",
    ) -> list[SpendTotal]:
        """Sums per group (one or two dimensions of GROUPS) over [start_us, end_us),
        optionally for one team, feature and experiment."""

    def export(
        self, start_us: int, end_us: int, *, team: str = "", experiment: str = ""
    ) -> Iterator[list[UsageRow]]:
        """Pages of rows in time order, so a month never sits in memory at once."""

    def close(self) -> None: ...
