"""Provider batch jobs on disk: what a job, its parts and their requests are, and
the SQLite store written before any provider is called."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.common.sqlite import open_database, transaction
from services.inference.batch_requests import BatchRules

PREFIX = "batch_"
MODE = inference_pb2.BATCH_MODE_PROVIDER
MAX_REQUESTS = 50_000
RULES = BatchRules(max_requests=MAX_REQUESTS, feature_required=True, experiments=False)
# OpenAI takes input files up to 200 MB; a part is cut below that, with room to spare.
MAX_FILE_BYTES = 190 * 1024 * 1024
ENDPOINT: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
# Provider batches carry the costmesh batch id, so one created by a call whose answer
# was lost (a timeout, a crash before the id was stored) can be found again.
METADATA_KEY = "costmesh_batch_id"
PART_KEY = "costmesh_part"
# How far back (seconds before the job was created) a lost provider batch is looked for.
LOOKUP_SLACK_SECONDS = 3600
ROUTE_CONCURRENCY = 16
RECORD_CONCURRENCY = 16
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Unfinished provider statuses, least advanced first: a job shows its slowest part's.
PROGRESS = ("submitting", "validating", "in_progress", "finalizing", "cancelling")
ROLES = {
    types_pb2.ROLE_SYSTEM: "system",
    types_pb2.ROLE_USER: "user",
    types_pb2.ROLE_ASSISTANT: "assistant",
}
# How a failed line's HTTP status reads as a gRPC status name.
HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "FAILED_PRECONDITION", 403: "FAILED_PRECONDITION",
               404: "NOT_FOUND", 409: "ABORTED", 422: "INVALID_ARGUMENT",
               429: "RESOURCE_EXHAUSTED"}  # fmt: skip
# Why a request has no line at all once its provider batch ended, by that batch's status.
UNANSWERED = {
    "expired": ("DEADLINE_EXCEEDED", "the provider's 24-hour completion window expired"),
    "cancelled": ("CANCELLED", "the provider batch was cancelled"),
    "failed": ("INVALID_ARGUMENT", "the provider refused the batch"),
    "completed": ("INTERNAL", "the provider returned no line for this request"),
}
# Request states in the store.
PENDING, ANSWERED, FAILED = "pending", "answered", "failed"
# Ledger states of an answered request.
UNRECORDED, COST_PENDING, RECORDED = 0, 1, 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    batch_id TEXT PRIMARY KEY, team TEXT NOT NULL, feature TEXT NOT NULL,
    created REAL NOT NULL, trace_id TEXT NOT NULL, span_id TEXT NOT NULL,
    total INTEGER NOT NULL, status TEXT NOT NULL, finished INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (finished);
CREATE TABLE IF NOT EXISTS parts (
    batch_id TEXT NOT NULL, part INTEGER NOT NULL, provider TEXT NOT NULL,
    model TEXT NOT NULL, provider_batch_id TEXT, input_file_id TEXT,
    status TEXT NOT NULL, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, part));
CREATE TABLE IF NOT EXISTS requests (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, request_id TEXT NOT NULL,
    part INTEGER NOT NULL, route BLOB NOT NULL, prompt_estimate INTEGER NOT NULL,
    state TEXT NOT NULL, result BLOB, code TEXT, message TEXT, record BLOB,
    ledger INTEGER NOT NULL DEFAULT 0, cost_nano_usd INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx));
CREATE INDEX IF NOT EXISTS requests_by_part ON requests (batch_id, part);
"""
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    batch_id: str
    team: str
    feature: str
    created: float
    trace_id: str
    span_id: str
    total: int
    status: str
    finished: bool


@dataclass(frozen=True)
class Part:
    """One provider batch of a job: one model of one provider."""

    part: int
    provider: str
    model: str
    provider_batch_id: str | None
    status: str
    completed: int
    failed: int
    done: bool


@dataclass
class Planned:
    """A validated, routed request on its way into a part's input file."""

    index: int
    request_id: str
    route: router_pb2.RouteResponse
    prompt_estimate: int
    line: bytes


@dataclass
class PartPlan:
    provider: str
    model: str
    requests: list[Planned] = field(default_factory=list)
    size: int = 0


@dataclass(frozen=True)
class Outcome:
    """What a provider batch's files said about one request."""

    index: int
    result: inference_pb2.CompleteResponse | None = None
    record: ledger_pb2.UsageRecord | None = None
    code: str = ""
    message: str = ""


class JobStore:
    """The SQLite file behind ProviderBatches; methods are blocking and thread-safe."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._db) as db:
            yield db

    def create(self, job: Job, plans: Sequence[PartPlan]) -> None:
        """The job, its parts (not yet sent) and its requests, in one transaction."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (job.batch_id, job.team, job.feature, job.created, job.trace_id, job.span_id,
                 job.total, job.status),
            )  # fmt: skip
            for number, plan in enumerate(plans):
                db.execute(
                    "INSERT INTO parts (batch_id, part, provider, model, status)"
                    " VALUES (?, ?, ?, ?, 'submitting')",
                    (job.batch_id, number, plan.provider, plan.model),
                )
                db.executemany(
                    "INSERT INTO requests (batch_id, idx, request_id, part, route,"
                    " prompt_estimate, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (job.batch_id, r.index, r.request_id, number, r.route.SerializeToString(),
                         r.prompt_estimate, PENDING)
                        for r in plan.requests
                    ],
                )  # fmt: skip

    def delete(self, batch_id: str) -> None:
        with self._transaction() as db:
            for table in ("requests", "parts", "jobs"):
                db.execute(f"DELETE FROM {table} WHERE batch_id = ?", (batch_id,))  # noqa: S608

    def job(self, batch_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT batch_id, team, feature, created, trace_id, span_id, total, status,"
                " finished FROM jobs WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
        if row is None:
            return None
        batch_id, team, feature, created, trace_id, span_id, total, status, finished = row
        return Job(batch_id, team, feature, created, trace_id, span_id, total, status,
                   bool(finished))  # fmt: skip

    def unfinished(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT batch_id FROM jobs WHERE finished = 0 ORDER BY created"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def parts(self, batch_id: str) -> list[Part]:
        with self._lock:
            rows = self._db.execute(
                "SELECT part, provider, model, provider_batch_id, status, completed, failed,"
                " done FROM parts WHERE batch_id = ? ORDER BY part",
                (batch_id,),
            ).fetchall()
        return [
            Part(part, provider, model, provider_batch_id, status, completed, failed, bool(done))
            for part, provider, model, provider_batch_id, status, completed, failed, done in rows
        ]

    def sent(self, batch_id: str, part: int, provider_batch_id: str, input_file_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE parts SET provider_batch_id = ?, input_file_id = ?, status = 'validating'"
                " WHERE batch_id = ? AND part = ?",
                (provider_batch_id, input_file_id, batch_id, part),
            )

    def progress(self, batch_id: str, part: int, status: str, completed: int, failed: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE parts SET status = ?, completed = ?, failed = ?"
                " WHERE batch_id = ? AND part = ? AND done = 0",
                (status, completed, failed, batch_id, part),
            )

    def custom_ids(self, batch_id: str, part: int) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, idx FROM requests WHERE batch_id = ? AND part = ?",
                (batch_id, part),
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def route_of(self, batch_id: str, part: int) -> dict[int, tuple[router_pb2.RouteResponse, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, route, prompt_estimate FROM requests WHERE batch_id = ? AND part = ?",
                (batch_id, part),
            ).fetchall()
        return {int(r[0]): (router_pb2.RouteResponse.FromString(r[1]), int(r[2])) for r in rows}

    def finish_part(
        self,
        batch_id: str,
        part: int,
        status: str,
        outcomes: Iterable[Outcome],
        unanswered: tuple[str, str],
    ) -> None:
        """Store a finished provider batch's results and failures, all or nothing; a
        request the files did not mention fails with `unanswered` (code, message)."""
        with self._transaction() as db:
            for o in outcomes:
                if o.result is not None and o.record is not None:
                    db.execute(
                        "UPDATE requests SET state = ?, result = ?, record = ?"
                        " WHERE batch_id = ? AND idx = ? AND state = ?",
                        (ANSWERED, o.result.SerializeToString(), o.record.SerializeToString(),
                         batch_id, o.index, PENDING),
                    )  # fmt: skip
                else:
                    db.execute(
                        "UPDATE requests SET state = ?, code = ?, message = ?"
                        " WHERE batch_id = ? AND idx = ? AND state = ?",
                        (FAILED, o.code, o.message, batch_id, o.index, PENDING),
                    )
            db.execute(
                "UPDATE requests SET state = ?, code = ?, message = ?"
                " WHERE batch_id = ? AND part = ? AND state = ?",
                (FAILED, *unanswered, batch_id, part, PENDING),
            )
            counts = db.execute(
                "SELECT SUM(state = ?), SUM(state = ?) FROM requests"
                " WHERE batch_id = ? AND part = ?",
                (ANSWERED, FAILED, batch_id, part),
            ).fetchone()
            db.execute(
                "UPDATE parts SET status = ?, completed = ?, failed = ?, done = 1"
                " WHERE batch_id = ? AND part = ?",
                (status, counts[0] or 0, counts[1] or 0, batch_id, part),
            )

    def to_record(self, batch_id: str, ledger_states: Sequence[int]) -> list[tuple[int, bytes]]:
        marks = ",".join("?" * len(ledger_states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT idx, record FROM requests WHERE batch_id = ? AND state = ?"  # noqa: S608
                f" AND ledger IN ({marks}) ORDER BY idx",
                (batch_id, ANSWERED, *ledger_states),
            ).fetchall()
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def recorded(self, batch_id: str, index: int, cost_nano_usd: int | None) -> None:
        """The outbox holds the record; with its cost when the ledger answered."""
        with self._transaction() as db:
            if cost_nano_usd is None:
                db.execute(
                    "UPDATE requests SET ledger = ? WHERE batch_id = ? AND idx = ? AND ledger = ?",
                    (COST_PENDING, batch_id, index, UNRECORDED),
                )
            else:
                db.execute(
                    "UPDATE requests SET ledger = ?, cost_nano_usd = ?"
                    " WHERE batch_id = ? AND idx = ?",
                    (RECORDED, cost_nano_usd, batch_id, index),
                )

    def set_status(self, batch_id: str, status: str, finished: bool) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ? WHERE batch_id = ?",
                (status, int(finished), batch_id),
            )

    def outcomes(
        self, batch_id: str
    ) -> tuple[list[inference_pb2.CompleteResponse], list[inference_pb2.BatchFailure]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, state, result, code, message, ledger, cost_nano_usd"
                " FROM requests WHERE batch_id = ? AND state != ? ORDER BY idx",
                (batch_id, PENDING),
            ).fetchall()
        results, failures = [], []
        for request_id, state, blob, code, message, ledger, cost in rows:
            if state == ANSWERED:
                result = inference_pb2.CompleteResponse.FromString(blob)
                result.cost_nano_usd = cost
                result.cost_pending = ledger != RECORDED
                results.append(result)
            else:
                failures.append(
                    inference_pb2.BatchFailure(request_id=request_id, code=code, message=message)
                )
        return results, failures
