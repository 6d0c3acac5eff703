"""How inference reaches its peers: their stubs, and the caller's deadline to respect."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from costmesh.cache.v1 import cache_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.router.v1 import router_pb2_grpc
from services.inference.outbox import RefusedError


@dataclass(frozen=True)
class Peers:
    """Stubs of the services inference calls, with the metadata and deadline to use."""

    cache: cache_pb2_grpc.CacheServiceAsyncStub
    router: router_pb2_grpc.RouterServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]
    timeout: float


@dataclass(frozen=True)
class LedgerPeer:
    """The ledger as inference uses it: the outbox's sender and the budgets' reader."""

    stub: ledger_pb2_grpc.LedgerServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]
    timeout: float

    async def send(
        self, records: Sequence[ledger_pb2.UsageRecord], time_limit: float
    ) -> Sequence[ledger_pb2.RecordedUsage]:
        """Record usage; a refusal says whether a later try can succeed."""
        try:
            response = await self.stub.RecordUsage(
                ledger_pb2.RecordUsageRequest(records=records),
                metadata=self.metadata,
                timeout=time_limit,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RefusedError(exc.details() or "invalid", permanent=True) from exc
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise RefusedError(exc.details() or "refused", permanent=False) from exc
            raise
        return list(response.results)

    async def spend_since(self, team: str, since: datetime) -> int:
        """The team's recorded spend since `since`, in nano-USD."""
        start = timestamp_pb2.Timestamp()
        start.FromDatetime(since)
        spend = await self.stub.QuerySpend(
            ledger_pb2.QuerySpendRequest(team=team, start_time=start),
            metadata=self.metadata,
            timeout=self.timeout,
        )
        return spend.total_cost_nano_usd


@dataclass(frozen=True)
class Deadline:
    """The caller's deadline, so that no hop outlives the call that asked for it."""

    at: float | None  # time.monotonic() value; None when the caller set no deadline

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def cap(self, seconds: float) -> float:
        """`seconds`, or less when the caller's deadline is nearer (never below 1 ms)."""
        if self.at is None:
            return seconds
        return max(min(seconds, self.at - time.monotonic()), 0.001)

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at
