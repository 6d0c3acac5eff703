"""The guard: refuses close questions of different meaning, keeps true paraphrases."""

from __future__ import annotations

import pytest

from services.cache.guard import refusal


@pytest.mark.parametrize(
    ("query", "candidate", "reason"),
    [
        ("Is port 6379 open?", "Is port 6379 closed?", "polarity"),
        ("Why isn't my card working?", "Why is my card working?", "polarity"),
        ("My card was not accepted", "My card was accepted", "polarity"),
        ("change my name to bob", "can i change your name to bob", "polarity"),
        ("How do I enable notifications?", "How do I disable notifications?", "polarity"),
        ("Can I get a refund of $20?", "Can I get a refund of $200?", "numbers"),
        ("set a 4 minute timer", "set a five minute timer", "numbers"),
        ("Can I pay with Apple Pay?", "Can I pay with Google Pay?", "entities"),
        ("What is the capital of France?", "What is the capital of Spain?", "entities"),
    ],
)
def test_close_questions_of_different_meaning_are_refused(
    query: str, candidate: str, reason: str
) -> None:
    assert refusal(query, candidate) == reason
    assert refusal(candidate, query) == reason  # symmetric


@pytest.mark.parametrize(
    ("query", "candidate"),
    [
        ("How do I reset my password?", "how can I reset my password"),
        ("How do I reset my PIN?", "how do i reset my pin"),
        ("set a 4 minute timer", "set a four minute timer"),
        ("I don't know what this charge is", "I do not know what this charge is"),
        ("Has my transfer been approved yet or not?", "has my transfer been approved yet"),
        ("WHY IS MY CARD BLOCKED", "why is my card blocked"),
        ("I'm abroad, can I use my card?", "I am abroad, can I use my card?"),
        ("Where\u2019s my card? It hasn\u2019t arrived", "Where is my card? It has not arrived"),
    ],
)
def test_paraphrases_pass(query: str, candidate: str) -> None:
    assert refusal(query, candidate) == ""
