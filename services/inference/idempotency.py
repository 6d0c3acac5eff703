"""Caller-chosen request ids, remembered per team: a repeat gets the first response.

This is AIP-155 for Complete: retrying with the same request_id never calls the
provider or bills twice, and reusing an id for a different request is refused.
Responses are kept on local disk for a day, so a retry after a restart is safe too.
A response is remembered in the transaction that writes its usage rows to the outbox
(the same file), so a kill at any point leaves both or neither: a retry replays the
first answer, or finds nothing was billed and answers afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from costmesh.inference.v1 import inference_pb2
from services.common.errors import AlreadyExists
from services.common.sqlite import open_database, transaction

log = logging.getLogger(__name__)
Response = inference_pb2.CompleteResponse
_PRUNE_EVERY = 100
_PRUNE_BATCH = 1000


def _reused() -> AlreadyExists:
    return AlreadyExists(
        "request_id: already used by this team for a different request",
        reason="REQUEST_ID_REUSED",
    )


def fingerprint(request: inference_pb2.CompleteRequest) -> str:
    """What a repeat must match: the whole request, byte for byte."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


class IdempotencyStore:
    """(team, request_id) -> the response that answered it, for `ttl_seconds`.

    `path` is the outbox's file: the write that remembers a response commits with the
    outbox's rows (`remembered`)."""

    def __init__(
        self,
        path: Path,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        *,
        earlier_file: Path | None = None,
    ) -> None:
        self._db = open_database(path)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS answered (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " fingerprint TEXT NOT NULL, response BLOB NOT NULL, expires_at REAL NOT NULL,"
            " PRIMARY KEY (team, request_id));"
            "CREATE INDEX IF NOT EXISTS answered_expiry ON answered (expires_at);"
            # Ledger rows already added to a stored response's cost: a row reported
            # delivered twice is added once.
            "CREATE TABLE IF NOT EXISTS settled_rows (row_id TEXT PRIMARY KEY,"
            " expires_at REAL NOT NULL);"
        )
        self._lock = threading.Lock()
        self._ttl = ttl_seconds
        self._clock = clock
        self._answers = 0
        # Answers under way, with their fingerprints. Each runs as its own task, so a
        # caller that gives up does not stop it: a retry joins it instead of paying
        # the provider again.
        self._in_flight: dict[tuple[str, str], tuple[str, asyncio.Task[Response]]] = {}
        if earlier_file is not None and earlier_file.exists():
            self._take_over(earlier_file)
        self._prune()

    def _take_over(self, earlier_file: Path) -> None:
        """Responses an earlier version kept in a file of their own: still replayed
        after the upgrade (the file is renamed *.migrated once copied)."""
        with self._lock:
            self._db.execute("ATTACH DATABASE ? AS earlier", (str(earlier_file),))
            try:
                with transaction(self._db) as db:
                    db.execute("INSERT OR IGNORE INTO answered SELECT * FROM earlier.answered")
                    db.execute(
                        "INSERT OR IGNORE INTO settled_rows SELECT * FROM earlier.settled_rows"
                    )
            finally:
                self._db.execute("DETACH DATABASE earlier")
        earlier_file.rename(earlier_file.with_name(earlier_file.name + ".migrated"))
        log.info("replay records of %s taken over into the outbox's file", earlier_file)

    async def answer_once(
        self,
        team: str,
        request: inference_pb2.CompleteRequest,
        answer: Callable[[], Awaitable[Response]],
    ) -> Response:
        """The stored response for a repeat, else `answer()`, which remembers it by
        committing `remembered(...)` with its usage rows.

        A concurrent repeat shares the outcome of the attempt under way, error included.
        """
        key = (team, request.request_id)
        digest = fingerprint(request)
        running = self._in_flight.get(key)
        if running is None:
            task = asyncio.ensure_future(self._answer_and_remember(key, digest, answer))
            self._in_flight[key] = (digest, task)
            task.add_done_callback(lambda _: self._in_flight.pop(key, None))
            task.add_done_callback(_log_unretrieved)
            running = (digest, task)
        if running[0] != digest:
            raise _reused()
        return await asyncio.shield(running[1])

    def settle(
        self, team: str, request_id: str, trace_id: str, cost_nano_usd: int, row_id: str = ""
    ) -> None:
        """The ledger has priced a record of a response stored as cost_pending: replays
        from now on carry its cost too. A call may have several rows (an escalated
        attempt, a billed classification), each settled on its own, so costs add up.
        The trace id makes sure it is the same answer, not a later one that reused the
        id after the replay window."""
        with self._lock, transaction(self._db):  # marked settled and added, or neither
            row = self._db.execute(
                "SELECT response FROM answered WHERE team = ? AND request_id = ?",
                (team, request_id),
            ).fetchone()
            if row is None:
                return
            response = Response.FromString(row[0])
            if response.trace_id != trace_id:
                return
            if row_id:
                added = self._db.execute(
                    "INSERT OR IGNORE INTO settled_rows VALUES (?, ?)",
                    (row_id, self._clock() + self._ttl),
                ).rowcount
                if not added:
                    return
            response.cost_pending = False
            response.cost_nano_usd += cost_nano_usd
            self._db.execute(
                "UPDATE answered SET response = ? WHERE team = ? AND request_id = ?",
                (response.SerializeToString(), team, request_id),
            )

    async def _answer_and_remember(
        self, key: tuple[str, str], digest: str, answer: Callable[[], Awaitable[Response]]
    ) -> Response:
        stored = await asyncio.to_thread(self._get, key)
        if stored is not None:
            if stored[0] != digest:
                raise _reused()
            return Response.FromString(stored[1])
        response = await answer()
        self._answers += 1
        if self._answers % _PRUNE_EVERY == 0:
            try:
                await asyncio.to_thread(self._prune)
            except sqlite3.Error:  # the next prune takes what this one left
                log.exception("could not prune expired request ids")
        return response

    def remembered(
        self, team: str, request: inference_pb2.CompleteRequest, response: Response
    ) -> Callable[[sqlite3.Connection], None]:
        """The write that remembers `response` (as it is now) for repeats of `request`,
        for the caller to run inside its own transaction on this store's file."""
        row = (
            team,
            request.request_id,
            fingerprint(request),
            response.SerializeToString(),
            self._clock() + self._ttl,
        )

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?, ?)", row)

        return write

    def _get(self, key: tuple[str, str]) -> tuple[str, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, response FROM answered"
                " WHERE team = ? AND request_id = ? AND expires_at > ?",
                (*key, self._clock()),
            ).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def _prune(self) -> None:
        """Drop a bounded batch of expired entries (indexed, so cheap at any size)."""
        with self._lock:
            self._db.execute(
                "DELETE FROM answered WHERE rowid IN (SELECT rowid FROM answered"
                " WHERE expires_at <= ? LIMIT ?)",
                (self._clock(), _PRUNE_BATCH),
            )
            self._db.execute(
                "DELETE FROM settled_rows WHERE rowid IN (SELECT rowid FROM settled_rows"
                " WHERE expires_at <= ? LIMIT ?)",
                (self._clock(), _PRUNE_BATCH),
            )

    async def drain(self, seconds: float) -> None:
        """Wait (at most `seconds`) for the answers under way."""
        tasks = {task for _, task in self._in_flight.values()}
        if tasks:
            await asyncio.wait(tasks, timeout=seconds)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _log_unretrieved(task: asyncio.Task[Response]) -> None:
    """Everyone waiting on an answer may have given up; its failure still gets logged."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("answer failed: %r", task.exception())
