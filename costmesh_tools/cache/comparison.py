"""`costmesh cache eval` (compare mode): equivalence models side by side, honestly.

For each setting and each test set, every model is put at its operating point for
the false-hit budget, chosen on validation data only, then measured on test data it
never saw:

- in-domain: the model was trained on the test set's data set (its train split);
  stored questions are that train split, queries its test split;
- leave-one-dataset-out: the model was trained on the two other data sets
  (`costmesh cache train --data A,B --out DIR/without-C`), so the test set's
  wording and intents are new to it, and its threshold comes from A's and B's
  validation splits.

A model whose card carries thresholds (the shipped one, any trained one) uses them;
stock MiniLM is calibrated here on the same validation splits. Rates are per what
users see: false hits per served hit, recall per query whose intent is stored, and
out-of-scope queries (clinc150) answered at all.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from costmesh_tools.cache import calibration
from costmesh_tools.cache.intents import IntentSet, load_intents, unique
from costmesh_tools.cache.stock import minilm_encoder
from costmesh_tools.cli_support import write_grid
from services.cache.semantic import calibrated_threshold
from services.common.embedding import SHIPPED_MODEL_DIR, SentenceEncoder, read_card

STOCK = "minilm"
SHIPPED = "shipped"
CURVE = tuple(round(0.50 + 0.02 * i, 2) for i in range(25))  # 0.50 .. 0.98


class ComparisonError(ValueError):
    """A model or option the comparison cannot use: one line, exit 2."""


@dataclass(frozen=True)
class Model:
    label: str
    encoder: SentenceEncoder
    calibrated_on: tuple[str, ...]  # data sets whose validation splits set its thresholds


@dataclass(frozen=True)
class Result:
    setting: str
    data: str
    model: str
    threshold: float
    point: calibration.Point
    curve: list[calibration.Point]


def load_model(name: str, threads: int) -> Model:
    """`shipped`, `minilm` (stock, the train extra), or a folder `cache train` wrote."""
    if name == STOCK:
        return Model(STOCK, minilm_encoder(threads), ())
    folder = SHIPPED_MODEL_DIR if name == SHIPPED else Path(name)
    card = read_card(folder)
    return Model(name, SentenceEncoder.from_dir(folder, threads), tuple(card["training"]["data"]))


def threshold_for(
    model: Model, target: float, calibration_sets: Sequence[IntentSet], *, own: bool = False
) -> float:
    """The card's threshold for the budget, or (with `own`, or a model without one)
    one calibrated on the validation splits of `calibration_sets`."""
    carried = None if own else calibrated_threshold(model.encoder.thresholds, target)
    if carried is not None:
        return carried
    measured = calibrated_threshold(
        calibration.calibrate(model.encoder.embed_vectors, calibration_sets, (target,)), target
    )
    if measured is None:
        raise ComparisonError(f"no calibration for a budget of {target:g}")
    return measured


def measure(setting: str, test: IntentSet, model: Model, threshold: float) -> Result:
    stored = unique(test.train)
    labels = {e.label for e in stored}
    queries = calibration.semantic_queries(stored, test.test)
    judged = calibration.judge(model.encoder.embed_vectors, stored, queries)
    return Result(
        setting,
        test.name,
        model.label,
        threshold,
        calibration.point(judged, threshold, labels),
        calibration.curve(judged, CURVE, labels),
    )


def compare(
    models: Sequence[str],
    settings: Sequence[str],
    data: Sequence[str],
    *,
    data_dir: Path,
    lodo_dir: Path | None,
    target: float,
    threads: int,
    own_calibration: bool = False,
) -> list[Result]:
    sets = _Sets(data_dir)
    results = []
    if "in-domain" in settings:
        loaded = [load_model(m, threads) for m in models]
        tests = [sets[n] for n in data]
        if own_calibration:
            results += calibrated_on_tests(loaded, tests, target)
        else:
            results += in_domain(loaded, tests, sets, target)
    if "lodo" in settings:
        if lodo_dir is None:
            raise ComparisonError("--setting lodo needs --lodo-dir (see costmesh cache train)")
        stock = load_model(STOCK, threads) if STOCK in models else None
        for name in data:
            held_out = load_model(str(lodo_dir / f"without-{name}"), threads)
            results += leave_one_out(held_out, stock, sets[name], sets, target)
    return results


class _Sets(dict[str, IntentSet]):
    """Data sets loaded when first named."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__()
        self._data_dir = data_dir

    def __missing__(self, name: str) -> IntentSet:
        self[name] = load_intents(name, self._data_dir)
        return self[name]


def in_domain(
    models: Sequence[Model],
    tests: Sequence[IntentSet],
    sets: dict[str, IntentSet],
    target: float,
) -> list[Result]:
    """Each model on the test sets of its own training data; an uncalibrated model
    is calibrated where the first trained one was (or on the test sets' own
    validation splits when none is trained)."""
    names = tuple(t.name for t in tests)
    tuned = next((m.calibrated_on for m in models if m.calibrated_on), names)
    results = []
    for model in models:
        carried = calibrated_threshold(model.encoder.thresholds, target)
        # The card's threshold needs no data: the calibration sets load only without one.
        threshold = (
            carried
            if carried is not None
            else threshold_for(model, target, [sets[n] for n in tuned])
        )
        results += [
            measure("in-domain", test, model, threshold)
            for test in tests
            if not model.calibrated_on or test.name in model.calibrated_on
        ]
    return results


def calibrated_on_tests(
    models: Sequence[Model], tests: Sequence[IntentSet], target: float
) -> list[Result]:
    """Every model with the threshold the test sets' own validation splits allow
    (pooled), whatever its card says: what a team gets by calibrating on a few
    hundred labelled questions of its own traffic."""
    results = []
    for model in models:
        threshold = threshold_for(model, target, tests, own=True)
        results += [measure("own calibration", test, model, threshold) for test in tests]
    return results


def leave_one_out(
    held_out: Model,
    stock: Model | None,
    test: IntentSet,
    sets: dict[str, IntentSet],
    target: float,
) -> list[Result]:
    """A model trained without `test`'s data set, beside stock MiniLM calibrated on
    the same validation splits."""
    if test.name in held_out.calibrated_on:
        raise ComparisonError(f"{held_out.label} was trained on {test.name}")
    calibration_sets = [sets[n] for n in held_out.calibrated_on]
    results = []
    for label, model in (("trained without it", held_out), (STOCK, stock)):
        if model is not None:
            threshold = threshold_for(model, target, calibration_sets)
            shown = Model(label, model.encoder, model.calibrated_on)
            results.append(measure("leave-one-out", test, shown, threshold))
    return results


def render(results: Sequence[Result], fmt: str, out: TextIO, target: float) -> None:
    header = [
        "setting", "test set", "model", "threshold", "queries", "hits",
        "false hits", "false/hit %", "recall %", "oos answered %",
    ]  # fmt: skip
    rows = [
        [
            r.setting,
            r.data,
            r.model,
            f"{r.threshold:.4f}" if r.threshold < 1 else "none",
            str(r.point.queries),
            str(r.point.hits),
            str(r.point.false_hits),
            f"{100 * r.point.false_per_hit:.2f}",
            f"{100 * r.point.recall:.1f}",
            f"{100 * r.point.oos_rate:.2f}" if r.point.oos_queries else "",
        ]
        for r in results
    ]
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return
    out.write(
        f"operating point: thresholds chosen on validation splits for at most "
        f"{100 * target:g}% false hits per served hit; figures on test splits\n\n"
    )
    write_grid(out, header, rows, fmt)
    out.write("\nprecision (1 - false hits per served hit) against hit ratio, by threshold:\n\n")
    curve_header = ["setting", "test set", "model", *[f"{t:.2f}" for t in CURVE[::3]]]
    curve_rows = [
        [
            r.setting,
            r.data,
            r.model,
            *[f"{100 * (1 - p.false_per_hit):.1f}/{100 * p.hit_ratio:.0f}" for p in r.curve[::3]],
        ]
        for r in results
    ]
    write_grid(out, curve_header, curve_rows, fmt)
    out.write("\ncells: precision % / hit ratio % of queries\n")
    if any(r.threshold >= 1 for r in results):
        out.write(
            "threshold none: no threshold kept the validation split within the budget "
            "(with fewer than 1/budget hits none can): exact repeats only\n"
        )
