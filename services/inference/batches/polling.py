"""GetBatch and the poller: bring jobs up to date with their providers, read the
result files, store each outcome."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import openai
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, TraceFlags

from costmesh.inference.v1 import inference_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.common.auth import Principal
from services.common.errors import NotFound
from services.inference.batches.core import (
    JobsCore,
)
from services.inference.batches.jobs import (
    MODE,
    TERMINAL,
    UNANSWERED,
    Job,
    Outcome,
    Part,
)
from services.inference.batches.lines import (
    brief,
    failure_code,
    message,
)

log = logging.getLogger(__name__)


class Polling(JobsCore):
    """Brings jobs up to date with their providers and the ledger."""

    async def get(self, batch_id: str, principal: Principal) -> inference_pb2.GetBatchResponse:
        job = await asyncio.to_thread(self._store.job, batch_id)
        # Another team's batch does not exist, as far as the caller can tell.
        if job is None or (job.team != principal.team and principal.role != "admin"):
            raise NotFound(f"batch_id: no batch {batch_id!r}")
        status, completed, failed = await self._refresh(batch_id)
        results, failures = await asyncio.to_thread(self._store.outcomes, batch_id)
        return inference_pb2.GetBatchResponse(
            batch_id=batch_id,
            status=status,
            total=job.total,
            completed=completed,
            failed=failed,
            results=results,
            mode=MODE,
            failures=failures,
        )

    async def _poll_forever(self) -> None:
        while True:
            try:
                unfinished = await asyncio.to_thread(self._store.unfinished)
            except Exception:  # the store itself failed: try again next round
                log.exception("listing unfinished provider batches failed")
                unfinished = []
            for batch_id in unfinished:
                try:
                    await self._refresh(batch_id)
                except Exception:  # one broken job must not stop the others
                    log.exception("polling batch %s failed", batch_id)
            await asyncio.sleep(self._settings.batch_poll_seconds)

    async def _refresh(self, batch_id: str) -> tuple[str, int, int]:
        """Bring a job up to date with its providers and the ledger, once; its status
        and counts. A provider or ledger failure leaves it for the next round."""
        async with self._job_lock(batch_id):
            job = await asyncio.to_thread(self._store.job, batch_id)
            if job is None:
                raise NotFound(f"batch_id: no batch {batch_id!r}")
            links = []
            if job.trace_id and job.span_id:
                submitted = SpanContext(
                    int(job.trace_id, 16), int(job.span_id, 16), is_remote=True,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED),
                )  # fmt: skip
                links.append(Link(submitted))
            with self._tracer.start_as_current_span("batch.poll", links=links) as span:
                span.set_attributes({"costmesh.batch_id": batch_id, "costmesh.team": job.team})
                if not job.finished:
                    for part in await asyncio.to_thread(self._store.parts, batch_id):
                        try:
                            await self._poll_part(job, part)
                        except Exception as exc:  # the others still go ahead
                            log.exception("polling part %d of %s failed", part.part, batch_id)
                            span.add_event("batch.part_failed", {"error.type": type(exc).__name__})
                status, completed, failed = await self._settle(job)
                span.set_attributes(
                    {
                        "costmesh.batch.status": status,
                        "costmesh.batch.total": job.total,
                        "costmesh.batch.completed": completed,
                        "costmesh.batch.failed": failed,
                    }
                )
                return status, completed, failed

    async def _poll_part(self, job: Job, part: Part) -> None:
        if part.done:
            return
        if part.provider_batch_id is None:
            # Left by a submit that did not finish (a crash): created, or never.
            if not await self._adopt(job, part.part, part.provider):
                await asyncio.to_thread(
                    self._store.finish_part, job.batch_id, part.part, "failed", (),
                    ("UNAVAILABLE", "the submission was interrupted before the provider took it"),
                )  # fmt: skip
            return
        client = self._client(part.provider)
        try:
            batch = await client.batches.retrieve(part.provider_batch_id)
            counts = batch.request_counts
            await asyncio.to_thread(
                self._store.progress, job.batch_id, part.part, batch.status,
                counts.completed if counts else 0, counts.failed if counts else 0,
            )  # fmt: skip
            if batch.status not in TERMINAL:
                return
            outcomes = await self._read_files(job, part, batch)
        except openai.OpenAIError as exc:
            log.warning("provider batch %s of %s: %r; will retry", part.provider_batch_id,
                        job.batch_id, exc)  # fmt: skip
            trace.get_current_span().add_event("batch.provider_failed", {"error.type": brief(exc)})
            return
        unanswered = UNANSWERED.get(batch.status, UNANSWERED["failed"])
        if batch.status == "failed" and batch.errors and batch.errors.data:
            first = batch.errors.data[0]
            unanswered = ("INVALID_ARGUMENT", f"the provider refused the batch: {first.message}")
        await asyncio.to_thread(
            self._store.finish_part, job.batch_id, part.part, batch.status, outcomes, unanswered
        )
        await self._delete_files(client, batch)

    async def _read_files(self, job: Job, part: Part, batch: Any) -> list[Outcome]:
        """Every line of a finished provider batch's output and error files."""
        client = self._client(part.provider)
        label = self._label(part.provider)
        ids = await asyncio.to_thread(self._store.custom_ids, job.batch_id, part.part)
        routes = await asyncio.to_thread(self._store.route_of, job.batch_id, part.part)
        outcomes = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            text = (await client.files.content(file_id)).text
            for raw in text.splitlines():
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    index = ids[line["custom_id"]]
                    route, prompt = routes[index]
                    outcome = self._outcome(
                        job, index, line, model=part.model, label=label, route=route,
                        prompt_estimate=prompt,
                    )  # fmt: skip
                except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                    # Its request is then failed as one the provider gave no line for.
                    log.warning("provider batch %s: unreadable line %.200r", batch.id, raw)
                    continue
                outcomes.append(outcome)
        return outcomes

    def _outcome(
        self,
        job: Job,
        index: int,
        line: dict[str, Any],
        *,
        model: str,
        label: str,
        route: router_pb2.RouteResponse,
        prompt_estimate: int,
    ) -> Outcome:
        """A result (with its ledger record) or a failure, from one output/error line."""
        custom_id = str(line["custom_id"])
        response, error = line.get("response") or {}, line.get("error")
        body = response.get("body") if isinstance(response, dict) else None
        status = response.get("status_code") if isinstance(response, dict) else None
        if status != 200 or not isinstance(body, dict) or not body.get("choices"):
            return Outcome(index, code=failure_code(status, error), message=message(body, error))
        choice = body["choices"][0]
        content = (choice.get("message") or {}).get("content") or ""
        usage = body.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            tokens = types_pb2.TokenUsage(
                input_tokens=int(usage.get("prompt_tokens") or 0),
                cached_input_tokens=int(details.get("cached_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
            )
        else:  # billed on an estimate rather than for free, as Complete does
            log.warning("provider batch line %s reported no usage; billing an estimate", custom_id)
            tokens = types_pb2.TokenUsage(
                input_tokens=prompt_estimate, output_tokens=math.ceil(len(content) / 4)
            )
        # The catalog name asked for, not the provider's dated snapshot: the ledger prices it.
        result = inference_pb2.CompleteResponse(
            request_id=custom_id,
            content=content,
            model=model,
            provider=label,
            cache_outcome=types_pb2.CACHE_OUTCOME_BYPASS,
            usage=tokens,
            trace_id=job.trace_id,
            tier=route.tier,
            finish_reason=choice.get("finish_reason") or "",
            route_reason=route.reason,
            attempts=1,
        )
        record = self._record(job, f"{job.batch_id}:{index}", route, tokens)
        record.model, record.provider, record.client_request_id = model, label, custom_id
        return Outcome(index, result=result, record=record)

    async def _delete_files(self, client: openai.AsyncOpenAI, batch: Any) -> None:
        """The provider keeps files until deleted; results are in the job store now."""
        for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
            if file_id:
                try:
                    await client.files.delete(file_id)
                except openai.OpenAIError as exc:
                    log.info("could not delete provider file %s: %r", file_id, exc)
