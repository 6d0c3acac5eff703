"""The guard: refuses close questions of different meaning, keeps true paraphrases.

The paraphrase cases include each refusal a held-out SaaS support set found in the
old guard ("get a new one" read as the number 1; SSO, SAML and PayPal read as
names; an incidental "can't" read as a flipped question), and the refusal cases the
identifier it let through (ref-abc123b answered with ref-abc123a's answer)."""

from __future__ import annotations

import pytest

from services.cache.guard import refusal


@pytest.mark.parametrize(
    ("query", "candidate", "reason"),
    [
        ("Is port 6379 open?", "Is port 6379 closed?", "polarity"),
        ("Why isn't my card working?", "Why is my card working?", "polarity"),
        ("My card was not accepted", "My card was accepted", "polarity"),
        ("Why wasn't my transfer approved?", "Why was my transfer approved?", "polarity"),
        ("I did not receive my card", "I received my card", "polarity"),
        ("change my name to bob", "can i change your name to bob", "polarity"),
        ("How do I enable notifications?", "How do I disable notifications?", "polarity"),
        ("Can I get a refund of $20?", "Can I get a refund of $200?", "numbers"),
        ("set a 4 minute timer", "set a five minute timer", "numbers"),
        ("Where is order 10442?", "Where is order 10443?", "numbers"),
        ("Is my payment due on March 3?", "Is my payment due on March 4?", "numbers"),
        ("Is my invoice due in March?", "Is my invoice due in April?", "numbers"),
        ("Send the invoice for 2026-11-03", "Send the invoice for 2026-11-04", "numbers"),
        (
            "What is the status of order ref-abc123b?",
            "What is the status of order ref-abc123a?",
            "identifiers",
        ),
        ("Status of ticket INC-2231?", "Status of ticket INC-2213?", "identifiers"),
        (
            "Reset the password of ann@example.com",
            "Reset the password of bob@example.com",
            "identifiers",
        ),
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
        ("why is my card not working", "my card does not work, why"),
        # "one" is a pronoun here, not the number 1
        ("My card is broken, how do I get a new one?", "How can I get a replacement card?"),
        # an acronym one side spells out, or a name only one side gives
        ("How do I set up SSO?", "how do I configure single sign-on"),
        ("Does SAML work with our login?", "Is single sign-on supported for logging in?"),
        ("Do you accept PayPal?", "which payment methods can I use"),
        # an incidental negation: nothing the other question asks is negated
        ("I can't log in, how do I reset my password?", "How do I reset my password?"),
        ("I don't remember it: how do I change my PIN?", "how do I change my PIN"),
        # the same identifier and amount on both sides
        ("Where is order ref-abc123b?", "status of order REF-ABC123B"),
        ("Can I get a refund of $20?", "how do I get my $20 back"),
    ],
)
def test_paraphrases_pass(query: str, candidate: str) -> None:
    assert refusal(query, candidate) == ""
    assert refusal(candidate, query) == ""
