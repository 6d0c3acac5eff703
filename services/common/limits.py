"""Limits shared by services: a value one service accepts must fit the next one."""

from __future__ import annotations

from services.common.errors import InvalidArgument

# Characters of a request id: a caller's, a ledger row's, a cache entry's source.
MAX_REQUEST_ID = 128


def check_printable(field: str, value: str) -> None:
    """Ids and labels go to the ledger (PostgreSQL cannot store NUL) and into logs:
    control characters are refused before anything is spent."""
    if not value.isprintable():
        raise InvalidArgument(field, "must not contain control characters")
