"""LLM providers, reached only through the openai SDK; each call is a gen_ai client span."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import openai
from openai.types.chat import ChatCompletion
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.config import ConfigError
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from services.providers.failures import retry_after, retryable, wrong_deployment
from services.providers.resilience import Cooldowns
from services.providers.settings import ProviderInfo, ProviderSettings
from services.providers.streaming import ChatStream
from services.providers.wire import (
    ChatCall,
    Completion,
    chat_body,
    completion_from,
    finish_span,
    record_call,
    request_fields,
)

log = logging.getLogger(__name__)
_TRACE_CONTEXT = TraceContextTextMapPropagator()
_METER = metrics.get_meter("costmesh.providers")
_RETRIES = _METER.create_counter(
    "costmesh.provider.retries", unit="{retry}", description="Tries after a failed one, by model"
)
_FALLBACKS = _METER.create_counter(
    "costmesh.provider.fallbacks",
    unit="{call}",
    description="Calls a fallback model answered, by planned and answering model",
)
_COOLDOWNS = _METER.create_counter(
    "costmesh.provider.cooldowns",
    unit="{cooldown}",
    description="Times a model was cooled down after repeated failures",
)
# What callers use of the package comes from here.
__all__ = ["SIMULATED", "ChatCall", "ChatStream", "Completion", "Providers"]
SIMULATED = "simulated"
T = TypeVar("T")
# One try at one deployment: (call, time limit, attempt number, is a fallback).
_Attempt = Callable[["ChatCall", float, int, bool], Awaitable[T]]


class _AttemptFailedError(Exception):
    """One failed try, and what the failure allows: a retry, the next deployment."""

    def __init__(
        self,
        error: ServiceError,
        *,
        retry: bool,
        next_deployment: bool,
        retry_after: float | None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.timed_out = timed_out
        self.retry = retry
        self.next_deployment = next_deployment
        self.retry_after = retry_after


class Providers:
    """One AsyncOpenAI client per configured provider; a labelled simulator stands in
    for a provider whose key is missing when the configuration allows it."""

    def __init__(
        self,
        settings: ProviderSettings,
        env: Mapping[str, str],
        tracer: trace.Tracer,
        stand_ins: Mapping[str, str],
    ) -> None:
        """`stand_ins`: the base URL of a simulator for each provider whose key is
        missing, started by the composition root (costmesh serve, one process)."""
        self._settings = settings
        self._tracer = tracer
        self._stand_ins = stand_ins
        self._cooldowns = Cooldowns(
            settings.cooldown_failures,
            settings.cooldown_seconds,
            first_seconds=settings.cooldown_first_seconds,
        )
        self._rng = random.Random()
        self._clients: dict[str, tuple[openai.AsyncOpenAI, str]] = {}
        for name, info in settings.providers.items():
            self._clients[name] = self._client(name, info, env)

    def _client(
        self, name: str, info: ProviderInfo, env: Mapping[str, str]
    ) -> tuple[openai.AsyncOpenAI, str]:
        key = env.get(info.api_key_env, "")
        base_url = info.base_url
        label = name
        if not key:
            if not info.simulate_without_key:
                raise ConfigError(f"providers.{name}.api_key_env: set {info.api_key_env}")
            if name not in self._stand_ins:
                raise ConfigError(
                    f"providers.{name}.api_key_env: set {info.api_key_env} (the simulator "
                    "stands in only when all four services run in one process)"
                )
            base_url, key, label = self._stand_ins[name], SIMULATED, SIMULATED
        client = openai.AsyncOpenAI(
            api_key=key,
            base_url=base_url,
            max_retries=0,  # chat() retries itself: every try is a span, and it falls back
            timeout=self._settings.provider_timeout_seconds,
        )
        return client, label

    def client(self, provider: str) -> tuple[openai.AsyncOpenAI, str]:
        """The SDK client of a configured provider and its label ("simulated" when the
        simulator stands in), for the Batch API's files and batches."""
        return self._clients[provider]

    def provider_of(self, model: str) -> str:
        return self._clients[self._settings.models[model].provider][1]

    async def chat(self, call: ChatCall, time_limit: float) -> Completion:
        """The planned model's answer, else its fallbacks' in order, within `time_limit`.
        The result names the catalog model that served it and the tries it took."""
        completion, model, attempts = await self._resilient(call, time_limit, self._attempt)
        return dataclasses.replace(
            completion, served_model=model, attempts=attempts, fallback=model != call.model
        )

    async def open_stream(self, call: ChatCall, time_limit: float) -> ChatStream:
        """A streamed answer, opened with the same retries and fallbacks as chat(): once
        text flows, a failure ends the stream (what was sent cannot be taken back)."""
        stream, model, attempts = await self._resilient(call, time_limit, self._open_attempt)
        stream.served_model, stream.attempts = model, attempts
        stream.fallback = model != call.model
        return stream

    async def _resilient(
        self, call: ChatCall, time_limit: float, attempt_once: _Attempt[T]
    ) -> tuple[T, str, int]:
        """Each deployment of the chain gets up to max_attempts tries with backoff on
        retryable failures; a cooled-down one is skipped. Every try is its own span."""
        deadline = time.monotonic() + time_limit
        chain = [call.model, *self._settings.models[call.model].fallbacks]
        attempts, out_of_time = 0, False
        failure: ServiceError | None = None
        for model in chain:
            if deadline - time.monotonic() <= 0:
                break
            if not self._cooldowns.available(model):
                trace.get_current_span().add_event("deployment cooling down", {"model": model})
                failure = failure or Unavailable(
                    f"{model} is cooling down after repeated failures", reason="PROVIDER_COOLDOWN"
                )
                continue
            for attempt in range(1, self._settings.retry.max_attempts + 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"provider did not answer for {call.model} in time",
                        reason="PROVIDER_TIMEOUT",
                    )
                attempts += 1
                cut_by_caller = remaining < self._settings.attempt_timeout_seconds
                try:
                    result = await attempt_once(
                        dataclasses.replace(call, model=model),
                        min(remaining, self._settings.attempt_timeout_seconds),
                        attempts,
                        model != call.model,
                    )
                except _AttemptFailedError as failed:
                    failure = failed.error
                    delay, out_of_time = self._retry_delay(
                        model, attempt, failed, deadline, cut_by_caller=cut_by_caller
                    )
                    if delay is None:
                        break  # this deployment is done: the next in the chain
                    await asyncio.sleep(delay)
                    continue
                except BaseException:  # cancelled: a trial call must not stay taken
                    self._cooldowns.release(model)
                    raise
                self._succeeded(call.model, model)
                return result, model, attempts
        if (
            failure is None or out_of_time
        ):  # the time ran out before a retry could: the caller sees a timeout
            last = f" ({failure.message})" if failure else ""
            raise DeadlineExceeded(
                f"provider did not answer for {call.model} in time{last}",
                reason="PROVIDER_TIMEOUT",
            )
        raise failure

    def _succeeded(self, planned: str, model: str) -> None:
        self._cooldowns.succeeded(model)
        if model != planned:
            _FALLBACKS.add(1, {"gen_ai.request.model": planned, "costmesh.fallback_model": model})

    def _retry_delay(
        self,
        model: str,
        attempt: int,
        failed: _AttemptFailedError,
        deadline: float,
        *,
        cut_by_caller: bool,
    ) -> tuple[float | None, bool]:
        """How long to wait before trying `model` again, or None to move on; and whether
        the time ran out. Raises the failure when nothing else may be tried."""
        if not failed.retry and not failed.next_deployment:
            self._cooldowns.release(model)
            raise failed.error from failed.__cause__
        if failed.timed_out and cut_by_caller:
            # Cut by the caller's own deadline: it says nothing about the deployment.
            self._cooldowns.release(model)
            return None, True
        if self._cooldowns.failed(model):
            _COOLDOWNS.add(1, {"gen_ai.request.model": model})
            log.warning("%s keeps failing: cooled down for %gs", model,
                        self._cooldowns.cooled_for(model))  # fmt: skip
            return None, False
        if not failed.retry or attempt == self._settings.retry.max_attempts:
            return None, False
        delay = self._settings.retry.delay(attempt, failed.retry_after, self._rng)
        if time.monotonic() + delay >= deadline:
            return None, True
        _RETRIES.add(1, {"gen_ai.request.model": model})
        return delay, False

    def _start_span(self, call: ChatCall, label: str, attempt: int, fallback: bool) -> Span:
        span = self._tracer.start_span(f"chat {call.model}", kind=SpanKind.CLIENT)
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": label,
                "gen_ai.request.model": call.model,
                "gen_ai.request.max_tokens": call.max_tokens,
                "costmesh.attempt": attempt,
                "costmesh.fallback": fallback,
            }
        )
        return span

    async def _open_attempt(
        self, call: ChatCall, time_limit: float, attempt: int, fallback: bool
    ) -> ChatStream:
        """One try at opening a stream; its span lasts until the stream is closed."""
        client, label = self._clients[self._settings.models[call.model].provider]
        span = self._start_span(call, label, attempt, fallback)
        span.set_attribute("gen_ai.request.stream", True)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(time_limit):
                stream = await client.chat.completions.create(
                    **request_fields(call, time_limit),
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=_trace_headers(span),
                )
        except (openai.OpenAIError, TimeoutError) as exc:
            record_call(call, label, time.perf_counter() - started, None, type(exc).__name__)
            raise _failed(span, exc, call.model, end=True) from exc
        except BaseException:
            span.end()
            raise
        return ChatStream(stream, call, label, span, started)

    async def _attempt(
        self, call: ChatCall, time_limit: float, attempt: int, fallback: bool
    ) -> Completion:
        """One try at one deployment, as a gen_ai client span."""
        client, label = self._clients[self._settings.models[call.model].provider]
        span = self._start_span(call, label, attempt, fallback)
        started = time.perf_counter()
        with trace.use_span(span, end_on_exit=True):
            try:
                async with asyncio.timeout(time_limit):
                    # The SDK's generic post: the body is already plain JSON, so the
                    # per-call walk that checks typed parameters (1.5 ms) is skipped.
                    response = await client.post(
                        "/chat/completions",
                        cast_to=ChatCompletion,
                        body=chat_body(call),
                        options={"timeout": time_limit, "headers": _trace_headers(span)},
                    )
            except (openai.OpenAIError, TimeoutError) as exc:
                record_call(call, label, time.perf_counter() - started, None, type(exc).__name__)
                raise _failed(span, exc, call.model) from exc
            except asyncio.CancelledError:  # the caller gave up: the request is abandoned
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
                raise
            completion = completion_from(response, call, label)
            record_call(call, label, time.perf_counter() - started, completion)
            finish_span(span, completion)
            return completion

    async def close(self) -> None:
        for client, _ in self._clients.values():
            await client.close()


def _trace_headers(span: Span) -> dict[str, str]:
    """The provider call's span as W3C trace context: a provider that traces (vLLM, a
    gateway with OpenTelemetry) joins the caller's trace; OpenAI ignores it."""
    headers: dict[str, str] = {}
    # Trace context only: a caller's baggage is not the provider's business.
    _TRACE_CONTEXT.inject(headers, context=trace.set_span_in_context(span))
    return headers


def _translate(exc: openai.OpenAIError | TimeoutError, model: str) -> ServiceError:
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return DeadlineExceeded(
            f"provider did not answer for {model} in time", reason="PROVIDER_TIMEOUT"
        )
    if isinstance(exc, openai.APIConnectionError):
        return Unavailable(f"provider for {model} is unreachable", reason="PROVIDER_UNAVAILABLE")
    if isinstance(exc, openai.RateLimitError):
        return Unavailable(
            f"provider rate-limited {model}; retry later", reason="PROVIDER_RATE_LIMITED"
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return FailedPrecondition(
            f"provider rejected the configured key for {model}", reason="PROVIDER_AUTH_FAILED"
        )
    if isinstance(exc, openai.BadRequestError):
        return InvalidArgument("messages", f"provider rejected the request: {exc.message}")
    return Unavailable(f"provider failed for {model}", reason="PROVIDER_ERROR")


def _failed(
    span: Span, exc: openai.OpenAIError | TimeoutError, model: str, *, end: bool = False
) -> _AttemptFailedError:
    """Mark the try's span failed and say what the failure allows."""
    error = _translate(exc, model)
    span.set_status(Status(StatusCode.ERROR, error.reason))
    span.set_attribute("error.type", type(exc).__name__)
    if isinstance(exc, openai.APIStatusError):
        span.set_attribute("http.response.status_code", exc.status_code)
    if end:
        span.end()
    return _AttemptFailedError(
        error,
        retry=retryable(exc),
        next_deployment=wrong_deployment(exc),
        retry_after=retry_after(exc),
        timed_out=isinstance(exc, openai.APITimeoutError | TimeoutError),
    )
