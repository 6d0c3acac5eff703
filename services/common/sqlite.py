"""Opening the SQLite files the embedded defaults keep (ledger, outbox, replay store),
and committing concurrent writes to them together."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


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


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT; anything that fails, COMMIT included, is rolled
    back, so the connection never stays inside a transaction that later writes would
    trip over ("cannot start a transaction within a transaction")."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # nothing open: already rolled back
            db.execute("ROLLBACK")
        raise


class GroupCommit(Generic[T]):
    """Writes from concurrent callers in one transaction (group commit): each caller
    returns once the commit that holds its write is done, or gets its error. A lone
    caller costs what a write of its own would; under load, one commit serves many.

    `write_all` may return, per item, the error that item alone failed with (None for
    the items written): then only those callers hear of a failure."""

    def __init__(self, write_all: Callable[[list[T]], Sequence[Exception | None] | None]) -> None:
        self._write_all = write_all  # runs in a worker thread, as one transaction
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, item: T) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                failed = await asyncio.to_thread(self._write_all, [item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in [*batch, *self._waiting]:
                    future.cancel()  # nobody is left to write them: their callers must hear
                self._waiting = []
                raise
            except Exception as exc:
                _settle([future for _, future in batch], [exc] * len(batch))
            else:
                _settle([future for _, future in batch], failed or [None] * len(batch))


def _settle(futures: list[asyncio.Future[None]], errors: Sequence[Exception | None]) -> None:
    """Each caller hears its own outcome; one that cancelled meanwhile hears nothing."""
    for future, error in zip(futures, errors, strict=True):
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
