"""The simulator's Files and Batch APIs and its failure controls, through the real openai SDK."""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from costmesh_simulator import OpenAISimulator, count_tokens

MODEL = "gpt-4o-mini"


@pytest.fixture
def sim() -> Iterator[OpenAISimulator]:
    with OpenAISimulator() as simulator:
        yield simulator


@pytest.fixture
def client(sim: OpenAISimulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


def line(custom_id: str, text: str, model: str = MODEL, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, **body},
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def start_batch(client: openai.OpenAI, data: bytes, **extra: Any) -> Any:
    uploaded = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **extra,
    )


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def ask(client: openai.OpenAI, model: str = MODEL) -> str:
    messages: Any = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=model, messages=messages)
    return reply.choices[0].message.content or ""


def test_an_upload_reads_back_byte_for_byte(client: openai.OpenAI) -> None:
    data = jsonl(line("a", "héllo\r\nwörld"))

    uploaded = client.files.create(file=("input.jsonl", data), purpose="batch")

    assert (uploaded.object, uploaded.purpose, uploaded.bytes) == ("file", "batch", len(data))
    assert uploaded.filename == "input.jsonl"
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == data
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_an_upload_sent_in_chunks_is_taken_whole(sim: OpenAISimulator) -> None:
    data = jsonl(line("a", "chunked"))
    boundary = "simulator-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    url = urlsplit(sim.base_url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    headers = {
        "Authorization": "Bearer x",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Transfer-Encoding": "chunked",
    }
    try:
        conn.request("POST", url.path + "/files", body=iter([body[:50], body[50:]]),
                     headers=headers, encode_chunked=True)  # fmt: skip
        response = conn.getresponse()
        uploaded = json.loads(response.read())
    finally:
        conn.close()

    assert response.status == 200
    assert (uploaded["bytes"], uploaded["filename"]) == (len(data), "c.jsonl")
    assert [f["id"] for f in sim.files] == [uploaded["id"]]


@pytest.mark.parametrize(
    ("purpose", "filename", "param"),
    [("nonsense", "input.jsonl", "purpose"), ("batch", "input.csv", "file")],
)
def test_an_upload_the_api_would_refuse(
    client: openai.OpenAI, purpose: Any, filename: str, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=(filename, b"{}\n"), purpose=purpose)

    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == param


def test_a_batch_waits_until_told_then_answers_every_line(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    data = jsonl(line("a", "first question"), line("b", "second one", max_tokens=2))

    created = start_batch(client, data, metadata={"job": "nightly"})
    waiting = client.batches.retrieve(created.id)
    finished = sim.complete_batches()
    done = client.batches.retrieve(created.id)

    assert created.status == "validating"
    assert (created.endpoint, created.completion_window) == ("/v1/chat/completions", "24h")
    assert waiting.status == "in_progress"
    assert waiting.request_counts is not None
    assert waiting.request_counts.total == 2
    assert waiting.output_file_id is None
    assert finished == 1
    assert done.status == "completed"
    assert done.completed_at is not None
    assert done.metadata == {"job": "nightly"}
    assert done.model == MODEL
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 0)
    assert done.error_file_id is None
    first, second = lines_of(client, done.output_file_id)
    assert (first["custom_id"], first["response"]["status_code"]) == ("a", 200)
    answer = first["response"]["body"]
    assert answer["choices"][0]["message"]["content"] == "[simulated] Answer to: first question"
    assert answer["usage"]["prompt_tokens"] == count_tokens("first question") + 4
    assert second["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert done.usage is not None
    assert done.usage.output_tokens == sum(
        x["response"]["body"]["usage"]["completion_tokens"] for x in (first, second)
    )
    assert sim.call_count == 0, "batch lines are not real-time calls"
    assert [body["messages"][0]["content"] for body in sim.batch_requests] == [
        "first question", "second one"
    ]  # fmt: skip


def test_lines_that_fail_go_to_the_error_file(sim: OpenAISimulator, client: openai.OpenAI) -> None:
    bad_body = line("bad", "x")
    bad_body["body"]["messages"] = []
    data = jsonl(line("ok", "fine"), bad_body, line("boom", "forced"))
    sim.fail_batch_line("boom", 503, "overloaded")

    created = start_batch(client, data)
    sim.complete_batches(created.id)
    done = client.batches.retrieve(created.id)

    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    (ok,) = lines_of(client, done.output_file_id)
    assert ok["custom_id"] == "ok"
    errors = {x["custom_id"]: x["response"] for x in lines_of(client, done.error_file_id)}
    assert errors["bad"]["status_code"] == 400
    assert errors["bad"]["body"]["error"]["param"] == "messages"
    assert errors["boom"]["status_code"] == 503
    assert errors["boom"]["body"]["error"]["message"] == "overloaded"


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (jsonl(line("a", "x"), line("a", "y")), "duplicate_custom_id"),
        (jsonl(line("a", "x"), "not json"), "invalid_json_line"),
        (jsonl({**line("a", "x"), "url": "/v1/embeddings"}), "mismatched_endpoint"),
        (jsonl(line("a", "x"), line("b", "y", model="gpt-4o")), "mismatched_model"),
        (b"\n", "empty_file"),
    ],
)
def test_an_input_file_the_api_refuses_fails_the_batch(
    sim: OpenAISimulator, client: openai.OpenAI, content: bytes, code: str
) -> None:
    created = start_batch(client, content)
    failed = client.batches.retrieve(created.id)

    assert failed.status == "failed"
    assert failed.failed_at is not None
    assert failed.errors is not None
    assert failed.errors.data is not None
    assert [e.code for e in failed.errors.data] == [code]
    assert sim.complete_batches() == 0


def test_an_expired_batch_keeps_the_lines_answered_before(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    created = start_batch(client, jsonl(line("a", "x"), line("b", "y"), line("c", "z")))

    assert sim.advance_batches(1) == 0
    progress = client.batches.retrieve(created.id)
    assert sim.expire_batches() == 1
    expired = client.batches.retrieve(created.id)

    assert progress.status == "in_progress"
    assert progress.request_counts is not None
    assert progress.request_counts.completed == 1
    assert expired.status == "expired"
    assert expired.expired_at is not None
    assert [x["custom_id"] for x in lines_of(client, expired.output_file_id)] == ["a"]
    errors = lines_of(client, expired.error_file_id)
    assert [(x["custom_id"], x["response"], x["error"]["code"]) for x in errors] == [
        ("b", None, "batch_expired"), ("c", None, "batch_expired")
    ]  # fmt: skip


def test_a_cancelled_batch_stops_and_cannot_be_cancelled_again(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    created = start_batch(client, jsonl(line("a", "x"), line("b", "y")))
    sim.advance_batches(1)

    cancelling = client.batches.cancel(created.id)
    cancelled = client.batches.retrieve(created.id)

    assert cancelling.status == "cancelling"
    assert cancelled.status == "cancelled"
    assert cancelled.cancelled_at is not None
    assert [x["custom_id"] for x in lines_of(client, cancelled.output_file_id)] == ["a"]
    assert sim.complete_batches() == 0
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(created.id)


def test_batches_are_listed_newest_first_with_their_metadata(client: openai.OpenAI) -> None:
    ids = [start_batch(client, jsonl(line("a", "x")), metadata={"n": str(n)}).id for n in range(3)]

    first_page = client.batches.list(limit=2)
    everything = list(client.batches.list(limit=2))  # the SDK follows the cursor

    assert [b.id for b in first_page.data] == ids[:0:-1]
    assert first_page.has_more
    assert [b.id for b in everything] == ids[::-1]
    assert [b.metadata for b in everything] == [{"n": "2"}, {"n": "1"}, {"n": "0"}]


def test_batch_requests_the_api_would_refuse(client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("input.jsonl", jsonl(line("a", "x"))), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id="file-missing",
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")


def test_queued_failures_can_be_kept_for_one_model(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    sim.fail_next(1, 503, model="gpt-4o")
    sim.fail_next(1, 500)

    with pytest.raises(openai.InternalServerError):  # the unrestricted one, first in line
        ask(client, MODEL)
    assert ask(client, MODEL)  # the gpt-4o failure waits for gpt-4o
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, "gpt-4o")
    assert caught.value.status_code == 503
    assert ask(client, "gpt-4o")


def test_a_failure_rate_fails_the_same_requests_for_the_same_seed(sim: OpenAISimulator) -> None:
    statuses = (500, 429)

    def run() -> list[int]:
        sim.set_failure_rate(0.4, statuses, seed=7)
        outcomes = []
        with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
            for _ in range(30):
                try:
                    ask(sdk)
                    outcomes.append(200)
                except openai.APIStatusError as exc:
                    outcomes.append(exc.status_code)
        return outcomes

    first, second = run(), run()
    draws = random.Random(7)
    expected = []
    for _ in range(30):
        draw, status = draws.random(), draws.choice(statuses)
        expected.append(status if draw < 0.4 else 200)

    assert first == second == expected
    assert 0 < expected.count(200) < 30
    sim.set_failure_rate(0)
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
        assert all(ask(sdk) for _ in range(5))


def test_a_failure_rate_holds_under_concurrent_callers(sim: OpenAISimulator) -> None:
    sim.set_failure_rate(0.5, (500,), seed=3)
    draws = random.Random(3)
    expected_failures = 0
    for _ in range(40):
        expected_failures += draws.random() < 0.5
        draws.choice((500,))
    lock, failures = threading.Lock(), [0]

    def one(_: int) -> None:
        with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
            try:
                ask(sdk)
            except openai.InternalServerError:
                with lock:
                    failures[0] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(40)))

    assert failures[0] == expected_failures
    assert sim.call_count == 40 - expected_failures


def test_a_dropped_request_gets_no_response_at_all(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    sim.drop_next(2)

    for _ in range(2):
        with pytest.raises(openai.APIConnectionError):
            ask(client)
    answer = ask(client)

    assert answer == "[simulated] Answer to: hi"
    assert len(sim.requests) == 3, "the dropped requests did arrive"
    assert sim.call_count == 1


def test_reset_forgets_every_kind_of_failure(sim: OpenAISimulator, client: openai.OpenAI) -> None:
    sim.fail_next(1, model="gpt-4o")
    sim.set_failure_rate(1.0)
    sim.drop_next(1)
    sim.fail_batch_line("a")

    sim.reset()
    created = start_batch(client, jsonl(line("a", "x")))
    sim.complete_batches()

    assert ask(client, "gpt-4o")
    assert ask(client)
    done = client.batches.retrieve(created.id)
    assert done.request_counts is not None
    assert done.request_counts.completed == 1
    assert [b["id"] for b in sim.batches] == [created.id], "batches outlive reset()"


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.set_failure_rate(1.5),
        lambda s: s.set_failure_rate(0.5, ()),
        lambda s: s.set_failure_rate(0.5, (200,)),
        lambda s: s.drop_next(-1),
        lambda s: s.fail_batch_line("a", 200),
        lambda s: s.advance_batches(-1),
    ],
)
def test_nonsense_controls_are_refused(sim: OpenAISimulator, call: Any) -> None:
    with pytest.raises(ValueError, match=r"."):
        call(sim)


def test_a_lost_reply_still_did_the_work(sim: OpenAISimulator, client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("input.jsonl", jsonl(line("a", "x"))), purpose="batch")
    sim.lose_next_reply("/v1/batches")

    with pytest.raises(openai.APIConnectionError):
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    (created,) = sim.batches

    assert client.batches.retrieve(created["id"]).status == "in_progress"


def test_batches_can_finish_on_their_own_for_demos(
    sim: OpenAISimulator, client: openai.OpenAI
) -> None:
    held = start_batch(client, jsonl(line("a", "x")))
    assert client.batches.retrieve(held.id).status == "in_progress"

    sim.set_batch_auto_complete(0)

    assert client.batches.retrieve(held.id).status == "completed"
    later = start_batch(client, jsonl(line("b", "y")))
    assert [b.status for b in client.batches.list()] == ["completed", "completed"]
    assert client.batches.retrieve(later.id).request_counts is not None
    sim.set_batch_auto_complete(None)
    assert client.batches.retrieve(start_batch(client, jsonl(line("c", "z"))).id).status == (
        "in_progress"
    )
