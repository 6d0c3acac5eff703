"""The price catalog: exact decimal prices per model, turned into integer nano-USD costs."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from services.common.config import Config, ConfigError

_NANO_PER_USD = Decimal(1_000_000_000)
_TOKENS_PER_MTOK = Decimal(1_000_000)


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens, exact."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int


class PriceCatalog:
    """Prices every call with one named catalog version."""

    def __init__(self, version: str, prices: dict[str, ModelPrice]) -> None:
        self.version = version
        self._prices = prices

    @classmethod
    def from_config(cls, models: Config, version: str) -> PriceCatalog:
        prices = {}
        for name in models.names():
            model = models.section(name)
            prices[name] = ModelPrice(
                input=_price(model, "input_usd_per_mtok"),
                cached_input=_price(model, "cached_input_usd_per_mtok"),
                output=_price(model, "output_usd_per_mtok"),
            )
        return cls(version, prices)

    def knows(self, model: str) -> bool:
        return model in self._prices

    def cost_nano_usd(self, model: str, usage: Usage) -> int:
        """Cost of one call, rounded half-even to a whole nano-USD once, per call.

        Cached input tokens are part of input_tokens and billed at the cached price.
        A call that used no tokens (a cache hit) costs nothing whatever its model.
        """
        if usage.input_tokens == usage.output_tokens == 0:
            return 0
        price = self._prices[model]
        uncached = usage.input_tokens - usage.cached_input_tokens
        usd = (
            uncached * price.input
            + usage.cached_input_tokens * price.cached_input
            + usage.output_tokens * price.output
        ) / _TOKENS_PER_MTOK
        return int((usd * _NANO_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def _price(model: Config, key: str) -> Decimal:
    raw = model.get_str(key)
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(
            f"{model.key_name(key)}: expected a decimal string, got {raw!r}"
        ) from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{model.key_name(key)}: must be a non-negative number, got {raw!r}")
    return value
