"""A small labelled ticket set and the artefact trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from costmesh_tools.router.tickets import Ticket
from costmesh_tools.router.training import train
from services.common.embedding import shared_encoder
from services.router.artefact import TierModel

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
    encoder = shared_encoder(None, 2)
    vectors = encoder.embed_sync([t.text for t in TICKETS]).vectors
    return train(TICKETS, vectors, encoder.model, "router tests").model


@pytest.fixture
def artefact(trained_model: TierModel, tmp_path: Path) -> Path:
    path = tmp_path / "tiers.npz"
    trained_model.save(path)
    return path
