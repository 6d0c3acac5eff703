"""`costmesh cache train`: a tiny run through the whole code path (data, triplets,
fine-tuning, ONNX export, shrinking, calibration), reproduced byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from costmesh_tools.cache.calibration import TARGETS
from costmesh_tools.cli import main
from services.common.embedding import SentenceEncoder, read_card

# Six intents of ten questions each: enough for every step, small enough for seconds.
TINY = Path(__file__).parent / "data" / "tiny-intents.jsonl"


def _train(out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    argv = ["cache", "train", "--data", str(TINY), "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    return read_card(out)


def test_a_tiny_training_run_writes_a_servable_calibrated_model_reproducibly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = _train(tmp_path / "a", capsys)
    again = _train(tmp_path / "b", capsys)

    assert card["onnx_sha256"] == again["onnx_sha256"]  # the same seed, the same model
    assert card["thresholds"] == again["thresholds"]
    thresholds = card["thresholds"]
    assert isinstance(thresholds, dict)
    assert set(thresholds) == {f"{t:g}" for t in TARGETS}
    assert all(0 < v <= 1 for v in thresholds.values())
    model = SentenceEncoder.from_dir(tmp_path / "a")
    assert model.model == f"costmesh-qa-minilm@{str(card['onnx_sha256'])[:12]}"
    assert model.thresholds == thresholds
    vectors = model.embed_sync(["Where is my parcel?", "where is my package"]).vectors
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    size = (tmp_path / "a" / "model.onnx").stat().st_size
    assert 25e6 < size < 40e6  # int8 tables and float16 matrices: about a third of 90 MB


def test_recalibrating_keeps_the_model_and_rewrites_its_thresholds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = _train(tmp_path / "m", capsys)
    card_file = tmp_path / "m" / "model.json"
    card_file.write_text(json.dumps({**card, "thresholds": {}}))

    argv = ["cache", "train", "--calibrate-only", "--out", str(tmp_path / "m")]
    assert main(argv) == 0

    assert read_card(tmp_path / "m") == card


def test_training_names_a_bad_data_set(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["cache", "train", "--data", "imdb", "--out", str(tmp_path)]) == 2
    assert "subset of banking77, clinc150, bitext" in capsys.readouterr().err
    assert not (tmp_path / "model.json").exists()
