"""The keyless demo's stand-in provider: started by the composition root for providers
without a key, and keeping nothing per call however long it runs."""

from __future__ import annotations

from pathlib import Path

import openai

from costmesh_simulator.stand_in import model_tiers, start_stand_ins
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


def test_routing_a_known_model_to_complex_tickets_does_not_make_it_strong(tmp_path: Path) -> None:
    all_small = tmp_path / "all-small.toml"
    all_small.write_text(
        "[features.default]\n"
        'models = { simple = "gpt-4o-mini", moderate = "gpt-4o-mini", complex = "gpt-4o-mini" }\n'
        '[models.self-hosted]\nprovider = "openai"\ngpu_usd_per_hour = "2"\n'
        "output_tokens_per_second = 100\n"
        '[features.local]\nmodels = { simple = "self-hosted", complex = "self-hosted" }\n'
    )

    tiers = model_tiers(load_config(all_small, env={}))

    # gpt-4o-mini answers complex tickets as the small model it is (the quality gate
    # must see an all-small policy's cost); a model the simulator does not know takes
    # the highest tier a feature uses it for.
    assert tiers["gpt-4o-mini"] == "simple"
    assert tiers["gpt-4o"] == "complex"
    assert tiers["self-hosted"] == "complex"
