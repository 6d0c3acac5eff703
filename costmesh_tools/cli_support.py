"""What the client commands share: argument types, aligned tables and dollar amounts."""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import grpc

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


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-ca (and, where the mesh asks for a client certificate, --tls-cert and
    --tls-key) for a command that calls a mesh over TLS; none: plaintext."""
    group = parser.add_argument_group("TLS (a mesh off loopback speaks it)")
    group.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="the CA the mesh's certificate is from"
    )
    group.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="this client's certificate (mTLS)"
    )
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")


def client_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """The TLS the command was given (None: plaintext); a file that cannot be read is
    an error naming its flag."""
    import grpc  # noqa: PLC0415 - only commands that call a mesh load it

    ca, cert, key = (getattr(args, n, None) for n in ("tls_ca", "tls_cert", "tls_key"))
    if ca is None:
        if cert is not None or key is not None:
            raise SystemExit("costmesh: --tls-cert and --tls-key need --tls-ca")
        return None
    if (cert is None) != (key is None):
        raise SystemExit("costmesh: --tls-cert and --tls-key go together")

    def read(flag: str, path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SystemExit(f"costmesh: {flag}: cannot read {path}: {exc.strerror}") from exc

    return grpc.ssl_channel_credentials(
        read("--tls-ca", ca), read("--tls-key", key), read("--tls-cert", cert)
    )


def open_channel(address: str, args: argparse.Namespace) -> grpc.Channel:
    import grpc  # noqa: PLC0415

    credentials = client_credentials(args)
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def open_aio_channel(address: str, args: argparse.Namespace) -> grpc.aio.Channel:
    import grpc  # noqa: PLC0415

    credentials = client_credentials(args)
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials)
