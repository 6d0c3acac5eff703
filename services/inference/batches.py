"""SubmitBatch through the provider's batch API (BATCH_MODE_PROVIDER): to be built."""

from __future__ import annotations

from costmesh.inference.v1 import inference_pb2
from services.common.auth import Principal
from services.common.errors import Unimplemented
from services.inference.outbox import UsageOutbox
from services.inference.peers import Peers
from services.inference.providers import Providers
from services.inference.settings import InferenceSettings

PREFIX = "batch_"


class ProviderBatches:
    """Durable jobs on the provider's batch API; every result recorded exactly once."""

    def __init__(
        self,
        settings: InferenceSettings,
        providers: Providers,
        peers: Peers,
        outbox: UsageOutbox,
    ) -> None:
        # settings.batch_store_path: the job store; settings.batch_poll_seconds.
        self._settings = settings

    async def start(self) -> None:
        """Resume polling the jobs still in flight."""

    async def stop(self) -> None:
        """Stop polling; jobs stay on disk and resume at the next start."""

    async def submit(
        self, request: inference_pb2.SubmitBatchRequest, principal: Principal
    ) -> inference_pb2.SubmitBatchResponse:
        raise Unimplemented("BATCH_MODE_PROVIDER is not built yet")

    async def get(self, batch_id: str, principal: Principal) -> inference_pb2.GetBatchResponse:
        raise Unimplemented("BATCH_MODE_PROVIDER is not built yet")
