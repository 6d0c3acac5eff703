"""A small labelled ticket set, the artefact trained on it, and a mesh that routes with it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import load_config
from services.common.embedding import MINILM, shared_minilm
from services.inference.simulator import OpenAISimulator
from services.mesh import SERVICES, start_mesh
from services.router.artefact import TierModel
from services.router.tickets import Ticket
from services.router.training import train
from tests.conftest import Mesh, mesh_env

TICKETS = tuple(
    Ticket(text, tier, intent)
    for tier, intent, texts in [
        ("simple", "opening_hours", [
            "What time do you open?", "When does the shop close?", "Are you open on Sunday?",
            "What are your opening hours?", "Is the store open today?",
            "When do you close tonight?",
        ]),
        ("simple", "delivery_period", [
            "How long does delivery take?", "When will my parcel arrive?",
            "How many days is shipping?", "What is the delivery time?",
            "How soon will my order come?", "How long until my package is delivered?",
        ]),
        ("moderate", "change_address", [
            "How do I change my delivery address?", "I need to update my shipping address",
            "Can I edit the address on my account?", "Help me set a new shipping address",
            "How can I change where my orders are sent?", "I moved, how do I update my address?",
        ]),
        ("moderate", "recover_password", [
            "How do I reset my password?", "I forgot my password",
            "Help me recover my account password",
            "I can't remember my password, what do I do?", "Reset my login password please",
            "How can I get a new password?",
        ]),
        ("complex", "payment_dispute", [
            "I was charged twice and the bank says it's your fault",
            "There is a payment on my card I never made, I want it investigated",
            "You took money for an order that was cancelled and refuse to refund it",
            "My card payment failed but the money left my account",
            "I dispute this charge, the amount is wrong and nobody answers",
            "An unknown transaction appeared after my order, explain it",
        ]),
        ("complex", "complaint", [
            "This is the third time my order is wrong and I want to complain formally",
            "Your agent was rude and the product broke, I demand compensation",
            "Nothing works: the app crashes, my order vanished and support ignores me",
            "I am furious, the replacement also arrived damaged",
            "I want to file a complaint about repeated failed deliveries",
            "The device stopped working after the update and the repair was refused",
        ]),
    ]
    for text in texts
)  # fmt: skip


@pytest.fixture(scope="session")
def trained_model() -> TierModel:
    vectors = shared_minilm(None, 2).embed_sync([t.text for t in TICKETS]).vectors
    return train(TICKETS, vectors, MINILM, "router tests").model


@pytest.fixture
def artefact(trained_model: TierModel, tmp_path: Path) -> Path:
    path = tmp_path / "tiers.npz"
    trained_model.save(path)
    return path


@asynccontextmanager
async def routing_mesh(
    simulator: OpenAISimulator, tmp_path: Path, config_text: str
) -> AsyncIterator[Mesh]:
    """The whole mesh on the embedded defaults with `config_text` merged over them,
    its spans recorded."""
    config = tmp_path / "router.toml"
    config.write_text(config_text)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    env = mesh_env(simulator, tmp_path)
    running = await start_mesh(load_config(config, env=env), env, SERVICES, provider, port=0)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield Mesh(running, address, channel, spans, tmp_path)
    finally:
        await channel.close()
        await running.stop(grace=1)
        provider.shutdown()
