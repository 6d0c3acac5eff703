"""Which provider failures may pass if tried again, which say "try another
deployment", and how long the provider asked us to wait."""

from __future__ import annotations

import email.utils
import time

import openai

# The statuses the OpenAI SDK itself retries: timeout, conflict, rate limit, server.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# Statuses that say this deployment cannot serve us (a bad key, an unknown model
# there) but another might: no retry, go to the next in the chain.
DEPLOYMENT_STATUSES = frozenset({401, 403, 404})


def retryable(exc: BaseException) -> bool:
    """A failure that may pass if tried again: rate limits, 5xx, timeouts, dropped
    connections."""
    if isinstance(exc, openai.APIConnectionError | TimeoutError):  # timeouts included
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUSES or exc.status_code >= 500
    return False


def wrong_deployment(exc: BaseException) -> bool:
    return isinstance(exc, openai.APIStatusError) and exc.status_code in DEPLOYMENT_STATUSES


def retry_after(exc: BaseException, now: float | None = None) -> float | None:
    """Seconds the provider asked us to wait (retry-after-ms, Retry-After as seconds or
    an HTTP date), or None."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
