"""Opening the SQLite files the embedded defaults keep (ledger, outbox, replay store)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_database(path: str | Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A WAL-mode connection shared by threads (callers serialise with their own lock).

    `synchronous` is NORMAL (survives a killed process) or FULL (survives power loss).
    A file that cannot be opened is an OSError naming it, not a bare sqlite3 error.
    """
    try:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
    except (sqlite3.Error, OSError) as exc:
        raise OSError(f"cannot open database {path}: {exc}") from exc
    return db
