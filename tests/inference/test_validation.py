"""The prompt cap (features.X.max_input_tokens) counts tokens, not characters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from services.common.config import load_config
from services.common.errors import InvalidArgument
from services.inference.settings import InferenceSettings
from services.inference.validation import validate
from services.providers.tokens import count_prompt_tokens, prompt_tokens_at_most


@pytest.fixture
def settings(tmp_path: Path) -> InferenceSettings:
    config = tmp_path / "cap.toml"
    config.write_text("[features.short]\nmax_input_tokens = 50\n")
    return InferenceSettings.from_config(load_config(config, env={}))


def _request(text: str) -> inference_pb2.CompleteRequest:
    return inference_pb2.CompleteRequest(
        feature="short", messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)]
    )


def test_a_prompt_longer_in_bytes_than_the_cap_but_within_it_in_tokens_passes(
    settings: InferenceSettings,
) -> None:
    request = _request("hello " * 20)  # 120 bytes, about 20 tokens
    assert prompt_tokens_at_most(request.messages) > 50 >= count_prompt_tokens(request.messages)

    _, max_tokens = validate(request, settings)

    assert max_tokens == 512


def test_a_prompt_over_the_cap_in_tokens_is_refused_naming_messages(
    settings: InferenceSettings,
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate(_request("word " * 100), settings)

    assert refused.value.field_violations[0][0] == "messages"
    assert "at most 50" in str(refused.value)


@pytest.mark.parametrize("text", ["plain words", "naïve café ☕ — 東京", "🙂" * 30, ""])
def test_the_cheap_bound_is_never_below_the_count(text: str) -> None:
    messages = [types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)] * 2
    assert prompt_tokens_at_most(messages) >= count_prompt_tokens(messages)


def test_a_message_of_a_million_characters_is_refused_as_too_long_not_an_error(
    settings: InferenceSettings,
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate(_request("word " * 200_000), settings)

    assert refused.value.field_violations[0][0] == "messages"
    counted = int(re.search(r"about (\d+) tokens", str(refused.value)).group(1))  # type: ignore[union-attr]
    assert 199_000 < counted < 201_000  # "word " is one token: counted in pieces, near enough


def test_dense_text_is_counted_however_many_tokens_it_makes() -> None:
    # Japanese packs about 0.75 tokens per character: 300,000 characters are more
    # tokens than the tokenizer takes in one piece (200,000).
    text = "日本語のテキスト" * 37_500
    messages = [types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)]

    assert count_prompt_tokens(messages) > 200_000


def test_a_json_schema_that_is_not_an_object_is_refused_as_such(
    settings: InferenceSettings,
) -> None:
    request = _request("Give me the order as JSON")
    request.params.response_format.type = types_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    request.params.response_format.schema_name = "order"
    request.params.response_format.json_schema = "null"

    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        validate(request, settings)


def test_a_json_schema_nested_past_the_limit_is_refused(settings: InferenceSettings) -> None:
    request = _request("Give me the order as JSON")
    request.params.response_format.type = types_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    request.params.response_format.schema_name = "order"
    for depth in (1_000, 65):
        request.params.response_format.json_schema = '{"a":' * depth + "1" + "}" * depth
        with pytest.raises(InvalidArgument) as refused:
            validate(request, settings)
        assert refused.value.field_violations[0][0] == "params.response_format.json_schema"
    request.params.response_format.json_schema = '{"a":' * 64 + "1" + "}" * 64
    validate(request, settings)  # at the limit: fine
