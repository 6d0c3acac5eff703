"""Labelled tickets for training and evaluating the router: text, tier, and intent.

Banking77 and Bitext ship with `tiers.json` mapping every intent to a tier; CLINC150
does not, so costmesh ships one (`clinc150-tiers.json`, by the same rule: problems to
investigate are complex, tasks that change something moderate, look-ups, facts and
small talk simple; its out-of-scope queries have no tier and are left out). A file of
your own is JSONL or CSV with `text` and `tier`, and optionally `label` (an intent):
with intents the classifier learns them and sums their probabilities per tier.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.router.artefact import TIERS

DATA_SETS = ("banking77", "bitext", "clinc150")
CLINC150_TIERS = Path(__file__).with_name("clinc150-tiers.json")
BITEXT_CSV = "Bitext_Sample_Customer_Support_Training_Dataset.csv"
BITEXT_TEST_SHARE = 0.2


class DataError(ValueError):
    """Something the user can fix in the data or the options: one line, exit 2."""


@dataclass(frozen=True)
class Ticket:
    text: str
    tier: str
    label: str = ""  # the intent, when known


@dataclass(frozen=True)
class TicketSet:
    name: str
    train: tuple[Ticket, ...]
    test: tuple[Ticket, ...]


def default_data_dir() -> Path:
    """The shared data sets beside the checkout (`../shared/data` from the repository)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def load_tickets(data: str, data_dir: Path, seed: int = 0) -> TicketSet:
    """banking77 (its train and test), bitext (a seeded 80/20 split per intent), clinc150
    (its train and test, out-of-scope queries left out; costmesh's tiers), a
    comma-separated union of those (intents prefixed by their set), or a file whose
    every row serves both for training and for evaluation."""
    names = [n.strip() for n in data.split(",")]
    if len(names) > 1:
        if not set(names) <= set(DATA_SETS) or len(set(names)) < len(names):
            raise DataError(f"--data: a union names each of {', '.join(DATA_SETS)} at most once")
        parts = [load_tickets(n, data_dir, seed) for n in names]
        return TicketSet(
            "+".join(names),
            tuple(_prefixed(t, p.name) for p in parts for t in p.train),
            tuple(_prefixed(t, p.name) for p in parts for t in p.test),
        )
    if data == "banking77":
        folder = data_dir / "banking77"
        tiers = _tiers(folder / "tiers.json")
        return TicketSet(
            "banking77",
            _csv(folder / "train.csv", "text", "category", tiers),
            _csv(folder / "test.csv", "text", "category", tiers),
        )
    if data == "bitext":
        folder = data_dir / "bitext_customer_support"
        rows = _csv(folder / BITEXT_CSV, "instruction", "intent", _tiers(folder / "tiers.json"))
        train, test = _split(rows, seed)
        return TicketSet("bitext", train, test)
    if data == "clinc150":
        # The cache's reader of CLINC150; it imports this module (Bitext's split).
        from costmesh_tools.cache.intents import OOS, load_intents  # noqa: PLC0415

        tiers = _tiers(CLINC150_TIERS)
        intents = load_intents("clinc150", data_dir)
        unknown = sorted({e.label for e in intents.train + intents.test} - {OOS, *tiers})
        if unknown:
            raise DataError(
                f"{data_dir / 'clinc150'}: intent {unknown[0]!r} has no tier in "
                f"{CLINC150_TIERS.name} (another version of CLINC150?)"
            )
        train, test = (
            tuple(Ticket(e.text, tiers[e.label], e.label) for e in part if e.label != OOS)
            for part in (intents.train, intents.test)
        )
        return TicketSet("clinc150", train, test)
    path = Path(data)
    rows = _own_file(path)
    return TicketSet(path.name, rows, rows)


def _prefixed(ticket: Ticket, source: str) -> Ticket:
    """Intents of different sets are different classes, whatever their names."""
    return Ticket(ticket.text, ticket.tier, f"{source}:{ticket.label}")


def _require(path: Path) -> Path:
    if not path.is_file():
        hint = (
            " (--data-dir names the folder holding banking77/, bitext_customer_support/"
            " and clinc150/)"
        )
        raise DataError(f"{path}: no such file{hint if path.name != path.as_posix() else ''}")
    return path


def _tiers(path: Path) -> dict[str, str]:
    try:
        tiers = json.loads(_require(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc.msg}") from None
    bad = {k: v for k, v in tiers.items() if v not in TIERS}
    if bad:
        name, tier = next(iter(bad.items()))
        raise DataError(f"{path}: intent {name!r} has tier {tier!r}, not one of {TIERS}")
    return dict(tiers)


def _csv(path: Path, text: str, label: str, tiers: dict[str, str]) -> tuple[Ticket, ...]:
    with _require(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = sorted({text, label} - set(reader.fieldnames or ()))
        if missing:
            raise DataError(f"{path}: no column {', '.join(missing)}")
        rows = []
        for line, row in enumerate(reader, 2):
            intent = row[label] or ""
            if intent not in tiers:
                raise DataError(f"{path}:{line}: intent {intent!r} is not in tiers.json")
            if (row[text] or "").strip():
                rows.append(Ticket(row[text], tiers[intent], intent))
    return tuple(rows)


def _split(rows: Iterable[Ticket], seed: int) -> tuple[tuple[Ticket, ...], tuple[Ticket, ...]]:
    """The same share of every intent held out, so the test set has them all."""
    by_label: dict[str, list[Ticket]] = defaultdict(list)
    for row in rows:
        by_label[row.label].append(row)
    rng = random.Random(seed)
    train: list[Ticket] = []
    test: list[Ticket] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        cut = round(len(group) * BITEXT_TEST_SHARE)
        test.extend(group[:cut])
        train.extend(group[cut:])
    return tuple(train), tuple(test)


def _own_file(path: Path) -> tuple[Ticket, ...]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"{path}: expected banking77, bitext, clinc150, or a .jsonl or .csv file")
    raw = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)
    tickets = []
    for line, row in raw:
        text, tier, label = row.get("text"), row.get("tier"), row.get("label") or ""
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line}: text must be a non-empty string")
        if tier not in TIERS:
            raise DataError(f"{path}:{line}: tier {tier!r} is not one of {', '.join(TIERS)}")
        tickets.append(Ticket(text, str(tier), str(label)))
    if not tickets:
        raise DataError(f"{path}: no labelled rows")
    return tuple(tickets)


def _csv_rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    with _require(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = sorted({"text", "tier"} - set(reader.fieldnames or ()))
        if missing:
            raise DataError(f"{path}: no column {', '.join(missing)}")
        return [(line, dict(row)) for line, row in enumerate(reader, 2)]


def _jsonl_rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    rows = []
    for line, text in enumerate(_require(path).read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected an object with text and tier")
        rows.append((line, row))
    return rows
