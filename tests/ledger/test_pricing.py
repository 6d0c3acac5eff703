"""Prices are exact decimals with effective dates; costs are whole nano-USD, rounded once."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.config import ConfigError, load_config
from services.common.pricing import ModelPrice, PriceCatalog, Usage

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def catalog_from(toml: str, tmp_path: Path) -> PriceCatalog:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    return PriceCatalog.from_config(load_config(path, env={}).section("models"), "v1")


def test_seed_model_prices_give_exact_integer_costs() -> None:
    catalog = PriceCatalog.from_config(load_config(env={}).section("models"), "v")

    mini = catalog.cost("gpt-4o-mini", Usage(1000, 0, 500), NOW)
    big = catalog.cost("gpt-4o", Usage(1_000_000, 400_000, 1_000_000), NOW)

    assert mini.cost_nano_usd == 1000 * 150 + 500 * 600
    assert big.cost_nano_usd == 600_000 * 2500 + 400_000 * 1250 + 1_000_000 * 10_000
    assert mini.version == "v:gpt-4o-mini@1970-01-01"


def test_fractional_nano_costs_round_half_even_once_per_call() -> None:
    price = ModelPrice(date(1970, 1, 1), Decimal("0.0375"), Decimal(0), Decimal(0))
    catalog = PriceCatalog("v", {"m": [price]})

    assert catalog.cost("m", Usage(1, 0, 0), NOW).cost_nano_usd == 38  # 37.5 -> 38 (even)
    assert catalog.cost("m", Usage(3, 0, 0), NOW).cost_nano_usd == 112  # 112.5 -> 112 (even)


def test_a_cache_hit_costs_nothing_even_for_an_unpriced_model() -> None:
    assert PriceCatalog("v", {}).cost("anything", Usage(0, 0, 0), NOW).cost_nano_usd == 0


def test_a_price_change_applies_from_its_date_and_never_rewrites_history(tmp_path: Path) -> None:
    catalog = catalog_from(
        '[models."gpt-4o"]\n'
        '[[models."gpt-4o".price_changes]]\neffective_from = "2026-12-01"\n'
        'input_usd_per_mtok = "2.00"\n',
        tmp_path,
    )
    usage = Usage(1_000_000, 0, 0)

    before = catalog.cost("gpt-4o", usage, datetime(2026, 11, 30, 23, 59, tzinfo=UTC))
    after = catalog.cost("gpt-4o", usage, datetime(2026, 12, 1, tzinfo=UTC))
    output = catalog.cost("gpt-4o", Usage(0, 0, 1_000_000), datetime(2026, 12, 2, tzinfo=UTC))

    assert before.cost_nano_usd == 2_500_000_000
    assert after.cost_nano_usd == 2_000_000_000
    assert output.cost_nano_usd == 10_000_000_000, "keys a change leaves out keep their price"
    assert (before.version, after.version) == ("v1:gpt-4o@1970-01-01", "v1:gpt-4o@2026-12-01")


def test_batch_calls_get_the_batch_discount() -> None:
    catalog = PriceCatalog.from_config(load_config(env={}).section("models"), "v")
    usage = Usage(1000, 0, 1000)

    online = catalog.cost("gpt-4o", usage, NOW).cost_nano_usd
    batch = catalog.cost("gpt-4o", usage, NOW, batch=True).cost_nano_usd

    assert batch * 2 == online


def test_self_hosted_models_are_priced_from_gpu_hours_and_throughput(tmp_path: Path) -> None:
    catalog = catalog_from(
        '[models."llama-70b"]\nprovider = "openai"\ncontext_window = 8000\n'
        'gpu_usd_per_hour = "2.50"\noutput_tokens_per_second = "1000"\n'
        'input_tokens_per_second = "10000"\n',
        tmp_path,
    )

    # $2.50 an hour buys 3.6M output tokens: $0.6944.. per million, 694.44.. nano a token.
    cost = catalog.cost("llama-70b", Usage(0, 0, 3_600_000), NOW).cost_nano_usd
    prefill = catalog.cost("llama-70b", Usage(36_000_000, 0, 0), NOW).cost_nano_usd

    assert cost == 2_500_000_000
    assert prefill == 2_500_000_000


@pytest.mark.parametrize(
    ("value", "message"),
    [("1.0e", "decimal"), ("-1", "non-negative"), ("NaN", "non-negative")],
)
def test_bad_prices_fail_at_start_naming_the_key(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"models\.gpt-4o\.input_usd_per_mtok: .*{message}"):
        catalog_from(f'[models."gpt-4o"]\ninput_usd_per_mtok = "{value}"\n', tmp_path)


def test_a_price_change_needs_its_date(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"price_changes\[0\]\.effective_from: required"):
        catalog_from('[[models."gpt-4o".price_changes]]\ninput_usd_per_mtok = "1"\n', tmp_path)


prices = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False, allow_infinity=False)
tokens = st.integers(min_value=0, max_value=10_000_000)


@given(
    input_price=prices,
    cached_price=prices,
    output_price=prices,
    discount=st.decimals(min_value=0, max_value=1, places=2),
    input_tokens=tokens,
    cached_share=st.fractions(min_value=0, max_value=1),
    output_tokens=tokens,
    batch=st.booleans(),
)
def test_costs_agree_to_the_nano_dollar_with_an_independent_calculation(  # noqa: PLR0917
    input_price: Decimal,
    cached_price: Decimal,
    output_price: Decimal,
    discount: Decimal,
    input_tokens: int,
    cached_share: object,
    output_tokens: int,
    batch: bool,
) -> None:
    cached = int(input_tokens * cached_share)  # type: ignore[operator]
    price = ModelPrice(date(1970, 1, 1), input_price, cached_price, output_price, discount)
    catalog = PriceCatalog("v", {"m": [price]})

    got = catalog.cost("m", Usage(input_tokens, cached, output_tokens), NOW, batch=batch)

    # Independently: per-token prices in nano-USD, everything as exact fractions.
    nano = (
        (input_tokens - cached) * input_price * 1000
        + cached * cached_price * 1000
        + output_tokens * output_price * 1000
    )
    if batch:
        nano *= 1 - discount
    expected = int(nano.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    if input_tokens == output_tokens == 0:
        expected = 0
    assert got.cost_nano_usd == expected


def test_self_hosted_costs_are_exact_even_when_the_price_is_no_finite_decimal(
    tmp_path: Path,
) -> None:
    catalog = catalog_from(
        '[models."local"]\nprovider = "openai"\ncontext_window = 8000\n'
        'gpu_usd_per_hour = "2.50"\noutput_tokens_per_second = "64"\n',
        tmp_path,
    )

    # 54 tokens at $2.50 / (3600 s x 64 tokens/s): 585,937.5 nano-USD, even -> 585,938.
    assert catalog.cost("local", Usage(0, 0, 54), NOW).cost_nano_usd == 585_938


def test_price_changes_listed_out_of_date_order_inherit_by_date(tmp_path: Path) -> None:
    catalog = catalog_from(
        '[[models."gpt-4o".price_changes]]\neffective_from = "2027-01-01"\n'
        'output_usd_per_mtok = "8.00"\n'
        '[[models."gpt-4o".price_changes]]\neffective_from = "2026-12-01"\n'
        'input_usd_per_mtok = "2.00"\n',
        tmp_path,
    )
    december = datetime(2026, 12, 15, tzinfo=UTC)
    january = datetime(2027, 1, 15, tzinfo=UTC)

    assert catalog.cost("gpt-4o", Usage(0, 0, 1_000_000), december).cost_nano_usd == 10 * 10**9
    assert catalog.cost("gpt-4o", Usage(1_000_000, 0, 0), january).cost_nano_usd == 2 * 10**9
    assert catalog.cost("gpt-4o", Usage(0, 0, 1_000_000), january).cost_nano_usd == 8 * 10**9
