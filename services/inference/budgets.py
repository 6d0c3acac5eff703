"""Team spend limits, enforced at admission so that concurrent calls cannot slip past
one together.

Spend so far comes from the ledger (refreshed every few seconds). Each admitted call
reserves its worst case, the prompt plus max_tokens at its model's prices, until it
settles. Its rows' priced costs then count as "on the way" until the ledger
acknowledges them (they may sit in the outbox through a ledger outage), and as
"acknowledged since the last read" until the ledger's next figure includes them. A
call is admitted only if spend + everything reserved or on the way + its own worst
case stays within every limit of its team. The reservations
live in this inference process: replicas each hold their own, so N replicas can each
admit up to the remaining budget at once (see the README).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.common.config import Config, ConfigError
from services.common.outages import OutageLog
from services.common.pricing import PriceCatalog, Usage

log = logging.getLogger(__name__)
NANO_PER_USD = 10**9
# How old the ledger's figure may be before an admission asks again.
REFRESH_SECONDS = 5.0
# How long an admission may wait for the ledger's figure before using the last one.
READ_TIMEOUT_SECONDS = 1.0
# Spend of a team since a UTC instant, in nano-USD.
SpendSince = Callable[[str, datetime], Awaitable[int]]


class OverBudgetError(Exception):
    """The call's worst case does not fit the team's limit."""

    def __init__(self, team: str, period: str, limit_nano: int, committed_nano: int) -> None:
        super().__init__(
            f"team {team!r} is over its {period} budget: ${committed_nano / NANO_PER_USD:.6f} "
            f"spent or reserved of ${limit_nano / NANO_PER_USD:.6f}"
        )
        self.period = period


@dataclass(frozen=True)
class TeamLimits:
    daily_nano: int | None
    monthly_nano: int | None

    @classmethod
    def from_config(cls, teams: Config) -> dict[str, TeamLimits]:
        limits = {}
        for team in teams.names():
            table = teams.section(team)
            limits[team] = cls(_usd(table, "daily_usd"), _usd(table, "monthly_usd"))
        return limits


def _usd(table: Config, key: str) -> int | None:
    text = table.get_str(key, "")
    if not text:
        return None
    try:
        value = Decimal(text)
    except ArithmeticError:
        raise ConfigError(
            f'{table.key_name(key)}: expected a decimal string such as "50.00"'
        ) from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{table.key_name(key)}: must be a non-negative amount")
    return int(value * NANO_PER_USD)


@dataclass
class Reservation:
    """A call's worst-case cost, held until it settles."""

    team: str
    nano: int
    settled: bool = False


@dataclass
class _Ledger:
    """One team's view: what the ledger said, and what happened here since."""

    daily: int = 0
    monthly: int = 0
    read_at: float = -1e9
    day: str = ""
    reserved: int = 0
    # Priced rows not yet acknowledged by the ledger, by ledger request id.
    on_the_way: dict[str, int] = field(default_factory=dict)
    on_the_way_total: int = 0
    acknowledged_since_read: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_LIVE: weakref.WeakSet[TeamBudgets] = weakref.WeakSet()


def _budget_use(options: CallbackOptions) -> Iterable[Observation]:
    for budgets in list(_LIVE):
        for team, period, share in budgets.used():
            yield Observation(share, {"costmesh.team": team, "costmesh.budget.period": period})


metrics.get_meter("costmesh.inference").create_observable_gauge(
    "costmesh.budget.used",
    callbacks=[_budget_use],
    unit="1",
    description="Share of each limited team's daily and monthly budget spent or committed",
)


class TeamBudgets:
    def __init__(
        self,
        limits: dict[str, TeamLimits],
        prices: PriceCatalog,
        spend_since: SpendSince,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._prices = prices
        self._spend_since = spend_since
        self._clock = clock
        self._teams: dict[str, _Ledger] = {}
        _LIVE.add(self)
        self._outage = OutageLog(log, "ledger spend reads for budgets (last known spend used)")

    def close(self) -> None:
        """No longer reported in the metrics (the service stopped)."""
        _LIVE.discard(self)

    def used(self) -> Iterator[tuple[str, str, float]]:
        """(team, period, share of the limit spent or committed) for every limited team
        that has called since this process started."""
        today = datetime.now(UTC).date().isoformat()
        for team, state in list(self._teams.items()):
            limits = self._limits.get(team)
            if limits is None:
                continue
            local = state.reserved + state.on_the_way_total + state.acknowledged_since_read
            for period, limit, spent, current in (
                ("daily", limits.daily_nano, state.daily, state.day == today),
                ("monthly", limits.monthly_nano, state.monthly, state.day[:7] == today[:7]),
            ):
                # A figure read in an earlier day (or month) says nothing of this one:
                # the team is reported again once it calls (and is read) anew.
                if limit and current:
                    yield team, period, (spent + local) / limit

    def limited(self, team: str) -> bool:
        return team in self._limits

    def worst_case(self, model: str, prompt_tokens: int, max_tokens: int) -> int:
        """The most the call can cost: its prompt and max_tokens at today's prices."""
        usage = Usage(prompt_tokens, 0, max_tokens)
        return self._prices.cost(model, usage, datetime.now(UTC)).cost_nano_usd

    async def admit(self, team: str, nano: int) -> Reservation | None:
        """Reserve `nano` for the team, or raise OverBudgetError; None without limits."""
        limits = self._limits.get(team)
        if limits is None:
            return None
        state = self._teams.setdefault(team, _Ledger())
        async with state.lock:
            await self._refresh(team, state)
            local = state.reserved + state.on_the_way_total + state.acknowledged_since_read
            for period, limit, spent in (
                ("daily", limits.daily_nano, state.daily),
                ("monthly", limits.monthly_nano, state.monthly),
            ):
                if limit is not None and spent + local + nano > limit:
                    raise OverBudgetError(team, period, limit, spent + local)
            state.reserved += nano
        return Reservation(team, nano)

    def settle(self, reservation: Reservation | None) -> None:
        """Release the worst case: by now the call's rows are counted on the way."""
        if reservation is None or reservation.settled:
            return
        reservation.settled = True
        self._teams[reservation.team].reserved -= reservation.nano

    def on_the_way(self, team: str, record_id: str, nano: int) -> None:
        """A priced row was handed to the outbox: it counts until the ledger has it."""
        state = self._teams.get(team)
        if state is None or not nano or record_id in state.on_the_way:
            return
        state.on_the_way[record_id] = nano
        state.on_the_way_total += nano

    def acknowledged(self, team: str, record_id: str, nano: int) -> None:
        """The ledger has the row (priced `nano`): it counts until the next read."""
        state = self._teams.get(team)
        if state is None:
            return
        state.on_the_way_total -= state.on_the_way.pop(record_id, 0)
        state.acknowledged_since_read += nano

    async def _refresh(self, team: str, state: _Ledger) -> None:
        now = datetime.now(UTC)
        day = now.date().isoformat()
        if self._clock() - state.read_at < REFRESH_SECONDS and state.day == day:
            return
        acknowledged_before = state.acknowledged_since_read
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                daily, monthly = await asyncio.gather(
                    self._spend_since(team, day_start),
                    self._spend_since(team, day_start.replace(day=1)),
                )
        except Exception as exc:  # the ledger is down: the last figure and local tallies
            self._outage.failed(type(exc).__name__)
            # Not asked again before the next refresh: one slow read per team per
            # interval, not one per call.
            state.read_at, state.day = self._clock(), day
            return
        self._outage.succeeded()
        state.daily, state.monthly, state.read_at, state.day = daily, monthly, self._clock(), day
        # What the ledger had acknowledged before the read is in its figure now
        # (possibly also what it acknowledged during the read: counted twice until the
        # next read, on the safe side). Rows still on the way keep counting.
        state.acknowledged_since_read -= acknowledged_before
