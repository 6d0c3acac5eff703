"""Caller-chosen request ids, remembered per team: a repeat gets the first response.

This is AIP-155 for Complete: retrying with the same request_id never calls the
provider or bills twice, and reusing an id for a different request is refused.
Responses are kept on local disk for a day, so a retry after a restart is safe too.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from costmesh.inference.v1 import inference_pb2
from services.common.errors import AlreadyExists

Response = inference_pb2.CompleteResponse
_PRUNE_EVERY = 1000


def _reused() -> AlreadyExists:
    return AlreadyExists(
        "request_id: already used by this team for a different request",
        reason="REQUEST_ID_REUSED",
    )


def fingerprint(request: inference_pb2.CompleteRequest) -> str:
    """What a repeat must match: the whole request, byte for byte."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


class IdempotencyStore:
    """(team, request_id) -> the response that answered it, for `ttl_seconds`."""

    def __init__(
        self, path: Path, ttl_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answered (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " fingerprint TEXT NOT NULL, response BLOB NOT NULL, expires_at REAL NOT NULL,"
            " PRIMARY KEY (team, request_id))"
        )
        self._lock = threading.Lock()
        self._ttl = ttl_seconds
        self._clock = clock
        self._saves = 0
        # Requests being answered now, with their fingerprints: a concurrent repeat
        # waits for the first. The future holds None when the first attempt failed.
        self._in_flight: dict[tuple[str, str], tuple[str, asyncio.Future[Response | None]]] = {}

    async def answer_once(
        self,
        team: str,
        request: inference_pb2.CompleteRequest,
        answer: Callable[[], Awaitable[Response]],
    ) -> Response:
        """The stored response for a repeat, else `answer()` (remembered if it succeeds)."""
        key = (team, request.request_id)
        digest = fingerprint(request)
        while (running := self._in_flight.get(key)) is not None:
            if running[0] != digest:
                raise _reused()
            response = await asyncio.shield(running[1])
            if response is not None:
                return response
            # The first attempt failed: this repeat tries on its own.
        future: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = (digest, future)
        response = None
        try:
            response = self._checked(await asyncio.to_thread(self._get, key), digest)
            if response is None:
                response = await answer()
                await asyncio.to_thread(self._put, key, digest, response)
            return response
        finally:
            del self._in_flight[key]
            future.set_result(response)

    @staticmethod
    def _checked(stored: tuple[str, bytes] | None, digest: str) -> Response | None:
        if stored is None:
            return None
        if stored[0] != digest:
            raise _reused()
        return Response.FromString(stored[1])

    def _get(self, key: tuple[str, str]) -> tuple[str, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, response FROM answered"
                " WHERE team = ? AND request_id = ? AND expires_at > ?",
                (*key, self._clock()),
            ).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def _put(self, key: tuple[str, str], digest: str, response: Response) -> None:
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?, ?)",
                (*key, digest, response.SerializeToString(), now + self._ttl),
            )
            self._saves += 1
            if self._saves % _PRUNE_EVERY == 0:
                self._db.execute("DELETE FROM answered WHERE expires_at <= ?", (now,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
