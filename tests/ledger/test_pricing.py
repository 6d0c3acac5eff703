"""Prices are exact decimals; costs are whole nano-USD, rounded once per call."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.common.config import ConfigError, load_config
from services.ledger.pricing import ModelPrice, PriceCatalog, Usage


def test_seed_model_prices_give_exact_integer_costs() -> None:
    catalog = PriceCatalog.from_config(load_config(env={}).section("models"), "v")

    mini = catalog.cost_nano_usd("gpt-4o-mini", Usage(1000, 0, 500))
    big = catalog.cost_nano_usd("gpt-4o", Usage(1_000_000, 400_000, 1_000_000))

    assert mini == 1000 * 150 + 500 * 600
    assert big == 600_000 * 2500 + 400_000 * 1250 + 1_000_000 * 10_000


def test_fractional_nano_costs_round_half_even_once_per_call() -> None:
    catalog = PriceCatalog("v", {"m": ModelPrice(Decimal("0.0375"), Decimal(0), Decimal(0))})

    assert catalog.cost_nano_usd("m", Usage(1, 0, 0)) == 38  # 37.5 -> 38 (even)
    assert catalog.cost_nano_usd("m", Usage(3, 0, 0)) == 112  # 112.5 -> 112 (even)


def test_a_cache_hit_costs_nothing_even_for_an_unpriced_model() -> None:
    assert PriceCatalog("v", {}).cost_nano_usd("anything", Usage(0, 0, 0)) == 0


@pytest.mark.parametrize(
    ("value", "message"), [("1.0e", "decimal"), ("-1", "non-negative"), ("NaN", "non-negative")]
)
def test_bad_prices_fail_at_start_naming_the_key(tmp_path: Path, value: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[models."gpt-4o"]\ninput_usd_per_mtok = "{value}"\n')
    with pytest.raises(ConfigError, match=rf"models\.gpt-4o\.input_usd_per_mtok: .*{message}"):
        PriceCatalog.from_config(load_config(config, env={}).section("models"), "v")
