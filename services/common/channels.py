"""One channel per peer per process, with retries on UNAVAILABLE and trace propagation."""

from __future__ import annotations

import json

import grpc
from opentelemetry import trace

from services.common import telemetry
from services.common.in_process import IN_PROCESS, InProcessServer
from services.common.tls import PeerTls

# Only UNAVAILABLE is retried: the call never reached a servicer, so a retry cannot
# duplicate work. Everything else is the caller's decision. Backoff stays short: a
# peer that is down should cost a caller (e.g. a fail-open cache lookup) milliseconds.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class Channels:
    """Owns the channels to peers; callers always pass `timeout` and `metadata`."""

    def __init__(
        self,
        service_key: str,
        provider: trace.TracerProvider,
        timeout_seconds: float,
        local: InProcessServer | None = None,
        tls: PeerTls | None = None,
    ) -> None:
        self._provider = provider
        self._local = local
        self._credentials = None if tls is None else tls.channel_credentials()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {service_key}"),)
        self.timeout = timeout_seconds

    def get(self, address: str) -> grpc.aio.Channel:
        """A channel to `address`; IN_PROCESS reaches this process's services directly."""
        if address == IN_PROCESS:
            if self._local is None:
                raise ValueError("no services run in this process")
            return self._local.channel()
        channel = self._channels.get(address)
        if channel is None:
            options = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
            interceptors = telemetry.client_interceptors(self._provider)
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(
                    address, options=options, interceptors=interceptors
                )
            else:
                channel = grpc.aio.secure_channel(
                    address, self._credentials, options=options, interceptors=interceptors
                )
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
