"""What the queue holds: its settings, a queued request, a batch's record, the
backend protocol, and how they are written to Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from costmesh.inference.v1 import inference_pb2
from services.common.auth import Principal
from services.common.config import Config, ConfigError
from services.inference.batch_requests import BatchRules

log = logging.getLogger(__name__)

PREFIX = "queue_"
Answer = Callable[
    [inference_pb2.CompleteRequest, Principal], Awaitable[inference_pb2.CompleteResponse]
]
Outcome = inference_pb2.CompleteResponse | inference_pb2.BatchFailure

MAX_REQUESTS = 10_000  # per SubmitBatch
RULES = BatchRules(max_requests=MAX_REQUESTS, feature_required=False, experiments=True)
MAX_WAITING = 100_000  # requests queued and not yet answered, over all batches
BATCH_ID = re.compile(rf"{PREFIX}[0-9a-f]{{32}}")
MAX_LINKS = 64  # submitting traces linked from one queue.batch span
GROUP = "costmesh"
BLOCK_MS = 1000  # longest blocking read, so a stopping consumer notices soon
RETRY_SECONDS = 0.5  # after a Redis error in the consumer
CONSUMER_FILE = "queue-consumer"
PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class QueueSettings:
    backend: str
    redis_url: str
    redis_prefix: str
    max_batch: int
    max_wait_seconds: float
    concurrency: int
    result_ttl_seconds: int
    data_dir: Path

    @classmethod
    def from_config(cls, config: Config) -> QueueSettings:
        queue = config.section("queue")
        backend = queue.get_choice("backend", ("memory", "redis"), "memory")
        url = queue.get_str("redis_url", "redis://127.0.0.1:6379/0")
        if backend == "redis" and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"{queue.key_name('redis_url')}: expected a redis://, rediss:// or unix:// URL,"
                f" got {url!r}"
            )
        prefix = queue.get_str("redis_prefix", "costmesh:queue")
        if not prefix:
            raise ConfigError(f"{queue.key_name('redis_prefix')}: must not be empty")
        max_batch = queue.get_int("max_batch", 16, minimum=1)
        if max_batch > MAX_REQUESTS:
            raise ConfigError(
                f"{queue.key_name('max_batch')}: at most {MAX_REQUESTS}, got {max_batch}"
            )
        return cls(
            backend=backend,
            redis_url=url,
            redis_prefix=prefix,
            max_batch=max_batch,
            max_wait_seconds=queue.get_int("max_wait_ms", 50, minimum=0) / 1000,
            concurrency=queue.get_int("concurrency", 8, minimum=1),
            result_ttl_seconds=queue.get_int("result_ttl_seconds", 3600, minimum=1),
            data_dir=Path(config.section("server").get_str("data_dir")),
        )


@dataclass
class Item:
    """One queued request.

    `request.request_id` is f"{batch_id}:{caller_id}", not the caller's id: request ids
    are remembered per team by the request path (a repeat is answered from its first
    answer, never billed again), and two batches of a team may well both use "1". The
    batch-unique id makes a replay of this item (a consumer that answered it but
    stopped before acking it) idempotent, and keeps it apart from every other item.
    Results carry the caller's id again.
    """

    batch_id: str
    caller_id: str
    request: inference_pb2.CompleteRequest
    principal: Principal
    enqueued_at: float  # wall clock, as consumers may run on other machines
    carrier: dict[str, str]  # W3C trace context of the SubmitBatch call
    token: str = ""  # the backend's handle: the stream entry id in Redis


@dataclass
class Batch:
    """What GetBatch reads."""

    team: str
    total: int
    ids: list[str]
    started: bool = False
    outcomes: dict[str, Outcome] = field(default_factory=dict)


class Backend(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, batch_id: str, batch: Batch, items: Sequence[Item]) -> None: ...

    async def take(self, max_batch: int, max_wait: float) -> list[Item]:
        """The next batch: blocks (a bounded while) for a first request, then gathers
        more until max_batch or max_wait after the first was enqueued."""
        ...

    async def claim(self, item: Item) -> bool:
        """Mark the item's batch started; False when it needs no answer (already stored)."""
        ...

    async def finish(self, item: Item, outcome: Outcome) -> None: ...

    async def read(self, batch_id: str) -> Batch | None: ...


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def encode_item(item: Item) -> dict[str, str | bytes]:
    return {
        "batch": item.batch_id,
        "id": item.caller_id,
        "team": item.principal.team,
        "role": item.principal.role,
        "at": repr(item.enqueued_at),
        "trace": json.dumps(item.carrier),
        "request": item.request.SerializeToString(),
    }


def decode_item(fields: dict[bytes, bytes]) -> Item | None:
    try:
        carrier = json.loads(fields[b"trace"])
        return Item(
            batch_id=fields[b"batch"].decode(),
            caller_id=fields[b"id"].decode(),
            request=inference_pb2.CompleteRequest.FromString(fields[b"request"]),
            principal=Principal(fields[b"team"].decode(), fields[b"role"].decode()),
            enqueued_at=float(fields[b"at"]),
            carrier={str(k): str(v) for k, v in carrier.items()},
        )
    except (KeyError, ValueError, AttributeError):  # DecodeError is a ValueError too
        return None


def encode_outcome(outcome: Outcome) -> bytes:
    tag = b"r" if isinstance(outcome, inference_pb2.CompleteResponse) else b"f"
    return tag + outcome.SerializeToString()


def decode_outcome(value: bytes) -> Outcome | None:
    try:
        if value[:1] == b"r":
            return inference_pb2.CompleteResponse.FromString(value[1:])
        if value[:1] == b"f":
            return inference_pb2.BatchFailure.FromString(value[1:])
    except ValueError:
        pass
    log.error("micro-batch queue: unreadable stored result")
    return None


def batch_deadline(first: Item, max_wait: float, clock: Callable[[], float]) -> float:
    """The loop time by which a batch starting with `first` goes, full or not: max_wait
    after `first` was enqueued (now, if it has waited longer already)."""
    left = first.enqueued_at + max_wait - clock()
    return asyncio.get_running_loop().time() + min(max(left, 0.0), max_wait)
