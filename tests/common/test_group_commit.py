"""Concurrent writes to one SQLite file share a commit; each writer hears its outcome."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.common.sqlite import GroupCommit, open_database


class Rows:
    def __init__(self, path: Path) -> None:
        self.db = open_database(path)
        self.db.execute("CREATE TABLE t (v INTEGER PRIMARY KEY)")
        self.commits = 0

    def write_all(self, values: Sequence[int]) -> None:
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in values])
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.commits += 1


async def test_concurrent_writers_share_commits_and_all_rows_land(tmp_path: Path) -> None:
    rows = Rows(tmp_path / "t.sqlite3")
    group = GroupCommit(rows.write_all)

    await asyncio.gather(*(group.write(v) for v in range(50)))
    await group.write(50)  # a lone writer afterwards still gets its own commit

    (count,) = rows.db.execute("SELECT COUNT(*) FROM t").fetchone()
    assert count == 51
    assert rows.commits < 51


async def test_a_failed_commit_reaches_every_writer_in_it(tmp_path: Path) -> None:
    rows = Rows(tmp_path / "t.sqlite3")
    group = GroupCommit(rows.write_all)
    await group.write(1)

    outcomes = await asyncio.gather(group.write(2), group.write(1), return_exceptions=True)

    assert all(isinstance(o, sqlite3.IntegrityError) for o in outcomes)
    (count,) = rows.db.execute("SELECT COUNT(*) FROM t").fetchone()
    assert count == 1  # the transaction was rolled back whole
    with pytest.raises(sqlite3.IntegrityError):
        await group.write(1)
    await group.write(3)  # the writer goes on after a failure
