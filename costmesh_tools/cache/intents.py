"""Intent-labelled questions with train, validation and test splits.

Two questions with the same intent ask the same thing: that is the ground truth the
cache's equivalence model is trained on (`costmesh cache train`), its threshold
calibrated on (validation) and its quality reported on (test, `costmesh cache eval`).
Each split is fixed by the data set or by a seeded shuffle per intent, so training,
calibration and evaluation never see each other's rows.

- banking77: its test file is test; 10% of every intent of its train file is
  validation.
- clinc150: its own train, val and test; the out-of-scope queries of val and test
  (label `oos`, no right answer anywhere) are looked up but never stored.
- bitext: the router's held-out 20% is test (`costmesh_tools/router/tickets.py`: the same
  split the case-study workload is drawn from); 10% of the rest is validation.
- a .jsonl or .csv file of your own questions, with `text` and `label` (the intent):
  10% of every intent is validation and 10% test.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from costmesh_tools.router.tickets import DataError, load_tickets

OOS = "oos"  # clinc150's out-of-scope label: no stored answer is right for such a query
DATA_SETS = ("banking77", "clinc150", "bitext")
VALIDATION_SHARE = 0.1
_DIR_HINT = (
    " (--data-dir names the folder holding banking77/, clinc150/ and bitext_customer_support/)"
)


class IntentDataError(ValueError):
    """A missing or malformed data file: one line, exit 2."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class IntentSet:
    """One data set's three splits. Labels are the data set's own intent names."""

    name: str
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]


def default_data_dir() -> Path:
    """The shared data sets beside the checkout (`../shared/data` from the repository)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def parse_data_sets(value: str) -> tuple[str, ...]:
    """A comma-separated list of data set names or files, each named once."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in DATA_SETS and not _is_file_name(n)]
    if unknown or not names or len(set(names)) < len(names):
        raise IntentDataError(
            f"expected a comma-separated subset of {', '.join(DATA_SETS)}, or .jsonl/.csv "
            f"files of text and label, got {value!r}"
        )
    return names


def _is_file_name(name: str) -> bool:
    return name.lower().endswith((".jsonl", ".csv"))


def load_intents(name: str, data_dir: Path, seed: int = 0) -> IntentSet:
    if name == "banking77":
        folder = data_dir / "banking77"
        train, validation = _hold_out(_read_csv(folder / "train.csv", "category"), seed)
        return IntentSet(
            name, train, validation, _clean(_read_csv(folder / "test.csv", "category"))
        )
    if name == "clinc150":
        return _clinc150(data_dir / "clinc150" / "data_full.json")
    if name == "bitext":
        try:
            tickets = load_tickets("bitext", data_dir, seed)
        except DataError as exc:
            raise IntentDataError(f"{exc}{_DIR_HINT}") from None
        rest = [Example(t.text, t.label) for t in tickets.train]
        train, validation = _hold_out(rest, seed)
        return IntentSet(
            name, train, validation, _clean(Example(t.text, t.label) for t in tickets.test)
        )
    if _is_file_name(name):
        return _own_file(Path(name), seed)
    raise IntentDataError(f"unknown data set {name!r}: expected one of {', '.join(DATA_SETS)}")


def read_labelled(path: Path) -> tuple[Example, ...]:
    """A .jsonl or .csv file's non-empty rows of `text` and `label`."""
    if not _is_file_name(path.name):
        raise IntentDataError(f"{path}: expected {', '.join(DATA_SETS)}, or a .jsonl or .csv file")
    if path.suffix.lower() == ".csv":
        return _clean(_read_csv(path, "label"))
    rows = []
    for number, line in enumerate(_require(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IntentDataError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not {"text", "label"} <= row.keys():
            raise IntentDataError(f"{path}:{number}: expected an object with text and label")
        rows.append(Example(str(row["text"]), str(row["label"])))
    return _clean(rows)


def _own_file(path: Path, seed: int) -> IntentSet:
    rows = read_labelled(path)
    rest, test = _hold_out(rows, seed, VALIDATION_SHARE)
    train, validation = _hold_out(rest, seed, VALIDATION_SHARE / (1 - VALIDATION_SHARE))
    if not train or not validation:
        raise IntentDataError(f"{path}: too few questions per intent to hold some out")
    return IntentSet(str(path), train, validation, test)


def _require(path: Path) -> Path:
    if not path.is_file():
        hint = _DIR_HINT if path.name in ("train.csv", "test.csv", "data_full.json") else ""
        raise IntentDataError(f"{path}: no such file{hint}")
    return path


def _read_csv(path: Path, label: str) -> list[Example]:
    with _require(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = sorted({"text", label} - set(reader.fieldnames or ()))
        if missing:
            raise IntentDataError(f"{path}: no column {', '.join(missing)}")
        return [Example(row["text"] or "", row[label] or "") for row in reader]


def _clinc150(path: Path) -> IntentSet:
    try:
        splits = json.loads(_require(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IntentDataError(f"{path}: not valid JSON: {exc.msg}") from None
    missing = [s for s in ("train", "val", "test", "oos_val", "oos_test") if s not in splits]
    if missing:
        raise IntentDataError(f"{path}: no split {', '.join(missing)}")

    def part(*names: str) -> tuple[Example, ...]:
        return _clean(Example(str(t), str(label)) for n in names for t, label in splits[n])

    return IntentSet("clinc150", part("train"), part("val", "oos_val"), part("test", "oos_test"))


def _clean(rows: Iterable[Example]) -> tuple[Example, ...]:
    """An empty question is never compared for meaning: it would only measure noise."""
    return tuple(r for r in rows if r.text.strip())


def _hold_out(
    rows: Sequence[Example], seed: int, share: float = VALIDATION_SHARE
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """The same share of every intent held out, so validation has them all."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for row in _clean(rows):
        by_label[row.label].append(row)
    rng = random.Random(seed)
    train: list[Example] = []
    held: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        cut = round(len(group) * share)
        held.extend(group[:cut])
        train.extend(group[cut:])
    return tuple(train), tuple(held)


def unique(rows: Iterable[Example]) -> tuple[Example, ...]:
    """One entry per question text, never an out-of-scope one: what a cache can store."""
    seen: dict[str, Example] = {}
    for row in rows:
        if row.label != OOS:
            seen.setdefault(row.text, row)
    return tuple(seen.values())
