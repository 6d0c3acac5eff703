"""What the client commands share: argument types, aligned tables and dollar amounts."""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from typing import TextIO

NANO = Decimal(1_000_000_000)


def write_grid(
    out: TextIO, header: list[str], lines: list[list[str]], fmt: str, numeric: int = 99
) -> None:
    """Aligned columns; in markdown the first `numeric` columns align right."""
    if fmt == "markdown":
        out.write("| " + " | ".join(header) + " |\n")
        out.write("|" + "|".join("---:" if i < numeric else "---" for i in range(len(header))))
        out.write("|\n")
        for line in lines:
            out.write("| " + " | ".join(markdown_cell(x) for x in line) + " |\n")
        return
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    for line in [header, *lines]:
        out.write("  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)) + "\n")


def markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def usd(nano_usd: int | Decimal, exact: bool) -> str:
    """Dollars from nano-USD: every nano-dollar when `exact` (CSV); for people, cents,
    or micro-dollars for amounts under a dollar so that small spend does not read as zero."""
    value = Decimal(nano_usd) / NANO
    if exact:
        return f"{value:.9f}"
    return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.6f}"


def unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def unit_list(text: str) -> tuple[float, ...]:
    values = sorted({unit(t.strip()) for t in text.split(",") if t.strip()})
    if not values:
        raise argparse.ArgumentTypeError("name at least one value")
    return tuple(values)


def positive(text: str) -> int:
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def decimal(text: str) -> Decimal:
    """A finite decimal of at most 10**15 in size."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_finite() or abs(value) > 10**15:
        raise argparse.ArgumentTypeError(f"not a usable number: {text!r}")
    return value


def positive_decimal(text: str) -> Decimal:
    value = decimal(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value
