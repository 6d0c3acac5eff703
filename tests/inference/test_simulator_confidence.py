"""Simulator support for confidence-based escalation and the LLM classifier: scripted answers,
self-ratings, logprobs and complexity labels, all through the real openai SDK on loopback."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionTokenLogprob

from costmesh_simulator import OpenAISimulator, count_tokens

SMALL, LARGE = "gpt-4o-mini", "gpt-4o"
RATE = (
    "After your answer, add one final line of the form [CONFIDENCE: N], where N is a whole "
    "number from 0 to 10 saying how sure you are that the answer is correct."
)
CLASSIFY = (
    "Classify how hard the user's request is to answer well. "
    "Reply with one word: simple, moderate or complex."
)
TAG = re.compile(r"\n\[CONFIDENCE: (\d+)\]\Z")


@pytest.fixture
def sim() -> Iterator[OpenAISimulator]:
    with OpenAISimulator() as simulator:
        yield simulator


@pytest.fixture
def client(sim: OpenAISimulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


def messages(question: str, system: str | None) -> list[Any]:
    system_turn = [{"role": "system", "content": system}] if system else []
    return [*system_turn, {"role": "user", "content": question}]


def ask(
    client: openai.OpenAI, model: str, question: str, system: str | None = None, **extra: Any
) -> ChatCompletion:
    result: ChatCompletion = client.chat.completions.create(
        model=model, messages=messages(question, system), stream=False, **extra
    )
    return result


def text(result: ChatCompletion) -> str:
    return result.choices[0].message.content or ""


def completion_tokens(result: ChatCompletion) -> int:
    assert result.usage is not None
    return result.usage.completion_tokens


def token_logprobs(result: ChatCompletion) -> list[ChatCompletionTokenLogprob]:
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    return logprobs.content


def expected_rating(model: str, question: str) -> int:
    """Recomputed here so a change to the documented formula fails loudly."""
    digest = hashlib.sha256((model + question).encode()).digest()
    return 4 + int(int.from_bytes(digest[:8], "big") / 2**64 * 7)


def test_script_answers_per_model_and_counts_usage(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    scripted = "Paris, probably.\n[CONFIDENCE: 3]"
    sim.script(SMALL, scripted)
    small = ask(client, SMALL, "Capital of France?", RATE)
    large = ask(client, LARGE, "Capital of France?")
    cut = ask(client, SMALL, "Capital of France?", max_tokens=2)
    assert text(small) == scripted  # the script's own tag, untouched
    assert completion_tokens(small) == count_tokens(scripted)
    assert small.choices[0].finish_reason == "stop"
    assert text(large) == "[simulated] Answer to: Capital of France?"
    assert (text(cut), cut.choices[0].finish_reason) == ("Paris,", "length")
    assert completion_tokens(cut) == 2


def test_self_rating_appears_only_when_asked_and_is_deterministic(client: openai.OpenAI) -> None:
    question = "How many moons does Mars have?"
    plain = text(ask(client, SMALL, question))
    rated = [text(ask(client, SMALL, question, RATE)) for _ in range(2)]
    assert plain == f"[simulated] Answer to: {question}"
    assert rated[0] == rated[1] == f"{plain}\n[CONFIDENCE: {expected_rating(SMALL, question)}]"
    ratings = set()
    for i in range(30):
        for model in (SMALL, LARGE):
            match = TAG.search(text(ask(client, model, f"question {i}", RATE)))
            assert match is not None
            ratings.add(int(match.group(1)))
    assert ratings <= set(range(4, 11))
    assert len(ratings) > 1


def test_logprobs_parse_through_the_sdk_and_spell_the_answer(client: openai.OpenAI) -> None:
    question = "  Why is the sky blue?  "
    result = ask(client, SMALL, question, RATE, logprobs=True, top_logprobs=3)
    again = ask(client, SMALL, question, RATE, logprobs=True, top_logprobs=3)
    entries = token_logprobs(result)
    assert "".join(entry.token for entry in entries) == text(result)
    assert len(entries) == count_tokens(text(result)) == completion_tokens(result)
    assert [e.logprob for e in entries] == [e.logprob for e in token_logprobs(again)]
    for entry in entries:
        assert -1.5 <= entry.logprob <= -0.01
        assert bytes(entry.bytes or []).decode() == entry.token
        top = entry.top_logprobs
        assert [len(top), top[0].token, top[0].logprob] == [3, entry.token, entry.logprob]
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert math.fsum(math.exp(t.logprob) for t in top) <= 1.0
    assert ask(client, SMALL, question).choices[0].logprobs is None


def test_scripted_token_logprob_applies_to_every_token(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    sim.script(LARGE, "It is 42.\n[CONFIDENCE: 9]", token_logprob=-0.05)
    result = ask(client, LARGE, "Meaning of life?", logprobs=True, max_tokens=4)
    entries = token_logprobs(result)
    assert "".join(e.token for e in entries) == text(result) == "It is 42."
    assert [e.logprob for e in entries] == [-0.05] * 4
    assert all(e.top_logprobs == [] for e in entries)
    sim.script(LARGE, "Sure.", token_logprob=0.0)
    certain = token_logprobs(ask(client, LARGE, "x", logprobs=True, top_logprobs=2))
    assert [[t.logprob for t in e.top_logprobs] for e in certain] == [[0.0, -9999.0]] * 2


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"extra_body": {"logprobs": "yes"}}, "logprobs"),
    ],
)
def test_bad_logprob_options_are_a_bad_request(
    sim: OpenAISimulator, client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, SMALL, "hi", **extra)
    assert caught.value.param == param
    assert sim.call_count == 0


def test_streamed_chunks_carry_the_logprobs_of_their_text(client: openai.OpenAI) -> None:
    question = "Stream, with logprobs!"
    plain = ask(client, SMALL, question, RATE, logprobs=True)
    stream = client.chat.completions.create(
        model=SMALL, messages=messages(question, RATE), logprobs=True, stream=True
    )
    pieces = [c.choices[0] for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    streamed: list[ChatCompletionTokenLogprob] = []
    for piece in pieces:
        assert piece.logprobs is not None
        assert piece.logprobs.content is not None
        assert "".join(e.token for e in piece.logprobs.content) == piece.delta.content
        streamed.extend(piece.logprobs.content)
    assert streamed == token_logprobs(plain)


@pytest.mark.parametrize(
    ("length", "label"), [(1, "simple"), (59, "simple"), (60, "moderate"), (139, "moderate")]
)
def test_classifier_labels_by_question_length(
    client: openai.OpenAI, length: int, label: str
) -> None:
    result = ask(client, SMALL, "q" * length, CLASSIFY)
    assert text(result) == label
    assert completion_tokens(result) == 1


def test_classifier_says_complex_for_long_questions_unless_scripted(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    question = "Explain, step by step, " + "why " * 40
    assert len(question) >= 140
    assert text(ask(client, SMALL, question, CLASSIFY)) == "complex"
    sim.script(SMALL, "moderate")
    assert text(ask(client, SMALL, question, CLASSIFY)) == "moderate"


def test_reset_clears_scripts(sim: OpenAISimulator, client: openai.OpenAI) -> None:
    sim.script(SMALL, "scripted")
    assert text(ask(client, SMALL, "hello")) == "scripted"
    sim.reset()
    assert text(ask(client, SMALL, "hello")) == "[simulated] Answer to: hello"


@pytest.mark.parametrize(
    ("model", "token_logprob"), [("", None), (SMALL, 0.1), (SMALL, math.nan), (SMALL, -math.inf)]
)
def test_script_rejects_impossible_values(
    sim: OpenAISimulator, model: str, token_logprob: float | None
) -> None:
    with pytest.raises(ValueError, match="must be"):
        sim.script(model, "x", token_logprob=token_logprob)
