"""The keyless demo's stand-in provider: started by the composition root for providers
without a key, and keeping nothing per call however long it runs."""

from __future__ import annotations

import openai

from costmesh_simulator.stand_in import start_stand_ins
from services.common.config import load_config


async def test_a_keyless_provider_gets_a_stand_in_that_keeps_no_request_bodies() -> None:
    stand_ins = start_stand_ins(load_config(env={}), env={})
    try:
        (simulator,) = stand_ins.simulators
        client = openai.AsyncOpenAI(
            api_key="simulated", base_url=stand_ins.base_urls["openai"], max_retries=0
        )
        for _ in range(3):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 50_000}]
            )
        await client.close()

        assert simulator.call_count == 3
        assert simulator.requests == []
    finally:
        stand_ins.stop()


def test_a_provider_with_its_key_gets_no_stand_in() -> None:
    stand_ins = start_stand_ins(load_config(env={}), env={"OPENAI_API_KEY": "sk-real"})

    assert stand_ins.simulators == []
    assert stand_ins.base_urls == {}
