"""`costmesh eval`, the quality gate: scoring, the comparison, bad input, and the gate
passing and failing against a real mesh and a realistic simulator."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime
import functools
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from costmesh_simulator.realism import LABEL
from costmesh_tools.cache.stock import minilm_encoder
from costmesh_tools.casestudy import eval_commands
from costmesh_tools.casestudy.arms import request_id
from costmesh_tools.casestudy.eval_commands import select
from costmesh_tools.casestudy.eval_judge import grade_score, judge_messages, parse_grade
from costmesh_tools.casestudy.eval_match import MatchScorer, match_features
from costmesh_tools.casestudy.eval_report import power, simulated_banner, verdict
from costmesh_tools.casestudy.eval_runs import EvalAbortError, check_arm
from costmesh_tools.casestudy.evaluate import (
    Answer,
    NothingToCompareError,
    Pair,
    SimilarityScorer,
    compare,
    label_features,
    score_exactly,
    strip_label,
)
from costmesh_tools.casestudy.workload import Message, WorkloadError, WorkloadRequest
from costmesh_tools.cli import main
from services.common.embedding import SentenceEncoder
from tests.conftest import DEMO_KEY, PROVIDER_KEY, ledger_rows, running_mesh

# (question, reference): distinct tasks, so a wrong answer is far from the right one.
QA = [
    ("How do I cancel my order?",
     "Open Orders, choose the order and press Cancel; the refund reaches your card in 5 days."),
    ("Where is my parcel?",
     "Track it under Orders > Track parcel with the tracking number from your shipping email."),
    ("Can I change my delivery address?",
     "Yes, until the order ships: edit the address under Orders > Delivery details."),
    ("How do I reset my password?",
     "Click Forgot password on the sign-in page and follow the link we email you."),
    ("Which payment methods do you accept?",
     "We accept Visa, Mastercard, PayPal and bank transfer; pay at checkout."),
    ("How do I return a damaged item?",
     "Start a return under Orders > Return item, attach a photo, and print the free label."),
    ("Can I get an invoice for my purchase?",
     "Download the invoice as a PDF from Orders > Invoice once the order has shipped."),
    ("How do I delete my account?",
     "Go to Settings > Privacy > Delete account and confirm with your password."),
    ("Do you ship abroad?",
     "We ship to 40 countries; the shipping page lists them with their delivery times."),
    ("How do I subscribe to the newsletter?",
     "Tick Newsletter under Settings > Notifications, or use the form at the page bottom."),
]  # fmt: skip
CHEAP, BASELINE = "gpt-4o-mini", "gpt-4o"
WRONG = "Sorry, I cannot help with that request. Please try again later."
MESH_CONFIG = """
[features.billing]
router = "rules"
tier = "simple"
cache_mode = "exact"

[features.orders]
router = "rules"
tier = "complex"
cache_mode = "exact"

[models."judge-model"]
provider = "openai"
context_window = 128000
input_usd_per_mtok = "1.00"
cached_input_usd_per_mtok = "0.50"
output_usd_per_mtok = "4.00"
batch_discount = "0.5"

[features.judge]
router = "rules"
tier = "simple"
baseline_model = "judge-model"
"""


@functools.cache
def minilm() -> SentenceEncoder:
    return minilm_encoder(1)


def similarity() -> SimilarityScorer:
    return SimilarityScorer(lambda texts: minilm().embed_sync(texts).vectors)


def request(
    rid: str, feature: str = "billing", reference: str | None = "Right."
) -> WorkloadRequest:
    return WorkloadRequest(
        id=rid,
        timestamp=datetime.datetime(2026, 11, 2, 9, tzinfo=datetime.UTC),
        team="support",
        feature=feature,
        messages=(Message("system", "Answer the customer."), Message("user", f"Question {rid}")),
        reference=reference,
    )


def pair(rid: str, control: float | None, treatment: float | None, **kw: Any) -> Pair:
    return Pair(
        request(rid, kw.pop("feature", "billing")),
        Answer(content="c", score=control, error=kw.pop("control_error", "")),
        Answer(content="t", score=treatment, error=kw.pop("treatment_error", "")),
    )


# --- scoring -------------------------------------------------------------------


def test_an_identical_answer_scores_one_and_an_unrelated_one_much_lower() -> None:
    reference = QA[0][1]
    scores = similarity().score(
        [reference, "Press Cancel on the order under Orders; your refund arrives in 5 days.",
         QA[4][1], "The weather in Lisbon is sunny today.", ""],
        [reference] * 5,
    )  # fmt: skip

    identical, paraphrase, other_task, unrelated, empty = scores
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert 0.6 < paraphrase < identical
    assert other_task < paraphrase
    assert unrelated < 0.3
    assert empty == 0.0
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_the_simulated_label_is_stripped_before_scoring() -> None:
    assert strip_label(f"{LABEL}Open Orders. ") == "Open Orders."
    assert strip_label("Open Orders.") == "Open Orders."


def test_a_negative_cosine_counts_as_zero() -> None:
    vectors = {"a": [1.0, 0.0], "b": [-1.0, 0.0]}
    scorer = SimilarityScorer(lambda texts: np.array([vectors[t] for t in texts], np.float32))
    assert scorer.score(["a", "b"], ["a", "a"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("reply", "grade"),
    [
        ("SCORE: 4", 4),
        ("  SCORE:5  \n", 5),
        ("SCORE:\t1", 1),
        ("The answer misses the refund time.\nSCORE: 3", 3),
        (f"{LABEL}SCORE: 2", 2),
    ],
)
def test_a_judge_reply_in_the_format_gives_its_grade(reply: str, grade: int) -> None:
    assert parse_grade(reply) == grade


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "   \n ",
        "SCORE: 6",
        "SCORE: 0",
        "score: 4",
        "SCORE: 4.",
        "SCORE: 4/5",
        "SCORE: four",
        "SCORE: 3\nSCORE: 5",
        "SCORE: 4\nHope this helps.",
        "I would give it a 4.",
        "Score: 5 because\nSCORE: 5",
        "{'score': 5}",
        "\x00\x01garbage\ufffd",
    ],
)
def test_garbage_from_the_judge_is_no_grade(reply: str) -> None:
    assert parse_grade(reply) is None


def test_grades_map_onto_the_similarity_scale() -> None:
    assert [grade_score(g) for g in (1, 2, 3, 4, 5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_the_judge_sees_the_rubric_the_conversation_the_reference_and_the_answer() -> None:
    system, user = judge_messages(request("a", reference="Press Cancel."), "Call us.")
    assert system.role == types_pb2.ROLE_SYSTEM
    assert "SCORE: N" in system.content
    assert "customer: Question a" in user.content
    assert "<reference>\nPress Cancel.\n</reference>" in user.content
    assert "<answer>\nCall us.\n</answer>" in user.content


# Bitext-style agent answers to three intents of one category: alike in form, apart in
# what they tell the customer.
CANCEL = (
    "I understand you want to cancel order {n}. Go to Your Orders, select the order "
    "and choose Cancel order; the refund reaches your card within five days."
)
CHANGE = (
    "I understand you want to change order {n}. Go to Your Orders, select the order "
    "and choose Edit items to add or remove products before it ships."
)
TRACK = (
    "I understand you want to know where order {n} is. Go to Your Orders, select the "
    "order and choose Track package to see the carrier's latest scan."
)


def labelled(rid: str, label: str, reference: str) -> WorkloadRequest:
    return dataclasses.replace(request(rid, "reply", reference), label=label)


def test_a_match_takes_a_reworded_answer_and_refuses_a_neighbour_s_or_a_deflection() -> None:
    intents = (("cancel", CANCEL), ("change", CHANGE), ("track", TRACK))
    requests = [labelled(f"{label}{n}", label, text.format(n=n))
                for n in (1, 2) for label, text in intents]  # fmt: skip
    answers = {
        "reworded": "Sure: open Your Orders, pick the order, press Cancel order, and your "
        "money is refunded to the card in about five days.",
        "neighbour's": CHANGE.format(n=1),
        "deflection": "Sorry, I cannot help with that request. Please try again later.",
        "empty": "",
    }
    pairs = [Pair(requests[0], Answer(content=requests[0].reference or ""), Answer(content=a))
             for a in answers.values()]  # fmt: skip
    pairs += [Pair(r, Answer(content=r.reference or ""), Answer(error="UNAVAILABLE"))
              for r in requests[1:]]  # fmt: skip

    assert match_features(requests) == {"reply"}
    MatchScorer(lambda texts: minilm().embed_sync(texts).vectors).score(pairs, {"reply"})

    scores = dict(zip(answers, (p.treatment.score for p in pairs), strict=False))
    assert scores == {"reworded": 1.0, "neighbour's": 0.0, "deflection": 0.0, "empty": 0.0}
    assert all(p.control.score == 1.0 for p in pairs), "every reference matches itself"
    assert all(p.treatment.score is None for p in pairs[len(answers) :]), "no answer, no score"


def test_a_match_judges_only_features_whose_references_carry_two_labels_or_more() -> None:
    def feature(name: str, *requests: WorkloadRequest) -> list[WorkloadRequest]:
        return [dataclasses.replace(r, feature=name) for r in requests]

    requests = feature("one", labelled("a", "cancel", CANCEL), labelled("b", "cancel", TRACK))
    requests += feature("unlabelled", request("c", reference="Text."), labelled("d", "x", "Y."))
    requests += feature("two", labelled("e", "cancel", CANCEL), labelled("f", "track", TRACK))

    assert match_features(requests) == {"two"}


# --- the comparison --------------------------------------------------------------


def test_equal_arms_pass_with_no_drop() -> None:
    result = compare([pair(str(i), 0.9, 0.9) for i in range(10)], margin=0.05)
    assert result.passed
    assert result.overall.drop == pytest.approx(0.0)
    assert result.overall.drop_low == pytest.approx(0.0)
    assert result.overall.drop_high == pytest.approx(0.0)


def test_a_worse_treatment_fails_and_names_the_features_below_the_margin() -> None:
    pairs = [pair(f"b{i}", 0.9, 0.45, feature="billing") for i in range(10)]
    pairs += [pair(f"o{i}", 0.9, 0.9, feature="orders") for i in range(10)]

    result = compare(pairs, margin=0.05)

    assert not result.passed
    assert result.overall.drop == pytest.approx(0.25)
    assert result.overall.drop_low <= 0.25 <= result.overall.drop_high
    billing, orders = result.features
    assert billing.name == "billing"
    assert billing.drop == pytest.approx(0.5)
    assert orders.name == "orders"
    assert orders.drop == pytest.approx(0.0)
    overall, billing_alone = result.reasons
    assert "25.00% below control, more than the 5.00% margin" in overall
    assert (
        billing_alone
        == "billing scores 50.00% below control on its own (--waive billing to accept it)"
    )
    assert "orders" not in " ".join(result.reasons)


def test_a_feature_over_the_margin_fails_the_gate_unless_waived() -> None:
    pairs = [pair(f"b{i}", 1.0, 0.8 if i % 2 else 1.0, feature="billing") for i in range(10)]
    pairs += [pair(f"o{i}", 1.0, 1.0, feature="orders") for i in range(30)]

    strict = compare(pairs, margin=0.05)
    waived = compare(pairs, margin=0.05, waived=["billing"])

    assert strict.overall.drop == pytest.approx(0.025)  # within the margin overall
    assert not strict.passed
    assert strict.reasons == [
        "billing scores 10.00% below control on its own (--waive billing to accept it)"
    ]
    assert waived.passed
    assert "over the margin on their own, waived: billing (10.0%)" in verdict(waived)


def test_the_gate_says_the_smallest_drop_it_catches_and_the_requests_a_drop_needs() -> None:
    rng = random.Random(5)
    noisy = [pair(str(i), 1.0, float(rng.random() < 0.9)) for i in range(100)]
    few, many = compare(noisy[:25], 0.05), compare(noisy, 0.05)

    # The gate fails an estimate over the margin: 80% of the time once the true drop is
    # 0.84 standard errors past it. More requests, a smaller standard error.
    assert few.overall.standard_error > many.overall.standard_error
    assert 0.02 < many.overall.standard_error < 0.05  # a 0/1 score at 90%: 0.3 / sqrt(100)
    assert many.overall.detectable(0.05) == pytest.approx(
        0.05 + 0.841621 * many.overall.standard_error
    )
    assert many.overall.needed(0.05, 0.05) is None, "a drop at the margin is meant to pass"
    larger, smaller = many.overall.needed(0.10, 0.05), many.overall.needed(0.07, 0.05)
    assert larger is not None
    assert smaller is not None
    assert larger < smaller
    line = power(many, 0.08)
    assert "the gate fails a true drop of" in line
    assert f"to catch a drop of 8.0% as often: {many.overall.needed(0.08, 0.05):,} requests" in line


def test_arms_that_agree_on_every_request_still_have_a_standard_error() -> None:
    same = compare([pair(str(i), 1.0, 1.0) for i in range(50)], 0.05)

    assert same.overall.standard_error == pytest.approx(1 / 50)
    assert same.overall.detectable(0.05) > 0.05


def test_exact_scoring_gives_a_wrong_label_nothing() -> None:
    request = dataclasses.replace(pair("x", 1.0, 1.0).request, reference="track_order")
    right = Pair(
        request, Answer(content="[simulated] Track_Order."), Answer(content="cancel_order")
    )

    score_exactly([right], {request.feature})

    assert (right.control.score, right.treatment.score) == (1.0, 0.0)


def test_label_features_are_those_whose_references_are_a_few_short_labels() -> None:
    base = pair("x", 1.0, 1.0).request
    requests = [dataclasses.replace(base, feature="intent", reference=r) for r in ("a_b", "c")]
    requests += [
        dataclasses.replace(
            base, feature="reply", reference="Thanks, here is how: 1. Open the app 2. Tap orders"
        )
    ]

    assert label_features(requests) == {"intent"}


def test_a_feature_drop_of_exactly_the_margin_passes_and_one_over_it_fails() -> None:
    pairs = [pair(f"b{i}", 1.0, 0.9 if i % 2 else 1.0, feature="billing") for i in range(10)]
    pairs += [pair(f"o{i}", 1.0, 1.0, feature="orders") for i in range(30)]

    line = verdict(compare(pairs, margin=0.05))

    assert line.startswith("PASS: treatment scores 1.25% below control, within the 5.00% margin")
    assert "over the margin" not in line, "a drop of exactly the margin is within it"
    worse = [pair(f"b{i}", 1.0, 0.8 if i % 2 else 1.0, feature="billing") for i in range(10)]
    line = verdict(compare(worse + pairs[10:], margin=0.05))
    assert line.startswith("FAIL: billing scores 10.00% below control on its own")


def test_a_question_asked_again_is_not_new_evidence() -> None:
    """Twenty questions asked five times each say less than a hundred distinct ones with
    the same scores: a repeat gets the same answer (and a cache hit) every time."""
    scores = [(1.0, float(i % 10 != 0)) for i in range(20)]
    distinct = [pair(f"q{i}", c, t) for i, (c, t) in enumerate(scores * 5)]
    repeated = [pair(f"q{i}", c, t) for _ in range(5) for i, (c, t) in enumerate(scores)]

    spread, clustered = compare(distinct, 0.05).overall, compare(repeated, 0.05).overall

    assert clustered.drop == pytest.approx(spread.drop) == pytest.approx(0.1)
    assert clustered.requests == spread.requests == 100
    assert clustered.standard_error > 1.8 * spread.standard_error  # about sqrt(5) times
    assert clustered.drop_high - clustered.drop_low > 1.8 * (spread.drop_high - spread.drop_low)


def test_a_slice_of_one_question_asked_again_and_again_cannot_fail_on_its_own() -> None:
    once = [pair("q", 1.0, 1.0) for _ in range(18)] + [pair("q", 1.0, 0.0) for _ in range(2)]
    once = [dataclasses.replace(p, request=dataclasses.replace(p.request, feature="faq"))
            for p in once]  # fmt: skip
    others = [pair(f"o{i}", 1.0, 1.0, feature="orders") for i in range(380)]

    result = compare(once + others, 0.05)
    (faq,) = [g for g in result.features if g.name == "faq"]

    assert (faq.requests, faq.conversations) == (20, 1)
    assert faq.drop == pytest.approx(0.1)
    assert faq.standard_error == pytest.approx(1.0), "one conversation: no interval at all"
    assert result.passed, "one question is one piece of evidence, however often asked"
    assert (
        "within noise (an interval reaching zero, or too few distinct conversations): "
        "faq (10.0%)" in verdict(result)
    )


def test_a_tier_answered_badly_fails_the_gate_even_when_the_average_passes() -> None:
    def tiered(rid: str, tier: str, treatment: float) -> Pair:
        base = pair(rid, 1.0, treatment)
        return dataclasses.replace(base, request=dataclasses.replace(base.request, tier=tier))

    pairs = [tiered(f"s{i}", "simple", 1.0) for i in range(90)]
    pairs += [tiered(f"c{i}", "complex", float(i % 2)) for i in range(10)]

    strict = compare(pairs, 0.05)
    waived = compare(pairs, 0.05, waived=["tier:complex"])

    assert strict.overall.drop == pytest.approx(0.05), "the average is within the margin"
    assert [g.name for g in strict.tiers] == ["tier:complex", "tier:simple"]
    complex_tier = strict.tiers[0]
    assert complex_tier.drop == pytest.approx(0.5)
    assert complex_tier.drop_low > 0.05, "its interval is wholly above the margin"
    assert strict.reasons == [
        "tier:complex scores 50.00% below control on its own (--waive tier:complex to accept it)"
    ]
    assert waived.passed


def test_a_pass_whose_interval_reaches_the_margin_says_how_many_requests_would_settle_it() -> None:
    rng = random.Random(3)
    pairs = [pair(str(i), 1.0, float(rng.random() > 0.03)) for i in range(200)]

    result = compare(pairs, 0.05)
    needed = result.overall.needed_to_clear(0.05)

    assert result.passed
    assert result.overall.drop < 0.05 < result.overall.drop_high
    assert needed is not None
    assert needed > 200
    assert f"about {needed:,} requests of this mix would put it below the margin" in verdict(result)
    settled = compare([pair(str(i), 1.0, 1.0) for i in range(200)], 0.05).overall
    assert settled.needed_to_clear(0.05) is None


def test_a_better_treatment_passes_with_a_negative_drop() -> None:
    result = compare([pair(str(i), 0.5, 0.75) for i in range(5)], margin=0.0)
    assert result.passed
    assert result.overall.drop == pytest.approx(-0.5)


def test_a_failed_treatment_scores_zero_and_a_failed_control_is_left_out() -> None:
    pairs = [pair(str(i), 1.0, 1.0) for i in range(18)]
    pairs.append(pair("t", 1.0, None, treatment_error="UNAVAILABLE: provider down"))
    pairs.append(pair("c", None, 1.0, control_error="UNAVAILABLE: provider down"))

    result = compare(pairs, margin=0.1)

    assert (result.overall.requests, result.left_out) == (19, 1)
    assert (result.control_errors, result.treatment_errors) == (1, 1)
    assert result.overall.treatment == pytest.approx(18 / 19)
    assert result.passed


def test_too_many_requests_left_out_fail_the_gate() -> None:
    pairs = [pair(str(i), 1.0, 1.0) for i in range(8)] + [
        pair("x", 1.0, None),
        pair("y", 1.0, None),
    ]
    result = compare(pairs, margin=0.05)
    assert not result.passed
    assert "2 of 10 requests could not be compared" in result.reasons[0]


def test_unparseable_judge_replies_are_counted_and_left_out() -> None:
    pairs = [pair(str(i), 1.0, 1.0) for i in range(19)]
    garbled = pair("g", 1.0, None)
    garbled.treatment.judge_reply = "Looks fine!"
    result = compare([*pairs, garbled], margin=0.05)
    assert (result.unparseable, result.left_out, result.overall.requests) == (1, 1, 19)
    assert result.passed


def test_no_control_answer_is_nothing_to_compare() -> None:
    pairs = [pair(str(i), None, 1.0, control_error="INVALID_ARGUMENT: feature") for i in range(3)]
    with pytest.raises(NothingToCompareError, match="every control request failed"):
        compare(pairs, margin=0.05)


def test_a_mesh_that_ignores_the_arm_is_refused() -> None:
    reply = inference_pb2.CompleteResponse(content="hi")
    with pytest.raises(EvalAbortError, match="does not run experiment arms"):
        check_arm(reply, "eval-1", types_pb2.ARM_CONTROL)
    check_arm(
        inference_pb2.CompleteResponse(experiment="eval-1", arm=types_pb2.ARM_CONTROL),
        "eval-1",
        types_pb2.ARM_CONTROL,
    )


def test_request_ids_differ_by_arm_and_stay_within_the_limit() -> None:
    assert request_id("eval-1", "control", "a") != request_id("eval-1", "treatment", "a")
    long = request_id("eval-1", "control", "x" * 500)
    assert len(long) <= 128
    assert long != request_id("eval-1", "control", "y" * 500)


def test_only_requests_with_a_reference_of_the_named_features_are_chosen() -> None:
    requests = [request("a"), request("b", reference=None), request("c", "orders")]
    assert [r.id for r in select(requests, "", None)] == ["a", "c"]
    assert [r.id for r in select(requests, "orders", None)] == ["c"]
    assert [r.id for r in select(requests, "", 1)] == ["a"]
    with pytest.raises(WorkloadError, match="--features: no request of nope"):
        select(requests, "billing,nope", None)
    with pytest.raises(WorkloadError, match="no request has a reference"):
        select([request("b", reference=None)], "", None)


# --- the command -----------------------------------------------------------------


def write_workload(path: Path, rows: Sequence[tuple[str, str, str]]) -> Path:
    """(feature, question, reference) rows as a workload, also the simulator's knowledge;
    a question's intent is its reference's."""
    intents: dict[str, str] = {}
    lines = [
        {
            "id": f"r{i}",
            "timestamp": f"2026-11-02T09:{i:02d}:00Z",
            "team": "support",
            "feature": feature,
            "messages": [
                {"role": "system", "content": "You answer an online store's customers."},
                {"role": "user", "content": question},
            ],
            "reference": reference,
            "tier": "simple",
            "label": intents.setdefault(reference, f"intent-{len(intents)}"),
        }
        for i, (feature, question, reference) in enumerate(rows)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_eval(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = write_workload(tmp_path / "w.jsonl", [("billing", *QA[0])])
    no_reference = tmp_path / "none.jsonl"
    no_reference.write_text(
        json.dumps({"timestamp": "2026-11-02T09:00:00Z", "team": "t", "feature": "f",
                    "messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )  # fmt: skip
    key = ["--key", DEMO_KEY, "--address", "127.0.0.1:1"]
    cases = {
        "no such file": [str(tmp_path / "missing.jsonl"), *key],
        "no request has a reference": [str(no_reference), *key],
        "--margin: must be at least 0 and below 1": [str(workload), *key, "--margin", "1"],
        "--margin: must be at least 0 and below": [str(workload), *key, "--margin", "-0.1"],
        "--margin: not a number": [str(workload), *key, "--margin", "lots"],
        "--scorer judge needs --judge-feature": [str(workload), *key, "--scorer", "judge"],
        "--experiment: letters": [str(workload), *key, "--experiment", "a b"],
        "--key (or COSTMESH_API_KEY) is required": [str(workload), "--key", ""],
        "--detect: a drop in (0, 1)": [str(workload), *key, "--detect", "5"],
        "--waive: no request of feature or tier 'biling'": [
            str(workload),
            *key,
            "--waive",
            "biling",
        ],
        "--waive: no request of feature or tier 'tier:complex'": [
            str(workload),
            *key,
            "--waive",
            "tier:complex",
        ],
        "--scorer match: feature 'billing' needs free-text references with a label": [
            str(workload),
            *key,
            "--scorer",
            "match",
        ],
    }
    for message, args in cases.items():
        code, out, err = run_eval(args, capsys)
        assert code == 2, message
        assert out == ""
        assert err.count("\n") == 1, err
        assert message in err


def test_match_refuses_label_references_which_repeat_across_intents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [("route", "Where is my parcel?", "resolve"), ("route", "You lost it!", "escalate")]
    workload = write_workload(tmp_path / "w.jsonl", rows)

    code, out, err = run_eval(
        [str(workload), "--key", DEMO_KEY, "--address", "127.0.0.1:1", "--scorer", "match"], capsys
    )

    assert (code, out) == (2, "")
    assert "--scorer match: feature 'route' needs free-text references" in err
    assert "(auto scores label references exactly)" in err


def test_no_mesh_at_the_address_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eval_commands, "CONNECT_SECONDS", 0.5)
    workload = write_workload(tmp_path / "w.jsonl", [("billing", *QA[0])])
    code, _, err = run_eval([str(workload), "--key", DEMO_KEY, "--address", "127.0.0.1:1"], capsys)
    assert code == 2
    assert "no mesh answers at 127.0.0.1:1" in err


def test_the_mesh_failing_is_exit_2_not_the_gate_s_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    workload = write_workload(tmp_path / "w.jsonl", [("billing", *QA[0])])

    def refuse(*_: object) -> None:
        raise ConnectionResetError("connection reset by the mesh")

    monkeypatch.setattr(eval_commands, "_run", refuse)
    args = [str(workload), "--key", DEMO_KEY, "--scorer", "judge", "--judge-feature", "billing"]
    code, out, err = run_eval(args, capsys)

    assert code == 2
    assert out == ""
    assert err.endswith("costmesh: connection reset by the mesh\n")


def test_no_banner_when_no_answer_was_simulated() -> None:
    request = WorkloadRequest(
        id="a", timestamp=datetime.datetime(2026, 11, 2, tzinfo=datetime.UTC), team="t",
        feature="f", messages=(Message("user", "hi"),), reference="hello",
    )  # fmt: skip
    real = Pair(request, control=Answer(content="x"), treatment=Answer(content="y"))
    assert simulated_banner([real]) == ""
    half = Pair(request, control=Answer(content="x", simulated=True), treatment=Answer(error="E"))
    assert simulated_banner([half]).startswith("SIMULATED: 1 of 1 answers")


@pytest.fixture
def realistic(tmp_path: Path) -> OpenAISimulator:
    """Knows the workload's answers; gpt-4o-mini is given a strong model's accuracy, so
    only a script makes it wrong."""
    knowledge = write_workload(tmp_path / "workload.jsonl", workload_rows())
    return OpenAISimulator(
        api_key=PROVIDER_KEY,
        realistic=True,
        latency_scale=0,
        knowledge=knowledge,
        model_tiers={CHEAP: "complex"},
    )


def workload_rows() -> list[tuple[str, str, str]]:
    """Ten billing and ten orders requests; two billing questions repeat (cache hits)."""
    rows = [("billing", q, r) for q, r in QA] + [("orders", f"{q} (orders)", r) for q, r in QA]
    return rows[:8] + rows[:2] + rows[10:]


async def eval_against(
    realistic: OpenAISimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str, list[Any]]:
    with realistic:
        async with running_mesh(realistic, tmp_path, MESH_CONFIG) as mesh:
            args = [str(tmp_path / "workload.jsonl"), "--address", mesh.address,
                    "--key", DEMO_KEY, "--experiment", "gate-1", *extra]  # fmt: skip
            code = await asyncio.to_thread(main, ["eval", *args])
            rows = await ledger_rows(mesh)
    captured = capsys.readouterr()
    return code, captured.out, captured.err, rows


async def test_the_gate_passes_when_the_cheap_model_answers_as_well(
    realistic: OpenAISimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_csv = tmp_path / "results.csv"
    code, out, _, rows = await eval_against(
        realistic, tmp_path, capsys, "--out", str(out_csv), "--concurrency", "1"
    )

    assert code == 0, out
    assert "PASS: treatment scores" in out
    results = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(results) == 20
    assert {r["control_model"] for r in results} == {BASELINE}
    billing = [r for r in results if r["feature"] == "billing"]
    assert {r["treatment_model"] for r in billing} == {CHEAP}
    assert sum(int(r["treatment_cached"]) for r in results) == 2, "the repeated questions"
    assert all(float(r["control_score"]) > 0.99 for r in results)
    # The strong models are wrong 1% of the time (seeded): here, never more than once.
    assert sum(float(r["treatment_score"]) > 0.99 for r in results) >= 19
    assert "2 of 20 treatment answers from the cache" in out
    assert out.startswith("SIMULATED: 40 of 40 answers came from the local simulator")
    arms = {(r.experiment, r.arm) for r in rows}
    assert arms == {("gate-1", types_pb2.ARM_CONTROL), ("gate-1", types_pb2.ARM_TREATMENT)}


async def test_the_gate_fails_when_the_cheap_model_answers_wrongly(
    realistic: OpenAISimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    realistic.script(CHEAP, WRONG)

    code, out, _, _ = await eval_against(realistic, tmp_path, capsys)

    assert code == 1, out
    (verdict,) = [line for line in out.splitlines() if line.startswith("FAIL: ")]
    # Scored by match, a fluent wrong answer is simply wrong.
    assert "billing scores 100.00% below control on its own" in verdict
    assert "orders" not in verdict, "orders is routed to the baseline model"
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert float(table["billing"][3]) < 0.5 * float(table["billing"][2])
    assert table["orders"][4] == "0.0%"


async def test_the_judge_grades_through_the_mesh_uncached_on_its_baseline_model(
    realistic: OpenAISimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    realistic.script("judge-model", "SCORE: 5")

    code, out, _, rows = await eval_against(
        realistic, tmp_path, capsys, "--scorer", "judge", "--judge-feature", "judge"
    )

    assert code == 0, out
    judged = [r for r in rows if r.experiment == "gate-1-judge"]
    assert len(judged) == 40, "each answer of each arm, graded once"
    assert {(r.model, r.arm, r.cache_outcome) for r in judged} == {
        ("judge-model", types_pb2.ARM_CONTROL, types_pb2.CACHE_OUTCOME_BYPASS)
    }
    prompts = [r for r in realistic.requests if r["model"] == "judge-model"]
    assert all(p["temperature"] == 0 for p in prompts)
    assert any(QA[0][1] in p["messages"][1]["content"] for p in prompts)


async def test_unparseable_judge_replies_are_counted_not_dropped(
    realistic: OpenAISimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    realistic.script("judge-model", "Looks good to me!")

    code, _, err, _ = await eval_against(
        realistic, tmp_path, capsys, "--scorer", "judge", "--judge-feature", "judge"
    )

    assert code == 2
    assert "no control answer could be scored (judge replies unparseable: 20" in err
