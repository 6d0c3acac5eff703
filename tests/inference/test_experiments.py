"""Experiments: the control arm runs the baseline policy, the arm is on the reply, the
trace and every ledger row, and a configured split holds its ratio."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services.common.config import ConfigError, load_config
from services.inference import experiments
from services.inference.settings import InferenceSettings
from tests.conftest import AUTH, Mesh, bad_request_fields, ledger_rows, running_mesh, user_request

CONFIG = """
[features.split]
router = "rules"
tier = "simple"
cache_mode = "exact"
baseline_model = "gpt-4o"
experiment = "cheaper-support"
control_share = 0.3
"""
CONTROL, TREATMENT = types_pb2.ARM_CONTROL, types_pb2.ARM_TREATMENT


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG) as running:
        yield running


async def test_the_control_arm_runs_the_baseline_policy_without_cache_or_routing(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    control = user_request("Where is my parcel?", "split", experiment="replay-1", arm=CONTROL)
    first = await mesh.inference.Complete(control, metadata=AUTH, timeout=10)
    again = await mesh.inference.Complete(control, metadata=AUTH, timeout=10)
    mesh.spans.clear()
    treated = user_request("Where is my parcel?", "split", experiment="replay-1", arm=TREATMENT)
    treatment = await mesh.inference.Complete(treated, metadata=AUTH, timeout=10)
    routed = [s for s in mesh.spans.get_finished_spans() if s.name.endswith("/Route")]
    rows = await ledger_rows(mesh)

    assert (first.model, first.experiment, first.arm) == ("gpt-4o", "replay-1", CONTROL)
    assert not again.cached, "the baseline policy has no cache"
    assert "control arm" in first.route_reason
    assert simulator.call_count == 3
    assert (treatment.model, treatment.arm) == ("gpt-4o-mini", TREATMENT)
    assert routed, "the treatment is routed"
    assert [(r.experiment, r.arm) for r in rows] == [("replay-1", CONTROL)] * 2 + [
        ("replay-1", TREATMENT)
    ]


async def test_the_arm_is_on_the_trace(mesh: Mesh) -> None:
    request = user_request("Refund please", experiment="replay-2", arm=CONTROL)
    reply = await mesh.inference.Complete(request, metadata=AUTH, timeout=10)

    complete = [
        s
        for s in mesh.spans.get_finished_spans()
        if s.name.endswith("/Complete") and (s.attributes or {}).get("costmesh.arm")
    ]
    assert len(complete) == 1
    assert complete[0].attributes is not None
    assert complete[0].attributes["costmesh.experiment"] == "replay-2"
    assert complete[0].attributes["costmesh.arm"] == "control"
    assert format(complete[0].context.trace_id, "032x") == reply.trace_id


async def test_a_configured_split_holds_its_ratio_and_marks_every_row(mesh: Mesh) -> None:
    calls = 300
    arms = [
        (
            await mesh.inference.Complete(
                user_request(f"Question {i}", "split"), metadata=AUTH, timeout=10
            )
        ).arm
        for i in range(calls)
    ]
    rows = await ledger_rows(mesh)

    share = arms.count(CONTROL) / calls
    tolerance = 4 * math.sqrt(0.3 * 0.7 / calls)  # four standard errors
    assert abs(share - 0.3) < tolerance, f"control share {share:.3f}"
    assert set(arms) == {CONTROL, TREATMENT}
    assert len(rows) == calls
    assert {r.experiment for r in rows} == {"cheaper-support"}
    by_arm = {r.arm: r.model for r in rows}
    assert by_arm == {CONTROL: "gpt-4o", TREATMENT: "gpt-4o-mini"}


def test_the_arm_is_a_pure_function_of_the_experiment_and_the_request_id() -> None:
    standing = experiments.FeatureExperiment("cheaper-support", 0.3)
    request = inference_pb2.CompleteRequest()
    ids = [f"req-{i}" for i in range(2000)]
    first = [experiments.assign(request, standing, i).arm for i in ids]
    again = [experiments.assign(request, standing, i).arm for i in ids]
    other = experiments.FeatureExperiment("another", 0.3)

    assert first == again, "a retried request id stays in its arm"
    assert abs(first.count(CONTROL) / len(ids) - 0.3) < 0.04
    assert first != [experiments.assign(request, other, i).arm for i in ids]


async def test_a_retried_stream_stays_in_its_arm(mesh: Mesh) -> None:
    """Streams are not replayed by request id: each retry runs, in the same arm."""
    arms: dict[str, set[int]] = {}
    for _attempt in range(3):
        for n in range(6):
            request = inference_pb2.StreamCompleteRequest(
                request=user_request(f"Question {n}", "split", request_id=f"s-{n}")
            )
            async for part in mesh.inference.StreamComplete(request, metadata=AUTH, timeout=10):
                if part.HasField("summary"):
                    arms.setdefault(f"s-{n}", set()).add(part.summary.arm)

    assert len(arms) == 6
    assert all(len(seen) == 1 for seen in arms.values()), arms
    assert {a for seen in arms.values() for a in seen} <= {CONTROL, TREATMENT}


async def test_a_cache_hit_names_the_request_whose_answer_it_reused(mesh: Mesh) -> None:
    first = await mesh.inference.Complete(
        user_request("Track order", request_id="origin-1"), metadata=AUTH, timeout=10
    )
    hit = await mesh.inference.Complete(user_request("Track order"), metadata=AUTH, timeout=10)
    rows = {r.client_request_id or r.request_id: r for r in await ledger_rows(mesh)}

    assert not first.cache_source_request_id
    assert hit.cached
    assert hit.cache_source_request_id == "origin-1"
    assert rows[hit.request_id].cache_source_request_id == "origin-1"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"arm": CONTROL}, "arm"),
        ({"experiment": "x" * 101}, "experiment"),
        ({"experiment": "e", "arm": 7}, "arm"),
        ({"experiment": "x\x00y"}, "experiment"),
        ({"experiment": "tab\there"}, "experiment"),
        ({"request_id": "id\x00"}, "request_id"),
    ],
    ids=[
        "arm without experiment",
        "long name",
        "unknown arm",
        "NUL in name",
        "control character in name",
        "NUL in request id",
    ],
)
async def test_bad_experiment_fields_are_refused_before_any_spend(
    mesh: Mesh, simulator: OpenAISimulator, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.inference.Complete(
            user_request("Hi", "split", **fields), metadata=AUTH, timeout=10
        )

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == [field]
    assert simulator.call_count == 0
    assert await ledger_rows(mesh) == []


async def test_a_control_call_on_a_feature_without_baseline_is_refused(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    config = CONFIG + '[features.bare]\nrouter = "rules"\nbaseline_model = ""\n'
    async with running_mesh(simulator, tmp_path, config) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.inference.Complete(
                user_request("Hi", "bare", experiment="e", arm=CONTROL), metadata=AUTH, timeout=10
            )

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["arm"]
    assert simulator.call_count == 0


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ('experiment = "e"\ncontrol_share = 1.5\n', r"features\.split\.control_share: must be"),
        ("control_share = 0.2\n", r"features\.split\.experiment: name the experiment"),
        ('experiment = "e"\nbaseline_model = ""\n', r"features\.split\.baseline_model: required"),
    ],
)
def test_a_bad_standing_experiment_fails_at_start(tmp_path: Path, toml: str, error: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[features.split]\n{toml}")
    with pytest.raises(ConfigError, match=error):
        InferenceSettings.from_config(load_config(path, env={}))
