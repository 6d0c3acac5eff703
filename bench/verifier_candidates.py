"""Cosine alone against cosine + a cross-encoder verifier, at the same false-hit budget.

For every query of the validation and test splits, the embedding's 4 nearest stored
questions are found, the guard judges them, and the verifier scores those the guard
passes (each pair once). Then, for each way of deciding (cosine threshold; verifier
over the candidates at cosine >= floor), the threshold is chosen on the pooled
validation splits for at most 1% false hits per served hit, and figures are on test.
The SaaS probe (bench/probes/saas-support.json, a domain none of the data covers) is
scored at those same thresholds: its questions stored, rewordings and look-alikes asked.

    .venv/bin/python bench/verifier_candidates.py --embedding services/common/embedding_model \\
        --verifier services/cache/verifier_model
    # leave-one-dataset-out: stock MiniLM finds candidates, the verifier never saw the set
    .venv/bin/python bench/verifier_candidates.py --embedding minilm \\
        --verifier DIR/without-clinc150 --data clinc150 --calibrate-on banking77,bitext
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from costmesh_tools.cache import calibration
from costmesh_tools.cache.intents import (
    DATA_SETS,
    OOS,
    Example,
    default_data_dir,
    load_intents,
    unique,
)
from costmesh_tools.cache.stock import minilm_encoder
from services.cache.guard import refusal
from services.cache.verifier import PairVerifier
from services.common.embedding import SentenceEncoder, embed_sorted

PROBE = Path(__file__).parent / "probes" / "saas-support.json"
K = 4
FLOORS = (0.0, 0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class Scored:
    """One query's candidates: (stored example, cosine, P(same) or None if refused)."""

    query: Example
    candidates: list[tuple[Example, float, float | None]]


def score(
    encoder: SentenceEncoder,
    verifier: PairVerifier,
    stored: Sequence[Example],
    queries: Sequence[Example],
) -> tuple[list[Scored], int]:
    matrix = embed_sorted(encoder.embed_vectors, [e.text for e in stored])
    asked = embed_sorted(encoder.embed_vectors, [q.text for q in queries])
    out = []
    calls = 0
    for start in range(0, len(queries), 1024):
        scores = asked[start : start + 1024] @ matrix.T
        top = np.argsort(-scores, axis=1)[:, :K]
        for row, indices in enumerate(top.tolist()):
            query = queries[start + row]
            near = [(stored[i], float(scores[row, i])) for i in indices]
            passed = [c for c, _ in near if not refusal(query.text, c.text)]
            probabilities = dict(
                zip(
                    [c.text for c in passed],
                    verifier.same(query.text, [c.text for c in passed]),
                    strict=True,
                )
            )
            calls += bool(passed)
            out.append(Scored(query, [(c, cos, probabilities.get(c.text)) for c, cos in near]))
    return out, calls


def decide(scored: Sequence[Scored], mode: str, floor: float) -> list[calibration.Judged]:
    judged = []
    for s in scored:
        passed = [(c, cos, p) for c, cos, p in s.candidates if p is not None]
        if mode == "cosine":
            if passed:
                c, cos, _ = passed[0]
                judged.append(calibration.Judged(s.query, c, cos, ""))
            else:
                judged.append(calibration.Judged(s.query, s.candidates[0][0], 0.0, "guard"))
            continue
        eligible = [(c, p) for c, cos, p in passed if cos >= floor]
        if not eligible:
            judged.append(calibration.Judged(s.query, s.candidates[0][0], 0.0, "floor"))
            continue
        c, p = max(eligible, key=lambda item: item[1] or 0.0)
        judged.append(calibration.Judged(s.query, c, p or 0.0, ""))
    return judged


def probe_sets() -> tuple[list[Example], list[Example]]:
    probe = json.loads(PROBE.read_text(encoding="utf-8"))["questions"]
    stored = [Example(item["question"], f"q{i}") for i, item in enumerate(probe)]
    queries = [Example(t, f"q{i}") for i, item in enumerate(probe) for t in item["rewordings"]]
    queries += [Example(t, OOS) for item in probe for t in item["look_alikes"]]
    return stored, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding", required=True, help="a model folder, or minilm (stock)")
    parser.add_argument("--verifier", type=Path, required=True)
    parser.add_argument("--data", default=",".join(DATA_SETS), help="test sets")
    parser.add_argument("--calibrate-on", default="", help="validation sets (default: --data)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--target", type=float, default=0.01)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    started = time.perf_counter()
    encoder = (
        minilm_encoder(threads)
        if args.embedding == "minilm"
        else SentenceEncoder.from_dir(Path(args.embedding), threads)
    )
    verifier = PairVerifier(args.verifier, threads)
    tests = [load_intents(n, args.data_dir) for n in args.data.split(",")]
    tuned = [load_intents(n, args.data_dir) for n in (args.calibrate_on or args.data).split(",")]
    validation: list[Scored] = []
    for s in tuned:
        stored = unique(s.train)
        validation += score(
            encoder, verifier, stored, calibration.semantic_queries(stored, s.validation)
        )[0]
    results = []
    for s in tests:
        stored = unique(s.train)
        scored, calls = score(
            encoder, verifier, stored, calibration.semantic_queries(stored, s.test)
        )
        results.append((s.name, {e.label for e in stored}, scored, calls))
    probe_stored, probe_queries = probe_sets()
    probe_scored, _ = score(encoder, verifier, probe_stored, probe_queries)
    print(f"scored in {time.perf_counter() - started:.0f} s")
    print("| decision | threshold | " + " | ".join(r[0] for r in results) + " | saas probe |")
    print("|---|---:|" + "---|" * (len(results) + 1))
    for mode, floor in [("cosine", 0.0)] + [("verifier", f) for f in FLOORS]:
        threshold = calibration.operating_threshold(decide(validation, mode, floor), args.target)
        cells = []
        for _name, labels, scored, _calls in results:
            p = calibration.point(decide(scored, mode, floor), threshold, labels)
            oos = f", oos {100 * p.oos_rate:.2f}%" if p.oos_queries else ""
            verified = sum(
                any(p is not None and cos >= floor for _, cos, p in s.candidates) for s in scored
            )
            cells.append(
                f"recall {100 * p.recall:.1f}%, false/hit {100 * p.false_per_hit:.2f}%{oos}"
                + (f", verified {100 * verified / len(scored):.0f}%" if mode != "cosine" else "")
            )
        probe = calibration.point(
            decide(probe_scored, mode, floor), threshold, {e.label for e in probe_stored}
        )
        label = "cosine, guard on top 4" if mode == "cosine" else f"verifier, floor {floor}"
        print(
            f"| {label} | {threshold:.4f} | "
            + " | ".join(cells)
            + f" | {probe.hits - probe.false_hits} of {probe.in_scope} rewordings, "
            f"{probe.false_hits} wrong |"
        )


if __name__ == "__main__":
    main()
