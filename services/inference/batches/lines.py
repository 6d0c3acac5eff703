"""The JSONL lines a provider batch is made of and read back from, and small helpers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import Any

from costmesh.inference.v1 import inference_pb2
from services.common.errors import InvalidArgument
from services.inference.batches.jobs import (
    ENDPOINT,
    HTTP_CODES,
    PROGRESS,
    ROLES,
    Part,
    T,
)
from services.inference.validation import (
    openai_response_format,
)

log = logging.getLogger(__name__)


def job_status(parts: Sequence[Part]) -> str:
    """The provider's status while any part runs (the least advanced one); once every
    part is done, `completed`, unless all ended the same other way (failed, expired)."""
    running = [p.status for p in parts if not p.done]
    if running:
        return min(running, key=lambda s: PROGRESS.index(s) if s in PROGRESS else len(PROGRESS))
    ended = {p.status for p in parts}
    return ended.pop() if len(ended) == 1 else "completed"


def batch_line(
    request: inference_pb2.CompleteRequest, model: str, max_tokens: int
) -> dict[str, Any]:
    """One input line of the Batch API: the chat request Complete would send."""
    params = request.params
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": ROLES[m.role], "content": m.content} for m in request.messages],
        "max_tokens": max_tokens,
    }
    if params.HasField("temperature"):
        body["temperature"] = params.temperature
    if params.HasField("top_p"):
        body["top_p"] = params.top_p
    if params.stop:
        body["stop"] = list(params.stop)
    response_format = openai_response_format(params.response_format)
    if response_format is not None:
        body["response_format"] = response_format
    return {"custom_id": request.request_id, "method": "POST", "url": ENDPOINT, "body": body}


def failure_code(status: object, error: object) -> str:
    if isinstance(status, int):
        if status in HTTP_CODES:
            return HTTP_CODES[status]
        return "UNAVAILABLE" if status >= 500 else "UNKNOWN"
    code = error.get("code") if isinstance(error, dict) else None
    return "DEADLINE_EXCEEDED" if code == "batch_expired" else "UNKNOWN"


def message(body: object, error: object) -> str:
    for source in (body.get("error") if isinstance(body, dict) else None, error):
        if isinstance(source, dict) and source.get("message"):
            return str(source["message"])
    return "the provider answered this request with an error"


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """An InvalidArgument about a request names it: `messages` becomes
    `requests[3].messages`."""
    try:
        yield
    except InvalidArgument as exc:
        field_name, description = exc.field_violations[0]
        raise InvalidArgument(f"{where}.{field_name}", description) from exc


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Run them all; on the first failure the others are cancelled and it is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def retrieved(task: asyncio.Future[str]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("batch submission failed: %r", task.exception())


def brief(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__} {status}" if status else type(exc).__name__
