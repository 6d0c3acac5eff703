"""The provider batch service: submitting and polling, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.inference.batches.polling import (
    Polling,
)
from services.inference.batches.submitting import (
    Submitting,
)

log = logging.getLogger(__name__)


class ProviderBatches(Submitting, Polling):
    """Durable jobs on the provider's batch API; every result recorded exactly once."""

    async def start(self) -> None:
        """Resume polling the jobs still in flight."""
        self._poller = asyncio.create_task(self._poll_forever(), name="provider-batches")

    async def stop(self) -> None:
        """Stop polling; jobs stay on disk and resume at the next start."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._submitting:  # jobs being handed to providers: let them get there
            await asyncio.wait(
                set(self._submitting), timeout=self._settings.provider_timeout_seconds
            )
        self._store.close()
