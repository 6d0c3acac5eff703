"""A streamed chat answer: its text as it comes, then what it cost."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from openai import AsyncStream
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from opentelemetry.trace import Span

from services.providers.tokens import count_prompt_tokens, count_text_tokens
from services.providers.wire import ChatCall, Completion, finish_span, record_call


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
        started: float,
    ) -> None:
        self._stream = stream
        self._started = started
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
            record_call(
                self._call,
                self._label,
                time.perf_counter() - self._started,
                completion,
                "" if self._finish_reason else "stream_incomplete",
            )
            finish_span(self._span, completion)
            self._span.set_attribute("costmesh.stream.finished", bool(self._finish_reason))
            self._span.end()
        return completion
