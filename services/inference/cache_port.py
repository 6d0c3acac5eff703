"""The cache as the request path uses it: look up (failing open), store off the
response path, pass on a caller's wrong-hit report. The stub may reach the cache
service over gRPC or in this process: the contract is the messages."""

from __future__ import annotations

import asyncio
import logging

import grpc
from opentelemetry import trace

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.inference.v1 import inference_pb2
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.outages import OutageLog
from services.inference.call import Call, key_digest, usage_of
from services.inference.peers import Deadline
from services.providers.client import Completion

log = logging.getLogger(__name__)


class CachePort:
    """Look-ups fail open (an outage costs misses, never answers); stores are in the
    background, and an identical request waits for a store in flight instead of
    paying the provider again."""

    def __init__(
        self,
        stub: cache_pb2_grpc.CacheServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
    ) -> None:
        self._stub, self._metadata, self._timeout = stub, metadata, timeout
        self._lookup_outage = OutageLog(log, "cache lookups (served as misses)")
        self._store_outage = OutageLog(log, "cache stores")
        self._pending_stores: dict[str, asyncio.Task[None]] = {}

    async def lookup(
        self, key: cache_pb2.CacheKey, control: inference_pb2.CacheControl, deadline: Deadline
    ) -> cache_pb2.LookupResponse | None:
        """The cache's answer (a hit, or a miss carrying the question's embedding), or
        None when the cache failed."""
        pending = self._pending_stores.get(key_digest(key))
        if pending is not None:
            await asyncio.wait({pending}, timeout=deadline.cap(self._timeout))
        lookup = cache_pb2.LookupRequest(key=key, max_age_seconds=control.max_age_seconds)
        if control.HasField("similarity_threshold"):
            lookup.similarity_threshold = control.similarity_threshold
        try:
            found = await self._stub.Lookup(
                lookup, metadata=self._metadata, timeout=deadline.cap(self._timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # The request itself is wrong for this feature (say, a per-tenant
                # cache without a scope_key): the caller must hear it.
                raise InvalidArgument("cache", exc.details() or "refused by the cache") from exc
            self._lookup_outage.failed(exc.code().name)
            trace.get_current_span().add_event(
                "cache.lookup_failed", {"grpc.status": str(exc.code())}
            )
            return None
        self._lookup_outage.succeeded()
        return found

    def store_later(
        self,
        call: Call,
        key: cache_pb2.CacheKey,
        completion: Completion,
        looked_up: cache_pb2.LookupResponse,
    ) -> None:
        """Store off the response path; a failed store only costs a future miss."""
        digest = key_digest(key)
        request = cache_pb2.StoreRequest(
            key=key,
            content=completion.content,
            # The catalog name, not the provider's dated snapshot name: the ledger
            # prices and groups hits under the model that was asked for.
            model=completion.model,
            usage=usage_of(completion),
            finish_reason=completion.finish_reason,
            tags=call.request.cache_control.tags,
            # The lookup already embedded the question: the cache need not again.
            query_embedding=looked_up.query_embedding,
            embedding_model=looked_up.embedding_model,
            # An invalidation while the answer was generated means it is not stored.
            namespace_version=looked_up.namespace_version,
            looked_up_at=looked_up.looked_up_at if looked_up.HasField("looked_up_at") else None,
            # Whose answer this is: a hit on it says so (false-hit measurement).
            source_request_id=call.request_id,
        )

        async def store() -> None:
            try:
                await self._stub.Store(request, metadata=self._metadata, timeout=self._timeout)
                self._store_outage.succeeded()
            except grpc.aio.AioRpcError as exc:
                self._store_outage.failed(exc.code().name)
            finally:
                self._pending_stores.pop(digest, None)

        self._pending_stores[digest] = asyncio.create_task(store())

    async def report_wrong_hit(
        self, key: cache_pb2.CacheKey, entry_id: str
    ) -> cache_pb2.ReportWrongHitResponse:
        """Drop the entry and raise its partition's bar; NotFound when it is gone."""
        try:
            return await self._stub.ReportWrongHit(
                cache_pb2.ReportWrongHitRequest(key=key, entry_id=entry_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or exc.code().name
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(details) from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument("request", details) from exc
            raise Unavailable(f"cache unavailable: {details}") from exc

    async def drain(self) -> None:
        """Let stores in flight finish before shutdown."""
        if self._pending_stores:
            await asyncio.wait(set(self._pending_stores.values()), timeout=self._timeout)
