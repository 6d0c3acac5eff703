"""What `costmesh eval` prints (the table of features and tiers, what was left out and why, the
verdict) and the CSV of every request's answers and scores it writes with --out."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from costmesh_tools.casestudy.evaluate import Comparison, Group, Pair
from costmesh_tools.casestudy.workload import WorkloadError
from costmesh_tools.cli_support import usd, write_grid
from services.common.embedding import MINILM

SCORERS = {
    "auto": "the reference label, exactly, where references are labels; a match with the "
    f"reference's intent where they are labelled free text; elsewhere cosine similarity to "
    f"the reference ({MINILM})",
    "exact": "the reference label, exactly (1 or 0)",
    "match": f"a match with the reference's intent among the feature's intents ({MINILM}; 1 or 0)",
    "similarity": f"cosine similarity to the reference ({MINILM})",
    "judge": "an LLM judge's 1-5 grade against the reference, as (grade - 1) / 4",
}


def report(
    out: TextIO,
    comparison: Comparison,
    pairs: Sequence[Pair],
    heading: str,
    fmt: str,
    *,
    detect: float | None = None,
) -> None:
    """The table of features and tiers, what was left out and why, and the verdict; first, when
    the local simulator answered, a banner saying so."""
    banner = simulated_banner(pairs)
    if banner:
        out.write(banner + "\n\n")
    out.write(heading + "\n\n")
    header = ["slice", "compared", "control", "treatment", "drop", "95% interval", "detectable"]
    groups = (*comparison.features, *comparison.tiers, comparison.overall)
    lines = [_line(g, comparison.margin) for g in groups]
    write_grid(out, header, lines, fmt, numeric=0)
    out.write("\n")
    for note in _notes(comparison, pairs):
        out.write(note + "\n")
    out.write(verdict(comparison, detect) + "\n")


def simulated_banner(pairs: Sequence[Pair]) -> str:
    """One line when any answer came from the local simulator; empty otherwise."""
    answers = [a for p in pairs for a in (p.control, p.treatment) if not a.error]
    simulated = sum(a.simulated for a in answers)
    if not simulated:
        return ""
    return (
        f"SIMULATED: {simulated} of {len(answers)} answers came from the local simulator, "
        "not a model: these scores say how the simulator answers, not how a model would"
    )


def verdict(comparison: Comparison, detect: float | None = None) -> str:
    """PASS or FAIL, and why, in one line; then what the sample can tell."""
    overall, margin = comparison.overall, comparison.margin
    if not comparison.passed:
        line = "FAIL: " + "; ".join(comparison.reasons)
    else:
        line = f"PASS: treatment {_versus(overall.drop)} control, within the {margin:.2%} margin"
        needed = overall.needed_to_clear(margin)
        if needed is not None:
            line += (
                f"; the interval reaches {overall.drop_high:.1%}: about {needed:,} requests "
                "of this mix would put it below the margin"
            )
        failing = comparison.slices_failing
        waived = [g for g in comparison.slices_over if g.name in comparison.waived]
        noisy = [g for g in comparison.slices_over if g not in failing and g not in waived]
        if waived:
            line += "; over the margin on their own, waived: " + _named(waived)
        if noisy:
            line += (
                "; over the margin on their own but within noise (an interval reaching "
                "zero, or too few distinct conversations): " + _named(noisy)
            )
    return line + "\n" + power(comparison, detect)


def power(comparison: Comparison, drop: float | None = None) -> str:
    """The smallest true drop the gate catches 80% of the time at these requests, and
    (for `drop`) how many requests it would need to catch that one."""
    overall, margin = comparison.overall, comparison.margin
    line = (
        f"power: with {overall.requests} requests the gate fails a true drop of "
        f"{overall.detectable(margin):.1%} or more 80% of the time"
    )
    if drop is not None:
        needed = overall.needed(drop, margin)
        line += (
            f"; a drop of {drop:.1%} is within the {margin:.1%} margin: the gate passes it"
            if needed is None
            else f"; to catch a drop of {drop:.1%} as often: {needed:,} requests"
        )
    return line


def _named(groups: Sequence[Group]) -> str:
    return ", ".join(f"{g.name} ({g.drop:.1%})" for g in groups)


def _line(group: Group, margin: float) -> list[str]:
    flag = " !" if group.over(margin) else ""
    return [
        group.name,
        str(group.requests),
        f"{group.control:.3f}",
        f"{group.treatment:.3f}",
        f"{group.drop:.1%}{flag}",
        f"{group.drop_low:.1%} .. {group.drop_high:.1%}",
        f"{group.detectable(margin):.1%}",
    ]


def _versus(drop: float) -> str:
    """Two decimals: a drop just over the margin must not print as the margin itself."""
    if drop >= 0:
        return f"scores {drop:.2%} below"
    return f"scores {-drop:.2%} above"


def _notes(comparison: Comparison, pairs: Sequence[Pair]) -> list[str]:
    control = sum(p.control.cost_nano_usd for p in pairs)
    treatment = sum(p.treatment.cost_nano_usd for p in pairs)
    judge = sum(a.judge_cost_nano_usd for p in pairs for a in p.answers)
    hits = sum(1 for p in pairs if p.treatment.cached)
    cost = (
        f"cost: control ${usd(control, False)}, treatment ${usd(treatment, False)} "
        f"({hits} of {len(pairs)} treatment answers from the cache)"
    )
    if any(a.judge_reply or a.judge_error for p in pairs for a in p.answers):
        cost += f", judge ${usd(judge, False)}"
    why = {
        "control failed": comparison.control_errors,
        "judge replies unparseable": comparison.unparseable,
        "judge calls failed": comparison.judge_errors,
    }
    left_out = f"left out of the comparison: {comparison.left_out} of {comparison.pairs}"
    if comparison.left_out:
        left_out += " (" + ", ".join(f"{k}: {v}" for k, v in why.items() if v) + ")"
    notes = [cost, left_out]
    for arm, errors in (
        ("control", [p.control.error for p in pairs]),
        ("treatment", [p.treatment.error for p in pairs]),
        ("judge", [a.judge_error for p in pairs for a in p.answers]),
    ):
        counted = Counter(e for e in errors if e)
        if counted:
            first, count = counted.most_common(1)[0]
            notes.append(f"{arm} errors: {counted.total()}, most often ({count}) {first}")
    if comparison.treatment_errors:
        notes.append("a treatment that failed to answer scores 0")
    return notes


_CSV_HEADER = [
    "id", "feature", "tier", "label", "compared",
    "control_model", "control_score", "control_grade", "control_error", "control_cost_nano_usd",
    "treatment_model", "treatment_cached", "treatment_score", "treatment_grade",
    "treatment_error", "treatment_cost_nano_usd",
    "reference", "control_answer", "treatment_answer", "control_judge", "treatment_judge",
]  # fmt: skip


def write_csv(path: Path, pairs: Sequence[Pair]) -> None:
    """Every request's answers, scores and failures, one row a request."""
    rows = [_csv_row(p) for p in pairs]
    try:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(_CSV_HEADER)
            writer.writerows(rows)
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot be written ({exc.strerror or exc})") from None


def _csv_row(pair: Pair) -> list[object]:
    r, c, t = pair.request, pair.control, pair.treatment

    def score(value: float | None) -> str:
        return "" if value is None else f"{value:.6f}"

    return [
        r.id, r.feature, r.tier or "", r.label or "", int(pair.scores is not None),
        c.model, score(c.score), c.grade or "", c.error, c.cost_nano_usd,
        t.model, int(t.cached), score(t.score), t.grade or "", t.error, t.cost_nano_usd,
        r.reference or "", c.content, t.content, c.judge_reply or c.judge_error,
        t.judge_reply or t.judge_error,
    ]  # fmt: skip
