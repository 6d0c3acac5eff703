"""The workload format, the bundled Bitext workload, its generator and their commands."""

from __future__ import annotations

import datetime
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from costmesh.types.v1 import types_pb2
from costmesh_tools.casestudy.support_workload import (
    BUNDLED_REQUESTS,
    BUNDLED_SEED,
    EVAL_DAYS,
    EVAL_REQUESTS,
    EVAL_SEED,
    FEATURES,
    SPLIT_SEED,
    START,
    bundled_workload_path,
    eval_workload_path,
    generate,
)
from costmesh_tools.casestudy.workload import (
    Message,
    WorkloadError,
    WorkloadRequest,
    chat_messages,
    read_workload,
    write_workload,
)
from costmesh_tools.cli import main
from costmesh_tools.router.tickets import default_data_dir, load_tickets
from services.router.artefact import TierModel
from services.router.plans import SHIPPED_ARTEFACT

UTC = datetime.UTC
GOOD = {
    "id": "a",
    "timestamp": "2026-11-02T09:14:03Z",
    "team": "support",
    "feature": "response-generation",
    "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}],
}


@pytest.fixture(scope="module")
def bitext_dir() -> Path:
    """The shared data sets beside the checkout. They are data outside the repository,
    not a machine service: absent (a clean clone, as in CI), the test skips, CI or not;
    the bundled workload itself is tested from the file in the repository."""
    data_dir = default_data_dir()
    if not (data_dir / "bitext_customer_support").is_dir():
        pytest.skip(
            f"{data_dir}/bitext_customer_support not found: the shared data sets are not "
            "beside this checkout (only the regeneration of the bundled workload needs them)"
        )
    return data_dir


@pytest.fixture(scope="module")
def bundled() -> list[WorkloadRequest]:
    return read_workload(bundled_workload_path())


def request(rid: str, at: str, **fields: object) -> WorkloadRequest:
    values: dict[str, object] = {
        "id": rid,
        "timestamp": datetime.datetime.fromisoformat(at),
        "team": "support",
        "feature": "kb-search",
        "messages": (Message("user", f"question {rid}"),),
        **fields,
    }
    return WorkloadRequest(**values)  # type: ignore[arg-type]


def write_lines(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["w.jsonl", "w.jsonl.gz"])
def test_a_written_workload_reads_back_the_same_by_timestamp(tmp_path: Path, name: str) -> None:
    full = request(
        "w-1", "2026-11-02T11:00:00+02:00",
        messages=(Message("system", "Classify."), Message("user", "where is my order?"),
                  Message("assistant", "Which order?"), Message("user", "the last one")),
        label="track_order", tier="simple", reference="track_order", max_tokens=16,
    )  # fmt: skip
    late, bare = request("w-2", "2026-11-02T10:00:00+00:00"), request("w-3", "2026-11-01T23:59:59Z")
    path = tmp_path / "sub" / name

    write_workload(path, [full, late, bare])
    back = read_workload(path)

    assert back == [bare, full, late]  # 11:00+02:00 is 09:00Z
    assert back[1].question == "the last one"
    assert path.stat().st_mode & 0o777 == 0o644
    assert list(path.parent.iterdir()) == [path]
    text = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    # Written in the order given, in UTC.
    assert json.loads(text.decode().splitlines()[0])["timestamp"] == "2026-11-02T09:00:00Z"


def test_ids_default_to_the_line_number_and_equal_timestamps_keep_file_order(
    tmp_path: Path,
) -> None:
    rows: list[object] = [{**GOOD, "id": "x"}, "", {k: v for k, v in GOOD.items() if k != "id"}]

    back = read_workload(write_lines(tmp_path / "w.jsonl", rows))

    assert [r.id for r in back] == ["x", "3"]


def test_messages_become_the_mesh_chat_messages() -> None:
    req = request("a", "2026-11-02T09:00:00Z", messages=(
        Message("system", "s"), Message("user", "u"), Message("assistant", "a"),
    ))  # fmt: skip

    messages = chat_messages(req)

    assert [m.role for m in messages] == [
        types_pb2.ROLE_SYSTEM, types_pb2.ROLE_USER, types_pb2.ROLE_ASSISTANT,
    ]  # fmt: skip
    assert [m.content for m in messages] == ["s", "u", "a"]


def _without(field: str) -> dict[str, object]:
    return {k: v for k, v in GOOD.items() if k != field}


def _messages(*pairs: tuple[str, str]) -> dict[str, object]:
    return {**GOOD, "messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ("{not json", "not JSON: "),
        (["a list"], "expected a JSON object, got a list"),
        ({**GOOD, "maxtokens": 5}, "maxtokens: unknown field"),
        (_without("timestamp"), "timestamp: required"),
        (_without("messages"), "messages: required"),
        ({**GOOD, "timestamp": "2026-11-02T09:14"}, "timestamp: '2026-11-02T09:14' is not RFC"),
        ({**GOOD, "timestamp": "2026-11-02T09:14:03"}, "timestamp: '2026-11-02T09:14:03' is not"),
        ({**GOOD, "timestamp": "2026-11-02"}, "timestamp: '2026-11-02' is not RFC 3339"),
        ({**GOOD, "timestamp": "2026-13-02T09:14:03Z"}, "timestamp: '2026-13-02T09:14:03Z': month"),
        ({**GOOD, "team": " "}, "team: must not be empty"),
        ({**GOOD, "feature": 7}, "feature: expected a string, got a number"),
        ({**GOOD, "id": None}, "id: expected a string, got null"),
        ({**GOOD, "id": "a"}, "id: 'a' is already used on line 1"),
        ({**GOOD, "messages": []}, "messages: expected a non-empty list"),
        ({**GOOD, "messages": ["hi"]}, "messages[0]: expected an object, got a string"),
        (_messages(("bot", "hi")), "messages[0].role: 'bot' is not one of system, user, assistant"),
        (_messages(("system", "s"), ("user", "")), "messages[1].content: must not be empty"),
        (_messages(("system", "s"), ("assistant", "a")), "messages: needs at least one user"),
        ({**GOOD, "messages": [{"role": "user"}]}, "messages[0].content: expected a string"),
        ({**GOOD, "tier": "hard"}, "tier: 'hard' is not one of simple, moderate, complex"),
        ({**GOOD, "label": ""}, "label: must not be empty"),
        ({**GOOD, "max_tokens": 0}, "max_tokens: must be positive, got 0"),
        ({**GOOD, "max_tokens": 2**31}, "max_tokens: must be at most 2147483647, got 2147483648"),
        ('{"timestamp": "2026-11-02T09:14:03Z", "team": "t", "feature": "f", "messages":'
         ' [{"role": "user", "content": "a \\ud800 b"}]}',
         "messages[0].content: not valid Unicode text (surrogates not allowed at character 2)"),
        ({**GOOD, "team": "\udfff"}, "team: not valid Unicode text"),
        ({**GOOD, "max_tokens": "300"}, "max_tokens: expected a whole number, got a string"),
        ({**GOOD, "max_tokens": True}, "max_tokens: expected a whole number, got a boolean"),
    ],
    ids=lambda x: x.split(":")[0] if isinstance(x, str) and ":" in x else None,
)  # fmt: skip
def test_a_bad_line_is_refused_with_its_line_and_field_and_the_file_is_untouched(
    tmp_path: Path, row: object, error: str
) -> None:
    path = write_lines(tmp_path / "w.jsonl", [GOOD, row])
    before = path.read_bytes()

    with pytest.raises(WorkloadError) as raised:
        read_workload(path)

    assert str(raised.value).startswith(f"{path}:2: {error}")
    assert "\n" not in str(raised.value)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("w.json", b"", "expected a .jsonl or .jsonl.gz file"),
        ("absent.jsonl", None, "no such file"),
        ("w.jsonl", b"\n\n", "no requests"),
        ("w.jsonl", b"\xff\xfe\n", "not UTF-8 text"),
        ("w.jsonl.gz", b"plain text", "cannot be read"),
        ("w.jsonl.gz", gzip.compress(json.dumps(GOOD).encode() * 50)[:-20], "cannot be read"),
    ],
    ids=["suffix", "missing", "empty", "encoding", "not gzip", "truncated gzip"],
)
def test_an_unreadable_file_is_refused_with_one_line(
    tmp_path: Path, name: str, content: bytes | None, error: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(WorkloadError, match=f"^{re.escape(f'{path}: {error}')}"):
        read_workload(path)


def test_writing_repeated_ids_fails_and_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl.gz"
    write_workload(path, [request("a", "2026-11-02T09:00:00Z")])
    before = path.read_bytes()
    twice = [request("b", "2026-11-02T09:00:00Z"), request("b", "2026-11-02T10:00:00Z")]

    with pytest.raises(
        WorkloadError, match=r"requests\[1\]\.id: 'b' is already used by requests\[0\]"
    ):
        write_workload(path, twice)
    with pytest.raises(WorkloadError, match=r"expected a \.jsonl or \.jsonl\.gz file"):
        write_workload(tmp_path / "w.csv", [request("c", "2026-11-02T09:00:00Z")])

    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_a_file_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")

    with pytest.raises(WorkloadError, match=re.escape(f"{blocked}/w.jsonl: cannot be written")):
        write_workload(blocked / "w.jsonl", [request("a", "2026-11-02T09:00:00Z")])

    assert list(tmp_path.iterdir()) == [blocked]


def test_an_invalid_request_cannot_be_made() -> None:
    with pytest.raises(WorkloadError, match="timestamp: needs a timezone"):
        request("a", "2026-11-02T09:00:00")


def test_the_bundled_workload_has_every_feature_at_its_share(
    bundled: list[WorkloadRequest],
) -> None:
    features = Counter(r.feature for r in bundled)
    limits = {f.name: f.max_tokens for f in FEATURES}

    assert len(bundled) == BUNDLED_REQUESTS == 1200
    assert len({r.id for r in bundled}) == len(bundled)
    for feature in FEATURES:
        assert abs(features[feature.name] / len(bundled) - feature.share) < 0.03, feature.name
    assert {r.team for r in bundled} == {"support"}
    assert all(r.max_tokens == limits[r.feature] for r in bundled)
    assert all(START <= r.timestamp < START + datetime.timedelta(days=1) for r in bundled)
    # Real traffic repeats itself, by paraphrase and verbatim.
    assert len({r.question for r in bundled}) < len(bundled)


def test_the_bundled_workload_is_labelled_with_one_tier_an_intent_and_fitting_references(
    bundled: list[WorkloadRequest],
) -> None:
    tier_of: dict[str, set[str | None]] = {}
    assert {r.tier for r in bundled} == {"simple", "moderate", "complex"}
    for r in bundled:
        assert r.label is not None
        tier_of.setdefault(r.label, set()).add(r.tier)
        expected = {
            "ticket-classification": r.label,
            "escalation-decision": "escalate" if r.tier == "complex" else "resolve",
            "sentiment-analysis": None,
        }
        if r.feature in expected:
            assert r.reference == expected[r.feature]
        else:
            assert r.reference is not None
            assert len(r.reference) > 100  # Bitext's agent response
    assert all(len(tiers) == 1 for tiers in tier_of.values()), "an intent has one tier"


def test_the_bundled_workload_is_labelled_by_tiers_json(
    bundled: list[WorkloadRequest], bitext_dir: Path
) -> None:
    tiers = json.loads((bitext_dir / "bitext_customer_support" / "tiers.json").read_text())
    assert all(r.label is not None and r.tier == tiers[r.label] for r in bundled)


def test_the_bundled_workload_asks_only_questions_the_router_never_trained_on(
    bundled: list[WorkloadRequest], bitext_dir: Path
) -> None:
    # The split is the one the shipped router artefact was trained with.
    assert TierModel.load(SHIPPED_ARTEFACT).meta["seed"] == SPLIT_SEED
    tickets = load_tickets("bitext", bitext_dir, SPLIT_SEED)
    questions = {r.question for r in bundled}

    assert questions <= {t.text for t in tickets.test}
    assert not questions & {t.text for t in tickets.train}


def test_the_bundled_workload_is_what_make_workload_builds(
    bundled: list[WorkloadRequest], bitext_dir: Path
) -> None:
    assert generate(BUNDLED_REQUESTS, BUNDLED_SEED, bitext_dir) == bundled


def test_the_quality_gates_workload_spans_its_days_with_every_feature_and_tier() -> None:
    shipped = read_workload(eval_workload_path())
    features = Counter(r.feature for r in shipped)
    end = START + datetime.timedelta(days=EVAL_DAYS)

    assert len(shipped) == EVAL_REQUESTS
    assert len({r.id for r in shipped}) == len(shipped)
    assert all(START <= r.timestamp < end for r in shipped)
    assert {r.timestamp.date() for r in shipped} == {
        (START + datetime.timedelta(days=d)).date() for d in range(EVAL_DAYS)
    }
    for feature in FEATURES:
        assert abs(features[feature.name] / len(shipped) - feature.share) < 0.03, feature.name
    assert Counter(r.tier for r in shipped)["complex"] > 300  # the gate reads the tiers


def test_the_quality_gates_workload_is_what_make_workload_builds_from_held_out_questions(
    bitext_dir: Path,
) -> None:
    shipped = read_workload(eval_workload_path())
    tickets = load_tickets("bitext", bitext_dir, SPLIT_SEED)

    assert shipped == generate(EVAL_REQUESTS, EVAL_SEED, bitext_dir, EVAL_DAYS)
    assert {r.question for r in shipped} <= {t.text for t in tickets.test}
    assert {r.tier for r in shipped} == {"simple", "moderate", "complex"}


def test_the_generator_is_the_same_for_a_seed_and_scales(
    tmp_path: Path, bitext_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [tmp_path / f"{name}.jsonl.gz" for name in ("a", "b", "c")]
    seeds = ["7", "7", "8"]
    codes = [
        main(["workload", "generate", "--requests", "5000", "--seed", seed, "--days", "2",
              "--out", str(path), "--data-dir", str(bitext_dir)])
        for seed, path in zip(seeds, paths, strict=True)
    ]  # fmt: skip
    out = capsys.readouterr().out

    assert codes == [0, 0, 0]
    assert f"wrote 5000 requests over 2 days (seed 7) to {paths[0]}" in out
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c
    requests = read_workload(paths[0])
    assert len(requests) == 5000
    assert requests[0].id == "w-000001"
    assert requests[-1].id == "w-005000"
    assert {r.timestamp.date() for r in requests} == {START.date(), START.date().replace(day=3)}


def test_show_summarises_a_workload(
    capsys: pytest.CaptureFixture[str], bundled: list[WorkloadRequest]
) -> None:
    code = main(["workload", "show", str(bundled_workload_path())])
    out = capsys.readouterr().out

    assert code == 0
    assert "1200 requests from 2026-11-02" in out
    for feature in FEATURES:
        assert feature.name in out
    for line in ("distinct questions: ", "exact repeats: "):
        assert line in out
    complex_count = sum(r.tier == "complex" for r in bundled)
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("complex"))
    assert row == ["complex", str(complex_count), f"{complex_count / len(bundled):.1%}"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["generate", "--out", "w.jsonl", "--requests", "0"], "--requests: must be at least 1"),
        (["generate", "--out", "w.jsonl", "--days", "x"], "argument --days: not a whole number"),
        (["generate"], "the following arguments are required: --out"),
        (["generate", "--out", "w.txt"], "w.txt: expected a .jsonl or .jsonl.gz file"),
        (["generate", "--out", "w.jsonl", "--data-dir", "nowhere"], "tiers.json: no such file"),
        (["show", "absent.jsonl"], "absent.jsonl: no such file"),
    ],
    ids=["requests", "days", "out", "suffix", "data-dir", "missing"],
)  # fmt: skip
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    error: str,
) -> None:
    monkeypatch.chdir(tmp_path)

    code = main(["workload", *args])
    err = capsys.readouterr().err.strip().splitlines()

    assert code == 2
    assert error in err[-1]
    assert all(line.startswith("usage:") or line.startswith(" ") for line in err[:-1])
    assert list(tmp_path.iterdir()) == []
