"""The price catalog: exact decimal prices per model with effective dates, turned into
integer nano-USD costs. A price change applies from its date and never rewrites history."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from services.common.config import Config, ConfigError

# Prices from config are Decimals; a self-hosted price is a Fraction (GPU cost over
# throughput need not be a finite decimal). Both convert to Fraction without loss.
Exact = Decimal | Fraction
_NANO_PER_USD = 1_000_000_000
_TOKENS_PER_MTOK = 1_000_000
_SECONDS_PER_HOUR = 3600
_BEGINNING = date(1970, 1, 1)
PRICE_KEYS = {
    "effective_from", "input_usd_per_mtok", "cached_input_usd_per_mtok", "output_usd_per_mtok",
    "batch_discount", "gpu_usd_per_hour", "input_tokens_per_second", "output_tokens_per_second",
}  # fmt: skip


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens, exact, from `effective_from` (UTC) on."""

    effective_from: date
    input: Exact
    cached_input: Exact
    output: Exact
    # Fraction taken off for the provider's batch API (OpenAI: 0.5).
    batch_discount: Exact = Decimal(0)


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Priced:
    cost_nano_usd: int
    # Which price was used: "<catalog version>:<model>@<effective date>".
    version: str


class PriceCatalog:
    """Every model's price history, each price in force from its date until the next."""

    def __init__(self, version: str, prices: dict[str, list[ModelPrice]]) -> None:
        self.version = version
        self._prices = {m: sorted(p, key=lambda x: x.effective_from) for m, p in prices.items()}

    @classmethod
    def from_config(
        cls, models: Config, version: str, unpriced: list[str] | None = None
    ) -> PriceCatalog:
        """Every model's prices. With `unpriced`, a model whose prices are missing or
        wrong is left out and named there instead of failing the whole catalog."""
        prices = {}
        for name in models.names():
            try:
                prices[name] = _history(name, models.section(name))
            except ConfigError:
                if unpriced is None:
                    raise
                unpriced.append(name)
        return cls(version, prices)

    def knows(self, model: str) -> bool:
        return model in self._prices

    def price_at(self, model: str, when: datetime) -> ModelPrice:
        """The price in force at `when`; before the first date, the first price."""
        history = self._prices[model]
        day = when.astimezone(UTC).date()
        index = bisect_right([p.effective_from for p in history], day) - 1
        return history[max(index, 0)]

    def cost(self, model: str, usage: Usage, when: datetime, batch: bool = False) -> Priced:
        """Cost of one call, rounded half-even to a whole nano-USD once, per call.

        Cached input tokens are part of input_tokens and billed at the cached price.
        A call that used no tokens (a cache hit) costs nothing whatever its model.
        """
        if usage.input_tokens == usage.output_tokens == 0:
            return Priced(0, f"{self.version}:none")
        price = self.price_at(model, when)
        uncached = usage.input_tokens - usage.cached_input_tokens
        usd = (
            uncached * Fraction(price.input)
            + usage.cached_input_tokens * Fraction(price.cached_input)
            + usage.output_tokens * Fraction(price.output)
        ) / _TOKENS_PER_MTOK
        if batch:
            usd *= 1 - Fraction(price.batch_discount)
        nano = round(usd * _NANO_PER_USD)  # exact arithmetic, one half-even rounding
        return Priced(nano, f"{self.version}:{model}@{price.effective_from.isoformat()}")


def _history(name: str, model: Config) -> list[ModelPrice]:
    history = [_price(model, previous=None)]
    changes = model.tables("price_changes")
    # Each change inherits from the price before it in time, not in the file.
    for change in sorted(changes, key=lambda c: _date(c, "effective_from", None)):
        history.append(_price(change, previous=history[-1]))
    if len({p.effective_from for p in history}) != len(history):
        raise ConfigError(f"models.{name}.price_changes: two prices share a date")
    return history


def _price(table: Config, previous: ModelPrice | None) -> ModelPrice:
    """One dated price; keys it leaves out keep their previous value."""
    table.reject_unknown(
        PRICE_KEYS
        | (
            {"provider", "context_window", "price_changes", "fallbacks", "tier"}
            if previous is None
            else set()
        )
    )
    effective = _date(table, "effective_from", _BEGINNING if previous is None else None)
    if "gpu_usd_per_hour" in table.names():
        return ModelPrice(effective, *_self_hosted(table), batch_discount=Decimal(0))
    if previous is not None:
        return replace(
            previous,
            effective_from=effective,
            input=_decimal(table, "input_usd_per_mtok", previous.input),
            cached_input=_decimal(table, "cached_input_usd_per_mtok", previous.cached_input),
            output=_decimal(table, "output_usd_per_mtok", previous.output),
            batch_discount=_decimal(table, "batch_discount", previous.batch_discount, upper=1),
        )
    return ModelPrice(
        effective,
        input=_decimal(table, "input_usd_per_mtok"),
        cached_input=_decimal(table, "cached_input_usd_per_mtok"),
        output=_decimal(table, "output_usd_per_mtok"),
        batch_discount=_decimal(table, "batch_discount", Decimal(0), upper=1),
    )


def _self_hosted(table: Config) -> tuple[Fraction, Fraction, Fraction]:
    """(input, cached input, output) USD per Mtok from a GPU's hourly cost and the
    throughput measured on it; prefill (input) runs faster than decoding."""
    per_hour = Fraction(_decimal(table, "gpu_usd_per_hour"))
    output_tps = Fraction(_decimal(table, "output_tokens_per_second"))
    input_tps = Fraction(_decimal(table, "input_tokens_per_second", output_tps * 10))
    if output_tps <= 0 or input_tps <= 0:
        raise ConfigError(f"{table.key_name('output_tokens_per_second')}: must be positive")
    per_input = per_hour / _SECONDS_PER_HOUR / input_tps * _TOKENS_PER_MTOK
    per_output = per_hour / _SECONDS_PER_HOUR / output_tps * _TOKENS_PER_MTOK
    return per_input, per_input, per_output


def _date(table: Config, key: str, default: date | None) -> date:
    if key not in table.names():
        if default is None:
            raise ConfigError(f"{table.key_name(key)}: required (YYYY-MM-DD)")
        return default
    raw = table.get_str(key)
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ConfigError(f"{table.key_name(key)}: expected YYYY-MM-DD, got {raw!r}") from None


def _decimal(
    table: Config, key: str, default: Exact | None = None, upper: int | None = None
) -> Exact:
    if key not in table.names():
        if default is None:
            raise ConfigError(f"{table.key_name(key)}: required")
        return default
    raw = table.get_str(key)
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(
            f"{table.key_name(key)}: expected a decimal string, got {raw!r}"
        ) from None
    if not value.is_finite() or value < 0 or (upper is not None and value > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise ConfigError(
            f"{table.key_name(key)}: must be a non-negative number{bound}, got {raw!r}"
        )
    return value
