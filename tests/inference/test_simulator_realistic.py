"""The simulator's realistic mode through the real openai SDK: latency by model and length,
tokenizer-true usage, reference answers from a knowledge file, wrong answers from small
models on hard questions (and less confidence in them), and settings that fail clearly."""

from __future__ import annotations

import gzip
import json
import logging
import math
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletion
from opentelemetry.sdk.trace import TracerProvider

from costmesh.inference.v1 import inference_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from costmesh_simulator.knowledge import KnowledgeError
from costmesh_simulator.realism import LABEL, PROFILES, WRONG_RATES
from costmesh_simulator.texts import DEFLECTIONS
from costmesh_simulator.wire import RATING_SUFFIX
from services import SERVICES
from services.common.config import ConfigError, load_config
from services.mesh import start_mesh
from services.providers.tokens import count_prompt_tokens, count_text_tokens
from tests.conftest import AUTH, user_request

SMALL, STRONG = "gpt-4o-mini", "gpt-4o"
SYSTEM = "You work for an online store's customer support. Draft the agent's reply."
CLASSIFY = "Classify how hard the request is. Reply with one word: simple, moderate or complex"
LONG_REFERENCE = " ".join(
    f"Step {i}: open the account page, choose the order and confirm the change." for i in range(40)
)
_TAG_PREFIX = "\n[CONFIDENCE: "


def row(question: str, reference: str = "", **fields: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"messages": messages, "reference": reference, **fields}


def write_knowledge(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def intents(count: int, tier: str, labels: int = 20) -> list[dict[str, Any]]:
    """`count` questions over `labels` intents; questions of one intent share its answer."""
    return [
        row(
            f"{tier} question {i}: what happens with request kind {i % labels}?",
            f"For requests of kind {i % labels}, follow procedure {i % labels} in the app.",
            tier=tier,
            label=f"intent-{i % labels}",
        )
        for i in range(count)
    ]


def sdk(sim: OpenAISimulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=30)


def ask(
    client: openai.OpenAI, model: str, question: str, system: str = SYSTEM, **extra: Any
) -> ChatCompletion:
    messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    result: ChatCompletion = client.chat.completions.create(model=model, messages=messages, **extra)
    return result


def text(result: ChatCompletion) -> str:
    return result.choices[0].message.content or ""


def timed(client: openai.OpenAI, model: str, question: str, limit: int) -> tuple[float, float]:
    """(wall seconds, the simulator's openai-processing-ms as seconds) of one call."""
    messages: Any = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    start = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=limit
    )
    wall = time.monotonic() - start
    assert raw.parse().usage is not None
    assert raw.parse().usage.completion_tokens == limit  # type: ignore[union-attr]
    return wall, int(raw.headers["openai-processing-ms"]) / 1000


def test_latency_grows_with_output_tokens_and_differs_by_model(tmp_path: Path) -> None:
    scale = 0.1
    questions = [f"Walk me through changing order {i}" for i in range(3)]
    knowledge = write_knowledge(tmp_path / "k.jsonl", [row(q, LONG_REFERENCE) for q in questions])
    measured: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with OpenAISimulator(realistic=True, latency_scale=scale, knowledge=knowledge) as sim:
        client = sdk(sim)
        for model in (STRONG, SMALL):
            for limit in (10, 300):
                measured[model, limit] = [timed(client, model, q, limit) for q in questions]

    for calls in measured.values():
        for wall, processing in calls:
            assert wall >= processing * 0.98, "the answer never comes before its latency"

    def median(model: str, limit: int, index: int) -> float:
        return statistics.median(call[index] for call in measured[model, limit])

    for model in (STRONG, SMALL):
        nominal = 290 / PROFILES[model].tokens_per_second * scale
        # Output speed jitters by a log-normal of sigma 0.1; wall time adds overheads.
        assert 0.6 * nominal < median(model, 300, 1) - median(model, 10, 1) < 1.5 * nominal
        assert median(model, 300, 0) - median(model, 10, 0) > 0.6 * nominal
    # gpt-4o is slower: 0.45 s + 300/80 tok/s against 0.30 s + 300/120 tok/s, ~1.5x.
    assert 1.2 < median(STRONG, 300, 1) / median(SMALL, 300, 1) < 1.9
    assert median(STRONG, 300, 0) > median(SMALL, 300, 0)


def test_streamed_chunks_are_paced_like_the_plain_answer(tmp_path: Path) -> None:
    knowledge = write_knowledge(tmp_path / "k.jsonl", [row("Long one?", LONG_REFERENCE)])
    with OpenAISimulator(realistic=True, latency_scale=0.1, knowledge=knowledge) as sim:
        client = sdk(sim)
        plain = ask(client, STRONG, "Long one?", max_tokens=200)
        messages: Any = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Long one?"},
        ]
        start = time.monotonic()
        stream = client.chat.completions.create(
            model=STRONG,
            messages=messages,
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
        )
        arrivals, pieces, usage = [], [], None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - start)
                pieces.append(chunk.choices[0].delta.content)

    assert "".join(pieces) == text(plain)
    assert usage is not None
    assert plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens == 200
    assert len(pieces) == 200, "one chunk per token, as OpenAI streams"
    generation = 199 / PROFILES[STRONG].tokens_per_second * 0.1
    assert arrivals[-1] - arrivals[0] > 0.6 * generation
    assert arrivals[0] > 0.45 * 0.1 * math.exp(-0.75), "the first token waits its time"


def test_latency_scale_zero_answers_at_once(tmp_path: Path) -> None:
    knowledge = write_knowledge(tmp_path / "k.jsonl", [row("Long one?", LONG_REFERENCE)])
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        wall, processing = timed(sdk(sim), STRONG, "Long one?", 300)
    assert processing == 0
    assert wall < 2.0  # 4.2 s at scale 1


def test_embeddings_are_fast_and_counted_by_the_tokenizer() -> None:
    with OpenAISimulator(realistic=True) as sim:
        start = time.monotonic()
        result = sdk(sim).embeddings.create(model="text-embedding-3-small", input="Hello, world!")
        wall = time.monotonic() - start
    assert 0.045 < wall < 1.0  # 50 ms, where a chat answer takes seconds
    assert result.usage.prompt_tokens == count_text_tokens(
        "Hello, world!", "text-embedding-3-small"
    )


@pytest.mark.parametrize("limit", [None, 5, 40])
def test_usage_is_the_tokenizers_count_of_the_text(tmp_path: Path, limit: int | None) -> None:
    known = "Where is my parcel? It's been a week — café order #123"
    reference = "Your café order #123 ships today — merci! 😀 " + LONG_REFERENCE
    knowledge = write_knowledge(tmp_path / "k.jsonl", [row(known, reference, tier="simple")])
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        client = sdk(sim)
        for model, question in [(STRONG, known), (SMALL, known), (SMALL, "Unknown question?")]:
            result = ask(client, model, question, max_tokens=limit, logprobs=True)
            content, usage = text(result), result.usage
            assert usage is not None
            messages = [
                types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=SYSTEM),
                types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=question),
            ]
            assert usage.prompt_tokens == count_prompt_tokens(messages, model)
            assert usage.completion_tokens == count_text_tokens(content, model)
            logprobs = result.choices[0].logprobs
            assert logprobs is not None
            assert logprobs.content is not None
            assert len(logprobs.content) == usage.completion_tokens
            assert "".join(t.token for t in logprobs.content) == content
            if limit is not None:
                assert usage.completion_tokens <= limit
            truncated = limit is not None and usage.completion_tokens == limit
            assert result.choices[0].finish_reason == ("length" if truncated else "stop")
            assert content.startswith(LABEL)
            assert result.system_fingerprint == "simulated"


def test_a_strong_model_answers_known_questions_with_their_reference(tmp_path: Path) -> None:
    rows = intents(50, "simple")
    knowledge = write_knowledge(tmp_path / "k.jsonl", rows)
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        client = sdk(sim)
        answers = [text(ask(client, STRONG, r["messages"][1]["content"])) for r in rows]
        cut = text(ask(client, STRONG, rows[0]["messages"][1]["content"], max_tokens=6))

    right = sum(answer == LABEL + r["reference"] for answer, r in zip(answers, rows, strict=True))
    assert right >= 47  # wrong 1% of the time
    assert (LABEL + rows[0]["reference"]).startswith(cut)
    assert count_text_tokens(cut, STRONG) == 6


def judge(
    client: openai.OpenAI, model: str, rows: list[dict[str, Any]], **extra: Any
) -> list[tuple[bool, str, ChatCompletion]]:
    """(wrong, answer without its rating, result) for each question, asked as the mesh does
    when it wants a self-rating."""
    out = []
    for r in rows:
        question = r["messages"][1]["content"] + RATING_SUFFIX
        result = ask(client, model, question, **extra)
        answer = text(result).partition(_TAG_PREFIX)[0]
        out.append((answer != LABEL + r["reference"], answer, result))
    return out


def rating(result: ChatCompletion) -> int:
    return int(text(result).rpartition(_TAG_PREFIX)[2].rstrip("]"))


def mean_logprob(result: ChatCompletion) -> float:
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    return statistics.fmean(t.logprob for t in logprobs.content)


def within_binomial(count: int, n: int, p: float) -> bool:
    """Within four standard deviations of n*p."""
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


def test_a_small_model_is_wrong_on_complex_questions_at_the_rate_and_less_sure(
    tmp_path: Path,
) -> None:
    rows = intents(200, "complex")
    knowledge = write_knowledge(tmp_path / "k.jsonl", rows)
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        client = sdk(sim)
        small = judge(client, SMALL, rows, logprobs=True)
        strong = judge(client, STRONG, rows)
        unrated = [text(ask(client, SMALL, r["messages"][1]["content"])) for r in rows]

    wrong = [item for item in small if item[0]]
    assert within_binomial(len(wrong), 200, WRONG_RATES["small", "complex"])
    assert within_binomial(sum(item[0] for item in strong), 200, WRONG_RATES["strong", "complex"])
    # Asking for a rating does not change the answer.
    assert [answer for _, answer, _ in small] == unrated
    # Wrong but plausible: another intent's answer, or a polite deflection.
    references = {r["reference"] for r in rows}
    for (_, answer, _), r in zip(small, rows, strict=True):
        if answer != LABEL + r["reference"]:
            assert answer.removeprefix(LABEL) in (references - {r["reference"]}) | set(DEFLECTIONS)
    right = [item for item in small if not item[0]]
    assert statistics.fmean(rating(i[2]) for i in wrong) + 2 < statistics.fmean(
        rating(i[2]) for i in right
    )
    # At the default threshold (0.7) the judges would catch most wrong answers, few right ones.
    caught = sum(rating(i[2]) < 7 for i in wrong) / len(wrong)
    false_alarms = sum(rating(i[2]) < 7 for i in right) / len(right)
    assert caught > 0.6
    assert false_alarms < 0.15
    logprob_caught = sum(math.exp(mean_logprob(i[2])) < 0.7 for i in wrong) / len(wrong)
    logprob_alarms = sum(math.exp(mean_logprob(i[2])) < 0.7 for i in right) / len(right)
    assert logprob_caught > 0.6
    assert logprob_alarms < 0.15


def test_moderate_and_simple_questions_are_wrong_less_often(tmp_path: Path) -> None:
    rows = intents(200, "moderate") + intents(200, "simple")
    knowledge = write_knowledge(tmp_path / "k.jsonl", rows)
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        verdicts = judge(sdk(sim), SMALL, rows)
    assert within_binomial(sum(v[0] for v in verdicts[:200]), 200, WRONG_RATES["small", "moderate"])
    assert within_binomial(sum(v[0] for v in verdicts[200:]), 200, WRONG_RATES["small", "simple"])


def test_configured_tiers_decide_which_models_are_small(tmp_path: Path) -> None:
    rows = intents(100, "complex")
    knowledge = write_knowledge(tmp_path / "k.jsonl", rows)
    tiers = {"local-llama": "complex", STRONG: "moderate"}
    with OpenAISimulator(
        realistic=True, latency_scale=0, knowledge=knowledge, model_tiers=tiers
    ) as sim:
        client = sdk(sim)
        llama = sum(v[0] for v in judge(client, "local-llama", rows))
        demoted = sum(v[0] for v in judge(client, STRONG, rows))
    assert within_binomial(llama, 100, WRONG_RATES["strong", "complex"])
    assert within_binomial(demoted, 100, WRONG_RATES["small", "complex"])


def test_unknown_questions_get_generic_answers_that_grow_with_the_question() -> None:
    short = [f"Refund {i}?" for i in range(20)]
    long = [
        f"I ordered item {i} three weeks ago, paid with my card, and the tracking page has "
        "said 'in transit' since then; the seller does not answer my emails and I need it "
        "for a birthday on Saturday. What can I do, and can I get my money back?"
        for i in range(20)
    ]
    with OpenAISimulator(realistic=True, latency_scale=0) as sim:
        client = sdk(sim)
        short_answers = [ask(client, SMALL, q) for q in short]
        long_answers = [ask(client, SMALL, q) for q in long]

    for result in short_answers + long_answers:
        assert text(result).startswith(LABEL)
        assert "Answer to:" not in text(result)
        assert result.usage is not None
        assert 15 <= result.usage.completion_tokens <= 260

    def mean_tokens(results: list[ChatCompletion]) -> float:
        return statistics.fmean(r.usage.completion_tokens for r in results if r.usage)

    assert mean_tokens(long_answers) > mean_tokens(short_answers) + 20


def test_a_classification_prompt_gets_a_one_word_tier(tmp_path: Path) -> None:
    rows = intents(100, "complex")
    knowledge = write_knowledge(tmp_path / "k.jsonl", rows)
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        client = sdk(sim)
        labels = [text(ask(client, SMALL, r["messages"][1]["content"], CLASSIFY)) for r in rows]
        unknown = text(ask(client, SMALL, "Hi", CLASSIFY))
    assert set(labels) <= {"moderate", "complex"}
    assert within_binomial(labels.count("moderate"), 100, 0.15)
    assert unknown == "simple"


def test_one_word_instructions_get_one_of_the_offered_words(tmp_path: Path) -> None:
    decide = "Reply with one word: escalate (disputes, failed payments) or resolve (the rest)."
    rows = [
        row(f"ticket {i}", "escalate" if i % 2 else "resolve", label=f"intent-{i}", tier="complex")
        for i in range(100)
    ]
    for r in rows:
        r["messages"][0]["content"] = decide
    knowledge = write_knowledge(tmp_path / "k.jsonl", rows)
    sentiment = "Rate the sentiment. Reply with one word: positive, neutral or negative."
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        client = sdk(sim)
        moods = {text(ask(client, SMALL, f"unknown {i}", sentiment)) for i in range(30)}
        decisions = [text(ask(client, SMALL, r["messages"][1]["content"], decide)) for r in rows]

    assert moods == {LABEL + word for word in ("positive", "neutral", "negative")}
    wrong = [d for d, r in zip(decisions, rows, strict=True) if d != LABEL + r["reference"]]
    # A wrong one-word answer is the other word, never a deflection or the same word.
    assert set(wrong) <= {LABEL + "escalate", LABEL + "resolve"}
    assert within_binomial(len(wrong), 100, WRONG_RATES["small", "complex"])


def test_the_same_seed_gives_the_same_answers_and_another_seed_others(tmp_path: Path) -> None:
    rows = intents(60, "complex")
    knowledge = write_knowledge(tmp_path / "k.jsonl", rows)

    def answers(seed: int) -> list[str]:
        with OpenAISimulator(
            realistic=True, latency_scale=0, knowledge=knowledge, seed=seed
        ) as sim:
            return [answer for _, answer, _ in judge(sdk(sim), SMALL, rows)]

    first = answers(1)
    assert answers(1) == first
    assert answers(2) != first


def test_a_question_asked_for_another_purpose_is_matched_on_the_whole_conversation(
    tmp_path: Path,
) -> None:
    question = "I want to create a Pro account"
    classify_row = row(question, "create_account", label="create_account", tier="simple")
    classify_row["messages"][0]["content"] = "Reply with the intent name only."
    other_label = row("close it", "delete_account", label="delete_account", tier="simple")
    other_label["messages"][0]["content"] = "Reply with the intent name only."
    reply_row = row(question, "Go to Sign up and pick Pro.", label="create_account", tier="simple")
    knowledge = write_knowledge(tmp_path / "k.jsonl", [classify_row, other_label, reply_row])
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=knowledge) as sim:
        client = sdk(sim)
        intent = text(ask(client, STRONG, question, "Reply with the intent name only."))
        drafted = text(ask(client, STRONG, question))
        without_system = text(
            client.chat.completions.create(
                model=STRONG, messages=[{"role": "user", "content": question}]
            )
        )
    assert intent == LABEL + "create_account"
    assert drafted == LABEL + "Go to Sign up and pick Pro."
    assert without_system == LABEL + "create_account", "else the first line with the question"


def test_knowledge_files_may_be_gzipped(tmp_path: Path) -> None:
    path = tmp_path / "k.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(row("Zipped?", "Yes.", tier="simple")).encode()))
    with OpenAISimulator(realistic=True, latency_scale=0, knowledge=path) as sim:
        assert text(ask(sdk(sim), STRONG, "Zipped?")) == LABEL + "Yes."


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"messages": []}\n', r"k\.jsonl:1: messages: expected"),
        ('\n{"messages": [{"role": "user", "content": "q"}]}\nnot json\n', r"k\.jsonl:3: not JSON"),
        ("[1, 2]\n", r"k\.jsonl:1: expected a JSON object"),
        (
            '{"messages": [{"role": "user", "content": "q"}], "tier": "hard"}\n',
            r"k\.jsonl:1: tier: expected one of simple, moderate, complex, got 'hard'",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}], "reference": 3}\n',
            r"k\.jsonl:1: reference: expected a string, got 3",
        ),
        ('{"messages": [{"role": "system", "content": "s"}]}\n', r"k\.jsonl:1: messages"),
    ],
    ids=["no messages", "not json", "not an object", "tier", "reference", "no user message"],
)
def test_a_malformed_knowledge_line_is_named(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "k.jsonl"
    path.write_text(lines)
    with pytest.raises(KnowledgeError, match=message):
        OpenAISimulator(realistic=True, knowledge=path)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"realistic": True, "latency_scale": -1.0}, r"latency_scale: must be a number >= 0"),
        ({"latency_scale": math.nan}, r"latency_scale: must be a number >= 0"),
        ({"realistic": True, "knowledge": "absent.jsonl"}, r"cannot read absent\.jsonl"),
        ({"knowledge": "k.jsonl"}, r"knowledge: only read in realistic mode"),
        ({"realistic": True, "model_tiers": {"m": "huge"}}, r"model_tiers\['m'\]: expected"),
    ],
    ids=["negative scale", "nan scale", "missing file", "not realistic", "tier"],
)
def test_bad_simulator_arguments_are_named(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpenAISimulator(**arguments)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[simulator]\nlatency_scale = -0.5\n", r"simulator\.latency_scale: must be a number >= 0"),
        ("[simulator]\nrealistic = 'maybe'\n", r"simulator\.realistic: expected true or false"),
        (
            "[simulator]\nrealistic = true\nknowledge = 'absent.jsonl'\n",
            r"simulator\.knowledge: cannot read absent\.jsonl",
        ),
        (
            "[simulator]\nrealistic = true\nknowledge = '{bad}'\n",
            r"simulator\.knowledge: .*bad\.jsonl:2: not JSON",
        ),
        ("[simulator]\nknowledge = '{bad}'\n", r"simulator\.knowledge: only read when"),
        ("[simulator]\nspeed = 2\n", r"simulator\.speed: unknown key"),
        ("[simulator]\nseed = 'x'\n", r"simulator\.seed: expected an integer"),
    ],
    ids=["scale", "realistic", "missing", "malformed", "not realistic", "typo", "seed"],
)
async def test_bad_simulator_settings_fail_the_start_naming_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{oops\n')
    path = tmp_path / "c.toml"
    path.write_text(toml.replace("{bad}", str(bad)))
    env = {"COSTMESH_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=message):
        await start_mesh(load_config(path, env), env, SERVICES, TracerProvider(), port=0)


async def test_keyless_serve_answers_from_the_realistic_simulator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    question = "How do I reset my password?"
    reference = "Open Settings, choose Security, then Reset password and follow the email."
    knowledge = tmp_path / "k.jsonl"
    knowledge.write_text(
        json.dumps(
            {
                "messages": [{"role": "user", "content": question}],
                "reference": reference,
                "tier": "simple",
            }
        )
        + "\n"
    )
    path = tmp_path / "c.toml"
    path.write_text(
        f"[simulator]\nrealistic = true\nlatency_scale = 0\nknowledge = '{knowledge}'\n"
    )
    env = {"COSTMESH_DATA_DIR": str(tmp_path)}  # no OPENAI_API_KEY: the simulator answers
    caplog.set_level(logging.WARNING)
    running = await start_mesh(load_config(path, env), env, SERVICES, TracerProvider(), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            reply = await stub.Complete(user_request(question), metadata=AUTH, timeout=30)
    finally:
        await running.stop(grace=1)

    assert reply.content == LABEL + reference
    assert reply.usage.output_tokens == count_text_tokens(reply.content, reply.model)
    assert "realistic but SIMULATED (1 questions of" in caplog.text


def test_a_script_still_pins_the_answer_streamed_or_not() -> None:
    with OpenAISimulator(realistic=True, latency_scale=0) as sim:
        sim.script(SMALL, "Pinned answer, word for word.")
        client = sdk(sim)
        plain = text(ask(client, SMALL, "anything"))
        messages: Any = [{"role": "user", "content": "anything"}]
        stream = client.chat.completions.create(model=SMALL, messages=messages, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert plain == streamed == "Pinned answer, word for word."
