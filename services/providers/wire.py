"""The OpenAI wire shapes costmesh sends and reads: a chat call, its completion."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat
from opentelemetry import metrics
from opentelemetry.trace import Span

from costmesh.types.v1 import types_pb2
from services.providers.tokens import count_prompt_tokens

log = logging.getLogger(__name__)

ROLES = {
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
    seed: int | None = None


def completion_from(response: ChatCompletion, call: ChatCall, label: str) -> Completion:
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


def request_fields(call: ChatCall, time_limit: float) -> dict[str, Any]:
    """What every chat request sends, streamed or not."""
    return {
        "model": call.model,
        "messages": to_openai(call.messages),
        "max_tokens": call.max_tokens,
        "temperature": call.temperature,
        "top_p": call.top_p,
        "stop": call.stop or None,
        "seed": call.seed,
        "response_format": openai.omit if call.response_format is None else call.response_format,
        "timeout": time_limit,
    }


def chat_body(call: ChatCall) -> dict[str, Any]:
    """A non-streamed chat request as JSON, with only the fields that are set."""
    body: dict[str, Any] = {
        "model": call.model,
        "messages": to_openai(call.messages),
        "max_tokens": call.max_tokens,
    }
    optional = {
        "temperature": call.temperature,
        "top_p": call.top_p,
        "stop": call.stop or None,
        "response_format": call.response_format,
        "logprobs": call.logprobs or None,
        "seed": call.seed,
    }
    body.update((k, v) for k, v in optional.items() if v is not None)
    return body


def to_openai(messages: Sequence[types_pb2.ChatMessage]) -> list[ChatCompletionMessageParam]:
    return [
        cast("ChatCompletionMessageParam", {"role": ROLES[m.role], "content": m.content})
        for m in messages
    ]


_METER = metrics.get_meter("costmesh.providers")
# The GenAI client conventions, with their advised buckets.
_TOKENS = _METER.create_histogram(
    "gen_ai.client.token.usage",
    unit="{token}",
    description="Tokens a provider billed per call, by type (input, output)",
    explicit_bucket_boundaries_advisory=[4.0**i for i in range(14)],
)
_DURATION = _METER.create_histogram(
    "gen_ai.client.operation.duration",
    unit="s",
    description="Duration of each provider call (every try, retries and fallbacks included)",
    explicit_bucket_boundaries_advisory=[0.01 * 2**i for i in range(14)],
)


def record_call(
    call: ChatCall, label: str, seconds: float, completion: Completion | None, error: str = ""
) -> None:
    """One try at a provider, as the GenAI metrics count it."""
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": label,
        "gen_ai.request.model": call.model,
    }
    if error:
        attributes["error.type"] = error
    if completion is not None:
        attributes["gen_ai.response.model"] = completion.model
        _TOKENS.record(completion.input_tokens, {**attributes, "gen_ai.token.type": "input"})
        _TOKENS.record(completion.output_tokens, {**attributes, "gen_ai.token.type": "output"})
    _DURATION.record(seconds, attributes)


def finish_span(span: Span, completion: Completion) -> None:
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
