"""Retries, Retry-After, fallbacks and cool-downs, against a real provider on loopback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx2 as httpx  # the HTTP client the openai SDK is built on
import openai
import pytest
from opentelemetry.trace import StatusCode

from costmesh.ledger.v1 import ledger_pb2
from costmesh_simulator import OpenAISimulator
from services.common.config import ConfigError, load_config
from services.inference.settings import InferenceSettings
from services.providers.failures import retry_after, retryable
from services.providers.resilience import Cooldowns, RetryPolicy
from tests.clock import Clock
from tests.conftest import AUTH, Mesh, running_mesh, user_request

CONFIG = """
[inference]
max_attempts = 3
retry_base_seconds = 0.01
retry_max_seconds = 0.05
cooldown_failures = 3
cooldown_first_seconds = 600
cooldown_seconds = 600

# A deployment that refuses every connection (the discard port).
[providers.down]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "OPENAI_API_KEY"

[models."gpt-4o-down"]
provider = "down"
context_window = 128000
input_usd_per_mtok = "2.50"
cached_input_usd_per_mtok = "1.25"
output_usd_per_mtok = "10.00"
fallbacks = ["gpt-4o-mini"]

[features.plain]
router = "rules"
cache_mode = "off"

[features.flaky_primary]
router = "rules"
cache_mode = "off"
models.simple = "gpt-4o-down"
"""


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG) as running:
        yield running


def attempt_spans(mesh: Mesh) -> list[tuple[str, object, bool]]:
    return [
        (s.name, s.attributes["costmesh.attempt"], s.status.is_ok)
        for s in mesh.spans.get_finished_spans()
        if s.name.startswith("chat ") and s.attributes
    ]


async def test_a_rate_limited_call_is_retried_and_every_try_is_a_span(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.fail_next(1, status=429, retry_after=0.01)
    simulator.fail_next(1, status=503)

    reply = await mesh.inference.Complete(user_request("Hi", "plain"), metadata=AUTH, timeout=10)

    assert reply.content == "[simulated] Answer to: Hi"
    assert (reply.attempts, reply.fallback) == (3, False)
    assert attempt_spans(mesh) == [
        ("chat gpt-4o-mini", 1, False),
        ("chat gpt-4o-mini", 2, False),
        ("chat gpt-4o-mini", 3, True),
    ]


async def test_a_request_the_provider_refuses_is_not_retried(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.fail_next(1, status=400, message="bad request")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("Hi", "plain"), metadata=AUTH, timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(attempt_spans(mesh)) == 1


async def test_a_failing_deployment_falls_back_then_cools_down(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    first = await mesh.inference.Complete(
        user_request("Hi", "flaky_primary"), metadata=AUTH, timeout=30
    )
    down_tries = [a for a in attempt_spans(mesh) if a[0] == "chat gpt-4o-down"]
    mesh.spans.clear()
    second = await mesh.inference.Complete(
        user_request("Hello", "flaky_primary"), metadata=AUTH, timeout=30
    )
    rows = [
        item.record
        async for item in mesh.ledger.ExportUsage(
            ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=5
        )
    ]

    assert (first.model, first.fallback, first.attempts) == ("gpt-4o-mini", True, 4)
    assert [ok for _, _, ok in down_tries] == [False, False, False]
    # Three failures in a row cooled it down: the next call goes straight to the fallback.
    assert (second.model, second.fallback, second.attempts) == ("gpt-4o-mini", True, 1)
    assert [name for name, _, _ in attempt_spans(mesh)] == ["chat gpt-4o-mini"]
    assert [r.model for r in rows] == ["gpt-4o-mini", "gpt-4o-mini"]  # billed to who answered


def test_a_cooled_down_deployment_gets_one_trial_call_then_recovers() -> None:
    clock = Clock()
    cooldowns = Cooldowns(failures=2, seconds=30, clock=clock)
    cooldowns.failed("m")
    assert cooldowns.available("m")
    assert cooldowns.failed("m")  # the second failure in a row cools it down
    assert not cooldowns.available("m")

    clock.now += 30
    assert cooldowns.available("m")  # the trial call
    assert not cooldowns.available("m")  # only one at a time
    cooldowns.failed("m")  # the trial failed: cooled down again
    assert not cooldowns.available("m")
    clock.now += 30
    assert cooldowns.available("m")
    cooldowns.succeeded("m")
    assert cooldowns.available("m")
    assert cooldowns.available("m")
    assert cooldowns.cooling() == []


def test_backoff_grows_with_jitter_and_never_undercuts_retry_after() -> None:
    policy = RetryPolicy(max_attempts=5, base_seconds=0.5, max_seconds=4)
    rng = random.Random(1)
    delays = [[policy.delay(n, None, rng) for _ in range(200)] for n in (1, 2, 3, 4, 5)]

    assert [max(d) <= c for d, c in zip(delays, (0.5, 1, 2, 4, 4), strict=True)] == [True] * 5
    assert max(delays[3]) > 2  # it grew
    assert len({round(d, 6) for d in delays[0]}) > 100  # jittered, not in lockstep
    assert policy.delay(1, 3.0, rng) >= 3.0


def _status_error(status: int, headers: dict[str, str]) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    response = httpx.Response(status, headers=headers, request=request)
    return openai.APIStatusError("failed", response=response, body=None)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "Thu, 26 Nov 2026 10:00:05 GMT"}, 5.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_in_all_its_forms(
    headers: dict[str, str], seconds: float | None
) -> None:
    now = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC).timestamp()
    assert retry_after(_status_error(429, headers), now=now) == seconds


@pytest.mark.parametrize(
    ("status", "again"),
    [(429, True), (500, True), (503, True), (408, True), (400, False), (401, False)],
)
def test_which_statuses_are_worth_another_try(status: int, again: bool) -> None:
    assert retryable(_status_error(status, {})) is again


async def test_the_callers_deadline_ends_the_provider_call(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.set_latency(30)  # far beyond the caller's patience
    started = asyncio.get_running_loop().time()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("Slow?", "plain"), metadata=AUTH, timeout=0.5)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await mesh.running.stop(grace=1)  # every handler has finished
    # The provider call was abandoned, not waited for the 30 s.
    assert asyncio.get_running_loop().time() - started < 10
    (chat,) = [s for s in mesh.spans.get_finished_spans() if s.name == "chat gpt-4o-mini"]
    # Cut by our own deadline or by the caller's cancellation, whichever came first.
    assert chat.status.status_code == StatusCode.ERROR


def test_cool_downs_start_short_and_double_while_trial_calls_fail() -> None:
    clock = Clock()
    cooldowns = Cooldowns(failures=2, seconds=30, clock=clock, first_seconds=1)
    cooldowns.failed("m")
    cooldowns.failed("m")
    lengths = []
    for _ in range(7):  # the deployment stays down: every trial call fails
        lengths.append(cooldowns.cooled_for("m"))
        clock.now += cooldowns.cooled_for("m")
        assert cooldowns.available("m")
        cooldowns.failed("m")

    assert lengths == [1, 2, 4, 8, 16, 30, 30]


def test_calls_failing_together_start_one_short_cool_down_not_a_long_one() -> None:
    clock = Clock()
    cooldowns = Cooldowns(failures=5, seconds=30, clock=clock, first_seconds=1)

    for _ in range(10):  # calls in flight when the deployment went down, all failing
        cooldowns.failed("m")

    assert cooldowns.cooled_for("m") == 1
    clock.now += 1
    assert cooldowns.available("m")  # the trial call comes after 1 s, not 30


def test_a_provider_back_from_a_ten_second_outage_is_used_again_within_seconds() -> None:
    clock = Clock()
    cooldowns = Cooldowns(failures=5, seconds=30, clock=clock, first_seconds=1)
    back_at, first_success = clock.now + 10, None
    while first_success is None:  # a caller every 100 ms
        if cooldowns.available("m"):
            if clock.now < back_at:
                cooldowns.failed("m")
            else:
                cooldowns.succeeded("m")
                first_success = clock.now
        clock.now += 0.1

    assert first_success - back_at < 8  # with a fixed 30 s cool-down it was over 20


def test_a_trial_call_that_ends_neither_way_lets_the_next_one_through() -> None:
    clock = Clock()
    cooldowns = Cooldowns(failures=1, seconds=30, clock=clock)
    cooldowns.failed("m")
    clock.now += 30
    assert cooldowns.available("m")  # the trial call: say, a 400 or a cancelled caller
    assert not cooldowns.available("m")

    cooldowns.release("m")

    assert cooldowns.available("m")


def test_a_timing_of_zero_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[inference]\nattempt_timeout_seconds = 0\n")

    with pytest.raises(ConfigError, match=r"inference\.attempt_timeout_seconds: must be positive"):
        InferenceSettings.from_config(load_config(config, env={}))
