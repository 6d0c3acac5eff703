"""SubmitBatch through costmesh's micro-batching queue (BATCH_MODE_QUEUE): to be built."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from costmesh.inference.v1 import inference_pb2
from services.common.auth import Principal
from services.common.config import Config
from services.common.errors import Unimplemented

PREFIX = "queue_"
Answer = Callable[
    [inference_pb2.CompleteRequest, Principal], Awaitable[inference_pb2.CompleteResponse]
]


class MicroBatchQueue:
    """Requests wait at most max_wait_ms or until max_batch are gathered, then run
    with bounded concurrency; results are kept result_ttl_seconds for GetBatch."""

    def __init__(self, config: Config, answer: Answer) -> None:
        self._answer = answer

    async def start(self) -> None:
        """Start the consumer (and, with Redis, resume what an earlier one left)."""

    async def stop(self) -> None:
        """Stop consuming; with Redis nothing enqueued is lost."""

    async def submit(
        self, request: inference_pb2.SubmitBatchRequest, principal: Principal
    ) -> inference_pb2.SubmitBatchResponse:
        raise Unimplemented("BATCH_MODE_QUEUE is not built yet")

    async def get(self, batch_id: str, principal: Principal) -> inference_pb2.GetBatchResponse:
        raise Unimplemented("BATCH_MODE_QUEUE is not built yet")
