"""Identical misses share one provider call: the first generates, the others wait for
its answer and are served it as an exact hit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from costmesh.inference.v1 import inference_pb2
from services.inference.call import CACHEABLE_FINISH_REASONS
from services.inference.peers import Deadline

Response = inference_pb2.CompleteResponse


class SingleFlight:
    """Calls in flight by cache key digest. When the first fails or is cancelled, the
    next waiter takes its place; one too slow to wait for is not waited for."""

    def __init__(self, longest_wait: float) -> None:
        self._longest_wait = longest_wait  # a route, a provider call, an escalation's
        self._in_flight: dict[str, asyncio.Future[Response]] = {}

    async def answer(
        self, digest: str, deadline: Deadline, generate: Callable[[], Awaitable[Response]]
    ) -> tuple[Response, bool]:
        """(the answer, whether it is another call's): an identical call's finished
        answer when one is in flight, else generate()'s."""
        first = await self._first_answer(digest, deadline)
        if first is not None:
            return first, True
        if digest in self._in_flight:  # a leader too slow to wait for: go alone
            return await generate(), False
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._in_flight[digest] = future
        try:
            response = await generate()
            future.set_result(response)
            return response, False
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            if self._in_flight.get(digest) is future:
                del self._in_flight[digest]

    async def _first_answer(self, digest: str, deadline: Deadline) -> Response | None:
        """The answer of an identical call in flight, once it is finished; None when
        there is none, it failed (and no other took its place), it is unfinished
        text, or it takes longer than this call may wait."""
        while (leader := self._in_flight.get(digest)) is not None:
            done, _ = await asyncio.wait({leader}, timeout=deadline.cap(self._longest_wait))
            if leader not in done:
                return None
            if leader.exception() is None:
                first = leader.result()
                return first if first.finish_reason in CACHEABLE_FINISH_REASONS else None
            # The leader failed and has left the map: another caller may have taken
            # its place (then wait for that one), or this one becomes the leader.
        return None
