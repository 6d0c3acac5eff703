"""Chooses the ledger's store from `ledger.database`: a SQLite path or a PostgreSQL URL."""

from __future__ import annotations

from pathlib import Path

from services.ledger.rows import UsageStore


def open_store(database: str, data_dir: Path) -> UsageStore:
    """`postgresql://…` opens PostgreSQL; anything else is a SQLite file (relative
    paths under the data folder)."""
    if database.startswith(("postgresql://", "postgres://")):
        from services.ledger.postgres_store import PostgresUsageStore  # noqa: PLC0415 - psycopg loads only when used

        return PostgresUsageStore(database)
    from services.ledger.sqlite_store import SqliteUsageStore  # noqa: PLC0415

    path = Path(database)
    if database != ":memory:" and not path.is_absolute():
        path = data_dir / path
    return SqliteUsageStore(path)
