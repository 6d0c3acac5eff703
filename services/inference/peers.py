"""How inference reaches its peers: their stubs, and the caller's deadline to respect."""

from __future__ import annotations

import time
from dataclasses import dataclass

from costmesh.cache.v1 import cache_pb2_grpc
from costmesh.router.v1 import router_pb2_grpc


@dataclass(frozen=True)
class Peers:
    """Stubs of the services inference calls, with the metadata and deadline to use."""

    cache: cache_pb2_grpc.CacheServiceAsyncStub
    router: router_pb2_grpc.RouterServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]
    timeout: float


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
