"""Labelled tickets: CLINC150 gets the tiers costmesh ships for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from costmesh_tools.router.tickets import CLINC150_TIERS, DataError, load_tickets
from services.router.artefact import TIERS


def clinc150(data_dir: Path, **splits: list[list[str]]) -> Path:
    folder = data_dir / "clinc150"
    folder.mkdir(parents=True)
    empty: dict[str, list[list[str]]] = {
        s: [] for s in ("train", "val", "test", "oos_val", "oos_test")
    }
    (folder / "data_full.json").write_text(json.dumps(empty | splits), encoding="utf-8")
    return data_dir


def test_clinc150_tickets_carry_the_shipped_tiers_and_leave_out_of_scope_queries_out(
    tmp_path: Path,
) -> None:
    data_dir = clinc150(
        tmp_path,
        train=[
            ["someone used my card without asking", "report_fraud"],
            ["what's 2+2", "calculator"],
        ],
        test=[["book me a flight to Oslo", "book_flight"]],
        oos_test=[["how do I grow tomatoes", "oos"]],
    )

    tickets = load_tickets("clinc150", data_dir)

    assert [(t.tier, t.label) for t in tickets.train] == [
        ("complex", "report_fraud"),
        ("simple", "calculator"),
    ]
    assert [(t.tier, t.label) for t in tickets.test] == [("moderate", "book_flight")]


def test_clinc150_may_be_named_in_a_union_of_sets(tmp_path: Path) -> None:
    data_dir = clinc150(tmp_path, train=[["what time is it", "time"]])

    # Accepted as a member: what fails is the absent Banking77 file, not the name.
    with pytest.raises(DataError, match=r"banking77/tiers\.json: no such file"):
        load_tickets("banking77,clinc150", data_dir)


def test_a_clinc150_intent_without_a_tier_is_refused_by_name(tmp_path: Path) -> None:
    data_dir = clinc150(tmp_path, train=[["play some jazz", "play_jazz"]])

    with pytest.raises(DataError, match=r"intent 'play_jazz' has no tier in clinc150-tiers\.json"):
        load_tickets("clinc150", data_dir)


def test_every_clinc150_intent_has_one_of_the_three_tiers() -> None:
    tiers = json.loads(CLINC150_TIERS.read_text(encoding="utf-8"))

    assert len(tiers) == 150
    assert set(tiers.values()) == set(TIERS)
