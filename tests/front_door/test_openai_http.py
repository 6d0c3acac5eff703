"""The OpenAI SDK, pointed at the mesh with only base_url and the key changed."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.trace import SpanKind

from costmesh_simulator import OpenAISimulator
from services.front_door.app import MAX_BODY_BYTES
from tests.conftest import DEMO_KEY, Mesh, ledger_rows, running_mesh
from tests.test_node_client import ROOT, node_or_skip

CONFIG = """
[features.capped]
router = "rules"
cache_mode = "off"
max_tokens_default = 20

[teams.poor]
daily_usd = "0.000001"

[[auth.keys]]
team = "demo"
role = "admin"
sha256 = "47a6045eb3aa6a2edbaa67b4e97cbc6761bb966681d0a6c10c4e96ae2636018b"

[[auth.keys]]
team = "poor"
role = "member"
sha256 = "5827292fbc750dd09477ff8e17af40dd01191733edf85d338bb8c5ef6fd7dd04"
"""
POOR_KEY = "cm-poor-team-key"  # the digest above


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG, http=True) as running:
        yield running


def base_url(mesh: Mesh) -> str:
    return f"http://127.0.0.1:{mesh.running.http_port}/v1"


def client(mesh: Mesh, key: str = DEMO_KEY) -> AsyncOpenAI:
    """Use as `async with`, so its connections close with the test."""
    return AsyncOpenAI(base_url=base_url(mesh), api_key=key, max_retries=0)


@pytest.fixture
async def sdk(mesh: Mesh) -> AsyncIterator[AsyncOpenAI]:
    async with client(mesh) as opened:
        yield opened


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


async def test_a_chat_call_is_answered_billed_cached_and_labelled(
    mesh: Mesh, sdk: AsyncOpenAI
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?")
    )
    first = raw.parse()
    headers = raw.headers

    assert first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content
    assert first.choices[0].finish_reason == "stop"
    assert first.model == "gpt-4o-mini"
    assert first.usage is not None
    assert first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert headers["x-costmesh-cached"] == "false"
    assert int(headers["x-costmesh-cost-nano-usd"]) > 0
    assert len(headers["x-costmesh-trace-id"]) == 32
    assert headers["x-costmesh-tier"] in {"simple", "moderate", "complex"}
    request_id = headers["x-costmesh-request-id"]
    assert first.id == f"chatcmpl-{request_id}"

    again = await sdk.chat.completions.with_raw_response.create(
        model="auto", messages=ask("How do I reset my password?")
    )
    assert again.headers["x-costmesh-cached"] == "true"
    assert again.headers["x-costmesh-cache-outcome"] == "exact"
    assert again.headers["x-costmesh-cost-nano-usd"] == "0"
    assert again.headers["x-costmesh-cache-entry-id"]
    assert again.parse().choices[0].message.content == first.choices[0].message.content

    rows = {r.request_id: r for r in await ledger_rows(mesh)}
    assert rows[request_id].feature == "default"
    assert rows[request_id].team == "demo"
    assert rows[request_id].cost_nano_usd == int(headers["x-costmesh-cost-nano-usd"])


async def test_openai_parameters_reach_the_provider(
    sdk: AsyncOpenAI, simulator: OpenAISimulator
) -> None:
    await sdk.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "developer", "content": "Be brief."}, *ask("Name a colour")],
        max_completion_tokens=7,
        stop=["\n"],
        seed=42,
        temperature=0.3,
        response_format={"type": "json_object"},
        extra_headers={"x-costmesh-feature": "capped"},
    )
    sent = simulator.requests[-1]
    assert sent["model"] == "gpt-4o"  # a configured model name pins the model
    assert sent["max_tokens"] == 7
    assert sent["stop"] == ["\n"]
    assert sent["seed"] == 42
    assert sent["temperature"] == 0.3
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_a_stream_arrives_in_chunks_with_usage_and_the_costmesh_summary(
    sdk: AsyncOpenAI,
) -> None:
    stream = await sdk.chat.completions.create(
        model="auto",
        messages=ask("Tell me about refunds"),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-costmesh-cache": "no-store"},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens > 0
    summary = (last.model_extra or {})["costmesh"]
    assert summary["cached"] == "false"
    assert int(summary["cost-nano-usd"]) > 0

    whole = await sdk.chat.completions.create(
        model="auto",
        messages=ask("Tell me about refunds"),
        extra_headers={"x-costmesh-cache": "no-cache,no-store"},
    )
    assert text == whole.choices[0].message.content


async def test_costmesh_controls_come_from_headers_or_metadata(
    mesh: Mesh, sdk: AsyncOpenAI
) -> None:
    by_header = await sdk.chat.completions.with_raw_response.create(
        model="auto",
        messages=ask("What are your opening hours?"),
        extra_headers={"x-costmesh-feature": "capped", "x-costmesh-request-id": "hdr-1"},
    )
    by_metadata = await sdk.chat.completions.with_raw_response.create(
        model="auto",
        messages=ask("What are your opening hours today?"),
        metadata={"costmesh_feature": "capped", "costmesh_request_id": "meta-1"},
    )
    bypass = await sdk.chat.completions.with_raw_response.create(
        model="auto",
        messages=ask("What are your opening hours?"),
        extra_headers={"x-costmesh-cache": "no-cache"},
    )

    rows = {r.client_request_id: r for r in await ledger_rows(mesh)}
    assert by_header.headers["x-costmesh-request-id"] == "hdr-1"
    assert by_metadata.headers["x-costmesh-request-id"] == "meta-1"
    assert rows["hdr-1"].feature == "capped"
    assert rows["meta-1"].feature == "capped"
    assert bypass.headers["x-costmesh-cache-outcome"] == "bypass"


@pytest.mark.parametrize(
    "case",
    [
        ({"model": "no-such-model"}, openai.NotFoundError, "model"),
        ({"temperature": 5}, openai.BadRequestError, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]},
         openai.BadRequestError, "tools"),
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"messages": []}, openai.BadRequestError, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, openai.BadRequestError,
         "messages[0].role"),
        ({"extra_headers": {"x-costmesh-feature": "nope"}}, openai.BadRequestError, "feature"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors_naming_the_parameter(
    mesh: Mesh,
    sdk: AsyncOpenAI,
    simulator: OpenAISimulator,
    case: tuple[dict[str, object], type[openai.APIStatusError], str],
) -> None:
    fields, error, param = case
    request: dict[str, object] = {"model": "auto", "messages": ask("hello"), **fields}
    with pytest.raises(error) as caught:
        await sdk.chat.completions.create(**request)  # type: ignore[call-overload]
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == param
    assert body["message"]
    assert simulator.call_count == 0  # nothing was sent, nothing billed
    assert await ledger_rows(mesh) == []


async def test_keys_and_budgets_answer_with_openai_status_codes(mesh: Mesh) -> None:
    async with client(mesh, "not-a-key") as stranger, client(mesh, POOR_KEY) as poor:
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.create(model="auto", messages=ask("x"))
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()
        with pytest.raises(openai.RateLimitError) as over:
            await poor.chat.completions.create(
                model="auto", messages=ask("Explain the refund policy in detail")
            )
    assert isinstance(over.value.body, dict)
    assert "budget" in over.value.body["message"]
    assert over.value.body["code"] == "insufficient_quota"  # OpenAI's, as clients expect
    assert over.value.body["costmesh_reason"] == "TEAM_BUDGET_EXCEEDED"
    assert over.value.response.headers["x-costmesh-error-reason"] == "TEAM_BUDGET_EXCEEDED"


async def test_models_lists_auto_and_every_configured_model(sdk: AsyncOpenAI) -> None:
    listed = [m.id async for m in sdk.models.list()]
    assert listed[0] == "auto"
    assert {"gpt-4o", "gpt-4o-mini"} <= set(listed)
    assert (await sdk.models.retrieve("gpt-4o")).id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("no-such-model")


async def test_malformed_bodies_and_unknown_routes_get_json_errors(mesh: Mesh) -> None:
    headers = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=base_url(mesh), headers=headers) as http:
        broken = await http.post("/chat/completions", content=b"{not json")
        elsewhere = await http.post("/embeddings", content=b"{}")
        unknown = await http.post(
            "/chat/completions",
            content=json.dumps({"model": "auto", "messages": ask("x"), "colour": "red"}),
        )
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json()["error"]["message"]
    assert elsewhere.status_code == 404
    assert elsewhere.json()["error"]["code"] == "unknown_url"
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "colour"


async def test_the_http_span_parents_the_call_and_continues_the_callers_trace(
    mesh: Mesh, sdk: AsyncOpenAI
) -> None:
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    await sdk.chat.completions.create(
        model="auto",
        messages=ask("Where is my parcel?"),
        extra_headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"},
    )
    spans = mesh.spans.get_finished_spans()
    http = next(s for s in spans if s.name == "POST /v1/chat/completions")
    complete = next(s for s in spans if s.name.endswith("InferenceService/Complete"))

    assert http.kind == SpanKind.SERVER
    assert http.attributes is not None
    assert http.attributes["costmesh.transport"] == "http"
    assert http.attributes["http.response.status_code"] == 200
    assert format(http.context.trace_id, "032x") == caller_trace
    assert complete.parent is not None
    assert complete.parent.span_id == http.context.span_id


async def test_the_node_openai_sdk_chats_streams_and_reads_errors(mesh: Mesh) -> None:
    node = node_or_skip("openai")
    process = await asyncio.create_subprocess_exec(
        node,
        str(ROOT / "tests" / "node" / "openai_sdk.mjs"),
        env={**os.environ, "COSTMESH_BASE_URL": base_url(mesh), "COSTMESH_API_KEY": DEMO_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    seen = json.loads(out)

    assert seen["first"]["cached"] == "false"
    assert int(seen["first"]["cost"]) > 0
    assert seen["second"]["cached"] == "true"
    assert seen["second"]["cost"] == "0"
    assert seen["second"]["content"] == seen["first"]["content"]
    assert len(seen["stream"]["pieces"]) > 1
    assert seen["stream"]["usage"]["completion_tokens"] > 0
    assert seen["missing"] == {"status": 404, "param": "model", "code": "model_not_found"}


async def test_a_stranger_is_refused_before_the_body_is_read_and_bodies_are_capped(
    mesh: Mesh,
) -> None:
    url = f"{base_url(mesh)}/chat/completions"
    async with httpx.AsyncClient() as http:
        stranger = await http.post(
            url, content=b"{not even json", headers={"authorization": "Bearer nobody"}
        )
        probing = await http.post(
            url,
            json={"model": "no-such-model", "messages": ask("x")},
            headers={"authorization": "Bearer nobody"},
        )
        huge = await http.post(
            url,
            content=b" " * (MAX_BODY_BYTES + 1),
            headers={"authorization": f"Bearer {DEMO_KEY}"},
        )
        bad_age = await http.post(
            url,
            json={"model": "auto", "messages": ask("x")},
            headers={
                "authorization": f"Bearer {DEMO_KEY}",
                "x-costmesh-cache-max-age": "99999999999999999999",
            },
        )
    assert stranger.status_code == probing.status_code == 401  # no model names leak
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "request_too_large"
    assert bad_age.status_code == 400
    assert bad_age.json()["error"]["param"] == "x-costmesh-cache-max-age"
