"""The in-process backend: a deque and dicts, bounded in waiting requests; what is
queued is lost with the process."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence

from services.common.errors import ResourceExhausted
from services.inference.queue.items import (
    Batch,
    Item,
    Outcome,
    batch_deadline,
)


class MemoryBackend:
    """This process's queue: a deque, and batches in a dict with their expiry times."""

    def __init__(self, ttl: int, max_waiting: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max_waiting = max_waiting
        self._clock = clock
        self._waiting: deque[Item] = deque()
        self._arrived = asyncio.Event()
        self._batches: dict[str, Batch] = {}
        self._expires: dict[str, float] = {}
        self._next_prune = 0.0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def enqueue(self, batch_id: str, batch: Batch, items: Sequence[Item]) -> None:
        self._prune()
        if len(self._waiting) + len(items) > self._max_waiting:
            raise ResourceExhausted(
                f"requests: the queue holds {len(self._waiting)} waiting requests and takes"
                f" at most {self._max_waiting}; retry later",
                reason="QUEUE_FULL",
            )
        self._batches[batch_id] = batch
        self._expires[batch_id] = self._clock() + self._ttl
        self._waiting.extend(items)
        self._arrived.set()

    async def take(self, max_batch: int, max_wait: float) -> list[Item]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        items = [self._waiting.popleft()]
        deadline = batch_deadline(items[0], max_wait, self._clock)
        loop = asyncio.get_running_loop()
        while len(items) < max_batch:
            if self._waiting:
                items.append(self._waiting.popleft())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return items

    async def claim(self, item: Item) -> bool:
        batch = self._batches.get(item.batch_id)
        if batch is not None:
            batch.started = True
            self._expires[item.batch_id] = self._clock() + self._ttl
        return True

    async def finish(self, item: Item, outcome: Outcome) -> None:
        batch = self._batches.get(item.batch_id)
        if batch is not None:  # else it expired while it waited: nobody can read it
            batch.outcomes[item.caller_id] = outcome
            self._expires[item.batch_id] = self._clock() + self._ttl

    async def read(self, batch_id: str) -> Batch | None:
        self._prune()
        expires = self._expires.get(batch_id)
        if expires is None or expires <= self._clock():
            return None
        return self._batches[batch_id]

    def _prune(self) -> None:
        now = self._clock()
        if now < self._next_prune:
            return
        self._next_prune = now + min(60.0, self._ttl)
        for batch_id in [b for b, at in self._expires.items() if at <= now]:
            del self._expires[batch_id], self._batches[batch_id]
