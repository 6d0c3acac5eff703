"""`costmesh router train` and `costmesh router eval` on a small labelled file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from costmesh_tools.cli import main
from services.router.artefact import TierModel
from tests.router.conftest import TICKETS


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tickets_file(tmp_path: Path) -> Path:
    rows = [{"text": t.text, "tier": t.tier, "label": t.label} for t in TICKETS]
    return write_jsonl(tmp_path / "tickets.jsonl", rows)


def test_train_writes_an_artefact_that_eval_measures(
    tickets_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artefact = tmp_path / "out" / "tiers.npz"

    trained = main(["router", "train", "--data", str(tickets_file), "--out", str(artefact)])
    train_out = capsys.readouterr().out
    evaluated = main(
        ["router", "eval", "--data", str(tickets_file), "--artefact", str(artefact),
         "--knobs", "0.5,0.9", "--format", "csv"]
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()

    assert (trained, evaluated) == (0, 0)
    model = TierModel.load(artefact)
    assert f"version {model.version}" in train_out
    assert "6 intents" in train_out
    header = lines[lines.index(next(x for x in lines if x.startswith("knob,")))].split(",")
    rows = [dict(zip(header, x.split(","), strict=True)) for x in lines if x[:2] in ("0.",)]
    # The knobs asked for, and the one chosen on the artefact's held-out rows.
    validated = f"{model.meta['validation_knob']:.2f}"
    assert "out of domain below similarity" in train_out
    assert f"the knob raised below {model.familiar_similarity:.4f}" in train_out
    assert f"knob chosen on the held-out rows: {model.meta['validation_knob']}" in train_out
    assert [r["knob"] for r in rows] == sorted({"0.50", "0.90", validated})
    # Trained and measured on the same rows: it has learned them.
    assert all(float(r["accuracy"].rstrip("%")) >= 90 for r in rows)
    assert all(float(r["savings"].rstrip("%")) > 0 for r in rows)


def test_eval_uses_the_knob_chosen_on_validation_and_shows_calibration_and_confusion(
    tickets_file: Path, artefact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["router", "eval", "--data", str(tickets_file), "--artefact", str(artefact)])
    out = capsys.readouterr().out
    knob = TierModel.load(artefact).meta["validation_knob"]

    assert code == 0
    assert f"cheap_tier_min_probability = {knob:.2f}, chosen on the artefact's held-out" in out
    assert "expected calibration error" in out
    assert "out of domain: " in out
    familiar = TierModel.load(artefact).familiar_similarity
    assert f"between it and {familiar:.2f}, the knob raised toward 1" in out
    assert "true \\ routed" in out
    assert "gpt-4o-mini" in out  # the priced tier-to-model map


@pytest.mark.parametrize(
    ("rows", "error"),
    [
        ([{"text": "hi", "tier": "easy"}], "tickets.jsonl:1: tier 'easy' is not one of"),
        ([{"text": " ", "tier": "simple"}], "tickets.jsonl:1: text must be a non-empty string"),
        ([{"text": "hi", "tier": "simple"}], "at least two tiers"),
        (
            [{"text": "a", "tier": "simple", "label": "x"}, {"text": "b", "tier": "complex"}],
            "1 of 2 tickets have no label",
        ),
        (
            [{"text": "a", "tier": "simple", "label": "x"},
             {"text": "b", "tier": "complex", "label": "x"}],
            "intent 'x' appears with tiers simple and complex",
        ),
    ],
)  # fmt: skip
def test_bad_training_data_is_refused_with_the_reason_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[dict[str, str]], error: str
) -> None:
    data = write_jsonl(tmp_path / "tickets.jsonl", rows)
    artefact = tmp_path / "tiers.npz"

    code = main(["router", "train", "--data", str(data), "--out", str(artefact)])

    assert code == 2
    assert error in capsys.readouterr().err
    assert not artefact.exists()


def test_eval_of_a_missing_artefact_says_how_to_make_one(
    tickets_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["router", "eval", "--data", str(tickets_file), "--artefact", str(tmp_path / "no.npz")]
    )

    assert code == 2
    assert "costmesh router train" in capsys.readouterr().err
