"""Prompt tokens counted before the call, offline, with the OpenAI tokenizers.

`bpe-openai` embeds the BPE vocabularies (o200k_base for the gpt-4o family,
cl100k_base for gpt-4 and gpt-3.5), so nothing is downloaded at run time, unlike
tiktoken, which fetches its encodings on first use. The count is what refusals and
budget reservations use; the provider's reported usage is what gets billed.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from costmesh.types.v1 import types_pb2

if TYPE_CHECKING:
    import bpe_openai

DEFAULT_ENCODING = "o200k_base"
# OpenAI's chat framing: each message costs 3 tokens beyond its content, and every
# reply is primed with 3 more.
PER_MESSAGE = 3
REPLY_PRIMING = 3


@functools.cache
def _package() -> Any:
    """bpe_openai, imported on the first count: importing it builds its tokenizers
    (0.6 s), which a command that never counts (`costmesh --help`) should not pay."""
    with warnings.catch_warnings():
        # bpe-openai 0.1.4 reads its vocabularies with a deprecated importlib call.
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai  # noqa: PLC0415

    return bpe_openai


@functools.cache
def encoding_for(model: str) -> bpe_openai.Encoding:
    """The model's encoding; models the package does not know (self-hosted ones) are
    counted with o200k_base, which is close for modern BPE vocabularies."""
    package = _package()
    try:
        name = package.encoding_name_for_model(model)
    except KeyError:
        name = DEFAULT_ENCODING
    with warnings.catch_warnings():
        # bpe-openai 0.1.4 reads its vocabularies with a deprecated importlib call.
        warnings.simplefilter("ignore", DeprecationWarning)
        encoding: bpe_openai.Encoding = package.get_encoding(name)
        return encoding


# bpe-openai refuses a text of a million characters or more, or one of more than
# 200,000 tokens: a piece of 40,000 characters is at most 160,000 bytes, so tokens.
_CHUNK = 40_000


def count_prompt_tokens(messages: Sequence[types_pb2.ChatMessage], model: str = "") -> int:
    """Prompt tokens of a chat request as the provider will count them."""
    encoding = encoding_for(model or DEFAULT_ENCODING)
    return REPLY_PRIMING + sum(PER_MESSAGE + _count(encoding, m.content) for m in messages)


def prompt_tokens_at_most(messages: Sequence[types_pb2.ChatMessage]) -> int:
    """A bound on count_prompt_tokens without tokenising: a byte-level BPE token is at
    least one byte, so a prompt whose bytes fit a cap fits it in tokens too."""
    return REPLY_PRIMING + sum(PER_MESSAGE + len(m.content.encode()) for m in messages)


def count_text_tokens(text: str, model: str = "") -> int:
    """Tokens of generated text, for an answer whose usage the provider never sent."""
    return _count(encoding_for(model or DEFAULT_ENCODING), text)


def _count(encoding: bpe_openai.Encoding, text: str) -> int:
    """Tokens of `text`; a very long one is counted in pieces cut after whitespace,
    where a token boundary falls anyway (a piece with none is cut where it is)."""
    count, start = 0, 0
    while len(text) - start > _CHUNK:
        cut = start + _CHUNK
        space = text.rfind(" ", start + _CHUNK // 2, cut)
        cut = space + 1 if space > 0 else cut
        count += len(encoding.encode(text[start:cut]))
        start = cut
    return count + len(encoding.encode(text[start:]))
