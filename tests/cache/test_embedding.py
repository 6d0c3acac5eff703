"""The embedding runtime: the shipped model serves without torch and gives a text
the same vector alone or in a batch; the stock export matches its reference; and
concurrent requests share model runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from costmesh_tools.cache.stock import minilm_dir, minilm_encoder
from services.common.auth import new_key
from services.common.config import ConfigError, load_config
from services.common.embedding import (
    MINILM_DIMENSIONS,
    SHIPPED_MODEL_DIR,
    BatchingEmbedder,
    Embeddings,
    ModelError,
    SentenceEncoder,
    shared_encoder,
)
from services.mesh import start_mesh

TEXTS = [
    "How do I reset my password?",
    "Why was my card declined at the shop yesterday?",
    "is port 6379 open?",
    "I would like to cancel my order #4521 and get a refund of $20.50",
    "",
    "Ünïcödé and emoji 🎉 survive tokenisation",
    "word " * 400,  # longer than the model's 256-token window: truncated alike
]


def test_the_shipped_model_serves_without_torch() -> None:
    """What a plain `pip install costmesh` runs: the cache and router embed with the
    shipped ONNX file, and neither torch nor sentence-transformers is imported."""
    script = (
        "import sys\n"
        "from services.common.embedding import shared_encoder\n"
        "import services.mesh\n"
        "model = shared_encoder(None, 1)\n"
        "vector = model.embed_sync(['How do I reset my password?']).vectors[0]\n"
        "heavy = sorted(m for m in ('torch', 'sentence_transformers', 'transformers', "
        "'sklearn', 'scipy', 'onnx') if m in sys.modules)\n"
        "print(model.model, len(vector), heavy)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    name, dimensions, heavy = ran.stdout.split(" ", 2)
    card = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())
    assert name == f"{card['name']}@{card['onnx_sha256'][:12]}"
    assert (dimensions, heavy.strip()) == (str(MINILM_DIMENSIONS), "[]")


def test_the_shipped_model_gives_a_text_one_vector_whatever_its_batch() -> None:
    model = shared_encoder(None, 1)
    together = model.embed_sync(TEXTS).vectors
    alone = np.stack([model.embed_sync([t]).vectors[0] for t in TEXTS])

    assert together.shape == (len(TEXTS), MINILM_DIMENSIONS)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert (together * alone).sum(axis=1).min() > 0.99999
    assert model.embed_sync(TEXTS).truncated == (False,) * 6 + (True,)


def test_a_model_folder_that_cannot_be_served_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model card"):
        SentenceEncoder.from_dir(tmp_path)
    (tmp_path / "model.json").write_text('{"format": "costmesh-embedding-model/1"}')
    with pytest.raises(ModelError, match=r"model\.onnx: missing"):
        SentenceEncoder.from_dir(tmp_path)


async def test_a_pinned_model_version_that_is_not_the_one_served_is_refused(
    tmp_path: Path,
) -> None:
    config = tmp_path / "pinned.toml"
    config.write_text('[cache]\nembedding_model = "costmesh-qa-minilm@000000000000"\n')
    loaded = load_config(config, env={})
    env = {loaded.section("auth").get_str("service_key_env"): new_key()}
    with pytest.raises(ConfigError, match="unknown model version"):
        await start_mesh(loaded, env, ["cache"], TracerProvider(), port=0)


def test_the_stock_export_agrees_with_the_sentence_transformers_reference() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)

    ours = minilm_encoder(1).embed_sync(TEXTS).vectors

    assert ours.shape == (len(TEXTS), MINILM_DIMENSIONS)
    agreement = (ours * expected).sum(axis=1)
    assert agreement.min() > 0.99999, agreement
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


async def test_concurrent_requests_are_embedded_in_one_batch() -> None:
    batches: list[int] = []
    model = shared_encoder(None, 1)

    def recording(texts: Sequence[str]) -> Embeddings:
        batches.append(len(texts))
        return model.embed_sync(texts)

    embedder = BatchingEmbedder(model.model, MINILM_DIMENSIONS, recording, max_batch=8)
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
        return shared_encoder(None, 1).embed_sync(texts)

    embedder = BatchingEmbedder("model", MINILM_DIMENSIONS, flaky)
    try:
        with pytest.raises(RuntimeError, match="model crashed"):
            await embedder.embed(["first"])
        later = await embedder.embed(["second"])
    finally:
        await embedder.close()

    assert later.vectors.shape == (1, MINILM_DIMENSIONS)
