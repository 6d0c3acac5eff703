"""The simulated provider, exercised through the real openai SDK the way the mesh will call it."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from costmesh_simulator import OpenAISimulator, count_tokens

MODEL = "gpt-4o-mini"


@pytest.fixture
def sim() -> Iterator[OpenAISimulator]:
    with OpenAISimulator() as simulator:
        yield simulator


def async_client(sim: OpenAISimulator, api_key: str = "x", **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=api_key, max_retries=0, **kwargs)


def sync_client(sim: OpenAISimulator, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, **kwargs)


def raw_request(
    sim: OpenAISimulator, method: str, path: str, body: bytes = b"", auth: str | None = "Bearer x"
) -> tuple[int, dict[str, Any]]:
    """Bypass the SDK to reach error paths it would never produce itself."""
    url = urlsplit(sim.base_url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
    try:
        conn.request(method, url.path + path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_count_tokens_splits_words_and_punctuation() -> None:
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("  ") == 0


@pytest.mark.asyncio
async def test_chat_usage_follows_count_tokens(sim: OpenAISimulator) -> None:
    system, user = "You are terse.", "What is 2+2?"
    async with async_client(sim) as client:
        result = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            temperature=0.2,
        )
    answer = result.choices[0].message.content
    assert answer == f"[simulated] Answer to: {user}"
    assert result.choices[0].finish_reason == "stop"
    assert result.model == MODEL
    assert result.usage is not None
    prompt = count_tokens(system) + 4 + count_tokens(user) + 4
    assert result.usage.prompt_tokens == prompt
    assert result.usage.completion_tokens == count_tokens(answer)
    assert result.usage.total_tokens == prompt + count_tokens(answer)
    assert sim.call_count == 1
    assert [r["model"] for r in sim.requests] == [MODEL]


def test_text_parts_are_counted_like_plain_text(sim: OpenAISimulator) -> None:
    with sync_client(sim) as client:
        result = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": "ping pong"}]}],
        )
    assert result.choices[0].message.content == "[simulated] Answer to: ping pong"
    assert result.usage is not None
    assert result.usage.prompt_tokens == count_tokens("ping pong") + 4


@pytest.mark.asyncio
@pytest.mark.parametrize("limit_param", ["max_tokens", "max_completion_tokens"])
async def test_token_limit_truncates_with_length_finish(
    sim: OpenAISimulator, limit_param: str
) -> None:
    limits: dict[str, Any] = {limit_param: 3}
    async with async_client(sim) as client:
        result = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "tell me a long story"}],
            **limits,
        )
    assert result.choices[0].message.content == "[simulated]"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 3


@pytest.mark.asyncio
async def test_stream_replays_the_plain_answer_with_usage(sim: OpenAISimulator) -> None:
    messages: Any = [{"role": "user", "content": "Stream this, please."}]
    async with async_client(sim) as client:
        plain = await client.chat.completions.create(model=MODEL, messages=messages)
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain.usage
    assert sim.call_count == 2


def test_sync_stream_reports_truncation_and_keeps_connection_usable(sim: OpenAISimulator) -> None:
    with sync_client(sim) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
        chunks = list(stream)
        after = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "[simulated"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    assert after.choices[0].finish_reason == "stop"


@pytest.mark.asyncio
async def test_rate_limit_is_raised_once_then_calls_succeed(sim: OpenAISimulator) -> None:
    sim.fail_next(1, 429, retry_after=1, message="slow down")
    messages: Any = [{"role": "user", "content": "hello"}]
    async with async_client(sim) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=messages)
        result = await client.chat.completions.create(model=MODEL, messages=messages)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    assert "slow down" in caught.value.message
    assert result.choices[0].finish_reason == "stop"
    assert sim.call_count == 1
    assert len(sim.requests) == 2


@pytest.mark.asyncio
async def test_wrong_api_key_is_an_authentication_error() -> None:
    with OpenAISimulator(api_key="right") as keyed:
        messages: Any = [{"role": "user", "content": "hello"}]
        async with async_client(keyed) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.chat.completions.create(model=MODEL, messages=messages)
        async with async_client(keyed, api_key="right") as good:
            await good.chat.completions.create(model=MODEL, messages=messages)
    assert caught.value.code == "invalid_api_key"
    assert keyed.call_count == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "messages", "param"),
    [(MODEL, [], "messages"), ("", [{"role": "user", "content": "hi"}], "model")],
)
async def test_invalid_chat_request_is_a_bad_request(
    sim: OpenAISimulator, model: str, messages: Any, param: str
) -> None:
    async with async_client(sim) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=model, messages=messages)
    assert caught.value.param == param
    assert sim.call_count == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("encoding", ["float", None])
async def test_embeddings_are_deterministic_unit_vectors(
    sim: OpenAISimulator, encoding: Any
) -> None:
    extra: dict[str, Any] = {"encoding_format": encoding} if encoding else {}
    async with async_client(sim) as client:
        result = await client.embeddings.create(
            model="text-embedding-3-small", input=["same text", "same text"], dimensions=16, **extra
        )
        single = await client.embeddings.create(model="text-embedding-3-small", input="same text")
    first, second = (item.embedding for item in result.data)
    assert len(first) == 16
    assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-5)
    assert first == second
    assert len(single.data[0].embedding) == 64
    assert result.usage.prompt_tokens == 2 * count_tokens("same text")


def test_similar_texts_embed_closer_than_unrelated_ones(sim: OpenAISimulator) -> None:
    with sync_client(sim) as client:
        result = client.embeddings.create(
            model="text-embedding-3-small",
            input=["the cat sat on the mat", "The cat sat on a mat", "quarterly revenue forecast"],
        )
    base, similar, unrelated = (item.embedding for item in result.data)
    assert cosine(base, similar) > cosine(base, unrelated) + 0.3


@pytest.mark.asyncio
async def test_failures_apply_to_embeddings(sim: OpenAISimulator) -> None:
    sim.fail_next(1, 503)
    async with async_client(sim) as client:
        with pytest.raises(openai.InternalServerError):
            await client.embeddings.create(model="text-embedding-3-small", input="x")
        await client.embeddings.create(model="text-embedding-3-small", input="x")


@pytest.mark.asyncio
async def test_latency_beyond_client_timeout_raises_timeout(sim: OpenAISimulator) -> None:
    sim.set_latency(0.3)
    async with async_client(sim, timeout=0.1) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )


@pytest.mark.asyncio
async def test_requests_are_served_concurrently(sim: OpenAISimulator) -> None:
    # Six 0.2 s answers fit a 1 s timeout only if the server overlaps them.
    sim.set_latency(0.2)
    async with async_client(sim, timeout=1.0) as client:
        results = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"q{i}"}]
                )
                for i in range(6)
            )
        )
    assert [r.choices[0].message.content for r in results] == [
        f"[simulated] Answer to: q{i}" for i in range(6)
    ]
    assert sim.call_count == 6


def test_models_are_listed(sim: OpenAISimulator) -> None:
    with sync_client(sim) as client:
        ids = [model.id for model in client.models.list()]
    assert ids == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (("POST", "/nope", b"{}", "Bearer x"), 404, "unknown_url"),
        (("POST", "/chat/completions", b"{not json", "Bearer x"), 400, None),
        (("GET", "/models", b"", None), 401, "invalid_api_key"),
    ],
)
def test_protocol_errors_use_openai_error_bodies(
    sim: OpenAISimulator, call: tuple[str, str, bytes, str | None], status: int, code: str | None
) -> None:
    got_status, payload = raw_request(sim, *call)
    assert got_status == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == code


def test_reset_and_lifecycle(sim: OpenAISimulator) -> None:
    sim.fail_next(3)
    sim.set_latency(5)
    sim.reset()
    with sync_client(sim) as client:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}])
    assert sim.call_count == 1
    sim.reset()
    assert (sim.call_count, sim.requests) == (0, [])
    sim.stop()
    sim.stop()
    with pytest.raises(RuntimeError):
        _ = sim.base_url
