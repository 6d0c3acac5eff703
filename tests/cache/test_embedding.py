"""The embedding runtime: ONNX Runtime must give the reference model's vectors, and
concurrent requests must share model runs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import numpy as np
import pytest

from services.common.embedding import (
    MINILM,
    MINILM_DIMENSIONS,
    BatchingEmbedder,
    Embeddings,
    minilm_dir,
    shared_minilm,
)

TEXTS = [
    "How do I reset my password?",
    "Why was my card declined at the shop yesterday?",
    "is port 6379 open?",
    "I would like to cancel my order #4521 and get a refund of $20.50",
    "",
    "Ünïcödé and emoji 🎉 survive tokenisation",
    "word " * 400,  # longer than the model's 256-token window: truncated alike
]


def test_onnx_vectors_agree_with_the_sentence_transformers_reference() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)

    ours = shared_minilm(None, 1).embed_sync(TEXTS).vectors

    assert ours.shape == (len(TEXTS), MINILM_DIMENSIONS)
    agreement = (ours * expected).sum(axis=1)
    assert agreement.min() > 0.99999, agreement
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


async def test_concurrent_requests_are_embedded_in_one_batch() -> None:
    batches: list[int] = []
    model = shared_minilm(None, 1)

    def recording(texts: Sequence[str]) -> Embeddings:
        batches.append(len(texts))
        return model.embed_sync(texts)

    embedder = BatchingEmbedder(MINILM, MINILM_DIMENSIONS, recording, max_batch=8)
    try:
        results = await asyncio.gather(*(embedder.embed([t]) for t in TEXTS[:4] * 3))
    finally:
        await embedder.close()

    # All twelve arrive before the model is free: two runs, not twelve.
    assert batches == [8, 4]
    alone = model.embed_sync(TEXTS[:4]).vectors
    for i, result in enumerate(results):
        assert np.allclose(result.vectors[0], alone[i % 4], atol=1e-5)


async def test_a_failed_batch_fails_each_of_its_requests_and_the_next_one_runs() -> None:
    calls = 0

    def flaky(texts: Sequence[str]) -> Embeddings:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("model crashed")
        return shared_minilm(None, 1).embed_sync(texts)

    embedder = BatchingEmbedder(MINILM, MINILM_DIMENSIONS, flaky)
    try:
        with pytest.raises(RuntimeError, match="model crashed"):
            await embedder.embed(["first"])
        later = await embedder.embed(["second"])
    finally:
        await embedder.close()

    assert later.vectors.shape == (1, MINILM_DIMENSIONS)
