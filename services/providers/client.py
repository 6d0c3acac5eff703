"""LLM providers, reached only through the openai SDK; each call is a gen_ai client span."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import openai
from openai import AsyncStream
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from costmesh.types.v1 import types_pb2
from services.common.config import ConfigError
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from services.providers.resilience import Cooldowns, retry_after, retryable, wrong_deployment
from services.providers.settings import ProviderInfo, ProviderSettings
from services.providers.tokens import count_prompt_tokens, count_text_tokens

log = logging.getLogger(__name__)
SIMULATED = "simulated"
T = TypeVar("T")
# One try at one deployment: (call, time limit, attempt number, is a fallback).
_Attempt = Callable[["ChatCall", float, int, bool], Awaitable[T]]
_ROLES = {
    types_pb2.ROLE_SYSTEM: "system",
    types_pb2.ROLE_USER: "user",
    types_pb2.ROLE_ASSISTANT: "assistant",
}


@dataclass(frozen=True)
class Completion:
    content: str
    finish_reason: str
    model: str
    provider: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    usage_estimated: bool = False
    # Log-probability of each answer token, when the call asked for them.
    token_logprobs: tuple[float, ...] = ()
    # The catalog model that answered (a fallback's, when it did), and the tries.
    served_model: str = ""
    attempts: int = 1
    fallback: bool = False


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


@dataclass(frozen=True)
class ChatCall:
    """One provider request, already validated and budgeted."""

    model: str
    messages: Sequence[types_pb2.ChatMessage]
    max_tokens: int
    temperature: float | None
    top_p: float | None
    stop: list[str]
    logprobs: bool = False
    # OpenAI's response_format object, passed through; None for free text.
    response_format: ResponseFormat | None = None


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
        self._cooldowns = Cooldowns(settings.cooldown_failures, settings.cooldown_seconds)
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
                self._cooldowns.succeeded(model)
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
            log.warning("%s keeps failing: cooled down for %gs", model,
                        self._settings.cooldown_seconds)  # fmt: skip
            return None, False
        if not failed.retry or attempt == self._settings.retry.max_attempts:
            return None, False
        delay = self._settings.retry.delay(attempt, failed.retry_after, self._rng)
        if time.monotonic() + delay >= deadline:
            return None, True
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
        try:
            async with asyncio.timeout(time_limit):
                stream = await client.chat.completions.create(
                    **_request(call, time_limit),
                    stream=True,
                    stream_options={"include_usage": True},
                )
        except (openai.OpenAIError, TimeoutError) as exc:
            raise _failed(span, exc, call.model, end=True) from exc
        except BaseException:
            span.end()
            raise
        return ChatStream(stream, call, label, span)

    async def _attempt(
        self, call: ChatCall, time_limit: float, attempt: int, fallback: bool
    ) -> Completion:
        """One try at one deployment, as a gen_ai client span."""
        client, label = self._clients[self._settings.models[call.model].provider]
        span = self._start_span(call, label, attempt, fallback)
        with trace.use_span(span, end_on_exit=True):
            try:
                async with asyncio.timeout(time_limit):
                    # The SDK's generic post: the body is already plain JSON, so the
                    # per-call walk that checks typed parameters (1.5 ms) is skipped.
                    response = await client.post(
                        "/chat/completions",
                        cast_to=ChatCompletion,
                        body=_body(call),
                        options={"timeout": time_limit},
                    )
            except (openai.OpenAIError, TimeoutError) as exc:
                raise _failed(span, exc, call.model) from exc
            except asyncio.CancelledError:  # the caller gave up: the request is abandoned
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
                raise
            completion = _completion(response, call, label)
            _finish_span(span, completion)
            return completion

    async def close(self) -> None:
        for client, _ in self._clients.values():
            await client.close()


def _completion(response: ChatCompletion, call: ChatCall, label: str) -> Completion:
    """Our view of a provider answer. A server that reports no usage is billed on an
    estimate (and says so) rather than for free."""
    choice = response.choices[0]
    content = choice.message.content or ""
    usage = response.usage
    details = usage.prompt_tokens_details if usage else None
    tokens = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    return Completion(
        content=content,
        finish_reason=choice.finish_reason or "",
        model=response.model or call.model,
        provider=label,
        input_tokens=usage.prompt_tokens
        if usage
        else count_prompt_tokens(call.messages, call.model),
        cached_input_tokens=(details.cached_tokens or 0) if details else 0,
        output_tokens=usage.completion_tokens if usage else math.ceil(len(content) / 4),
        usage_estimated=usage is None,
        token_logprobs=tuple(t.logprob for t in tokens),
    )


def _request(call: ChatCall, time_limit: float) -> dict[str, Any]:
    """What every chat request sends, streamed or not."""
    return {
        "model": call.model,
        "messages": _to_openai(call.messages),
        "max_tokens": call.max_tokens,
        "temperature": call.temperature,
        "top_p": call.top_p,
        "stop": call.stop or None,
        "response_format": openai.omit if call.response_format is None else call.response_format,
        "timeout": time_limit,
    }


def _body(call: ChatCall) -> dict[str, Any]:
    """A non-streamed chat request as JSON, with only the fields that are set."""
    body: dict[str, Any] = {
        "model": call.model,
        "messages": _to_openai(call.messages),
        "max_tokens": call.max_tokens,
    }
    optional = {
        "temperature": call.temperature,
        "top_p": call.top_p,
        "stop": call.stop or None,
        "response_format": call.response_format,
        "logprobs": call.logprobs or None,
    }
    body.update((k, v) for k, v in optional.items() if v is not None)
    return body


def _to_openai(messages: Sequence[types_pb2.ChatMessage]) -> list[ChatCompletionMessageParam]:
    return [
        cast("ChatCompletionMessageParam", {"role": _ROLES[m.role], "content": m.content})
        for m in messages
    ]


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


def _finish_span(span: Span, completion: Completion) -> None:
    if completion.usage_estimated:
        log.warning(
            "provider %s reported no usage for %s; billing an estimate",
            completion.provider,
            completion.model,
        )
    span.set_attributes(
        {
            "gen_ai.response.model": completion.model,
            "gen_ai.response.finish_reasons": [completion.finish_reason],
            "gen_ai.usage.input_tokens": completion.input_tokens,
            "gen_ai.usage.output_tokens": completion.output_tokens,
            "costmesh.usage.estimated": completion.usage_estimated,
        }
    )


class ChatStream:
    """An open streamed answer: its text as it comes, then what it cost.

    Usage comes from the final chunk (stream_options.include_usage). A stream cut
    short (the caller cancelled) has none: it is billed on an estimate of what was
    produced, the prompt and the text so far counted with the model's tokenizer.
    """

    def __init__(
        self,
        stream: AsyncStream[ChatCompletionChunk],
        call: ChatCall,
        label: str,
        span: Span,
    ) -> None:
        self._stream = stream
        self._call = call
        self._label = label
        self._span = span
        self._text: list[str] = []
        self._finish_reason = ""
        self._model = call.model
        self._usage: CompletionUsage | None = None
        self.served_model = call.model
        self.attempts = 1
        self.fallback = False

    async def deltas(self) -> AsyncIterator[str]:
        async for chunk in self._stream:
            self._model = chunk.model or self._model
            if chunk.usage is not None:
                self._usage = chunk.usage
            for choice in chunk.choices:
                if choice.finish_reason:
                    self._finish_reason = choice.finish_reason
                if choice.delta.content:
                    self._text.append(choice.delta.content)
                    yield choice.delta.content

    def completion(self) -> Completion:
        content = "".join(self._text)
        usage = self._usage
        details = usage.prompt_tokens_details if usage else None
        return Completion(
            content=content,
            finish_reason=self._finish_reason,
            model=self._model,
            provider=self._label,
            input_tokens=(
                usage.prompt_tokens
                if usage
                else count_prompt_tokens(self._call.messages, self._call.model)
            ),
            cached_input_tokens=(details.cached_tokens or 0) if details else 0,
            output_tokens=(
                usage.completion_tokens if usage else count_text_tokens(content, self._call.model)
            ),
            usage_estimated=usage is None,
            served_model=self.served_model,
            attempts=self.attempts,
            fallback=self.fallback,
        )

    async def close(self) -> Completion:
        """Stop the provider (closing the connection ends its generation) and end the span."""
        try:
            await self._stream.close()
        finally:
            completion = self.completion()
            _finish_span(self._span, completion)
            self._span.set_attribute("costmesh.stream.finished", bool(self._finish_reason))
            self._span.end()
        return completion
