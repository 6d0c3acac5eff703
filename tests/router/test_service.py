"""RouterService over gRPC on a real mesh: each classifier, reloads, the knob, stats."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from costmesh_tools.cli import main
from costmesh_tools.router.tickets import Ticket
from costmesh_tools.router.training import train
from services import SERVICES
from services.common.config import ConfigError, load_config
from services.common.embedding import shared_encoder
from services.mesh import start_mesh
from services.router.artefact import TIERS, TierModel
from services.router.policy import cheap_score
from tests.conftest import (
    AUTH,
    DEMO_KEY,
    SERVICE_AUTH,
    Mesh,
    ledger_rows,
    mesh_env,
    running_mesh,
    user_request,
)
from tests.router.conftest import TICKETS

COMPLEX = "I was charged twice for one order and the bank says it is your fault"
SIMPLE = "What time does the shop open?"


def route_request(text: str, feature: str = "default", **fields: object) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(
        feature=feature,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        **fields,  # type: ignore[arg-type]
    )


def config_for(artefact: Path) -> str:
    return f"""
[router]
artefact = "{artefact}"
reload_seconds = 0

[features.fixed]
router = "rules"
tier = "moderate"

[features.cheap_llm]
router = "llm"

[features.half]
cheap_share_target = 0.5

[features.unsure_llm]
router_out_of_domain = "llm"
"""


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path, artefact: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, config_for(artefact)) as running:
        yield running


def span_names(mesh: Mesh) -> list[str]:
    return [s.name for s in mesh.spans.get_finished_spans()]


def probabilities(response: router_pb2.RouteResponse) -> dict[str, float]:
    return {TIERS[p.tier - 1]: p.probability for p in response.probabilities}


async def test_the_embedding_classifier_routes_a_complex_ticket_to_the_large_model(
    mesh: Mesh, artefact: Path
) -> None:
    plan = await mesh.router.Route(route_request(COMPLEX), metadata=SERVICE_AUTH, timeout=10)

    assert plan.tier == types_pb2.TIER_COMPLEX
    assert plan.model == "gpt-4o"
    assert plan.escalation_model == ""  # already on the escalation model
    assert sum(probabilities(plan).values()) == pytest.approx(1.0, abs=1e-5)
    assert probabilities(plan)["complex"] > 0.5
    assert plan.classifier == "embedding"
    assert plan.classifier_version == TierModel.load(artefact).version
    assert plan.cheap_tier_threshold == 0.6  # the default knob
    assert "complex" in plan.reason
    assert "gpt-4o" in plan.reason
    route = next(s for s in mesh.spans.get_finished_spans() if s.name.endswith("/Route"))
    assert route.attributes is not None
    assert route.attributes["costmesh.route.tier"] == "complex"
    assert route.attributes["costmesh.route.reason"] == plan.reason
    assert route.attributes["costmesh.route.p_complex"] == probabilities(plan)["complex"]


async def test_a_simple_ticket_goes_to_the_small_model_with_the_escalation_model_named(
    mesh: Mesh,
) -> None:
    plan = await mesh.router.Route(route_request(SIMPLE), metadata=SERVICE_AUTH, timeout=10)

    assert plan.tier == types_pb2.TIER_SIMPLE
    assert (plan.model, plan.escalation_model) == ("gpt-4o-mini", "gpt-4o")
    assert plan.escalation_method == router_pb2.ESCALATION_METHOD_UNSPECIFIED  # feature: off


async def test_a_supplied_vector_is_used_instead_of_embedding_again(mesh: Mesh) -> None:
    vector = shared_encoder(None, 2).embed_sync([COMPLEX]).vectors[0].tolist()

    embedded = await mesh.router.Route(route_request(COMPLEX), metadata=SERVICE_AUTH, timeout=10)
    embeds_without = span_names(mesh).count("router.embed")
    mesh.spans.clear()
    reused = await mesh.router.Route(
        route_request(COMPLEX, embedding=vector, embedding_model=shared_encoder(None, 2).model),
        metadata=SERVICE_AUTH,
        timeout=10,
    )
    foreign = await mesh.router.Route(
        route_request(COMPLEX, embedding=vector, embedding_model="text-embedding-3-small"),
        metadata=SERVICE_AUTH,
        timeout=10,
    )

    assert embeds_without == 1
    assert span_names(mesh).count("router.embed") == 1  # only the foreign vector's request
    assert probabilities(reused) == pytest.approx(probabilities(embedded), abs=1e-5)
    assert probabilities(foreign) == pytest.approx(probabilities(embedded), abs=1e-5)


async def test_a_new_artefact_is_picked_up_and_a_broken_one_is_refused(
    mesh: Mesh, artefact: Path
) -> None:
    before = await mesh.router.Route(route_request(SIMPLE), metadata=SERVICE_AUTH, timeout=10)
    # Retrained with every ticket on complex but the password ones: another version.
    relabelled = [
        Ticket(t.text, "moderate" if t.label == "recover_password" else "complex") for t in TICKETS
    ]
    vectors = shared_encoder(None, 2).embed_sync([t.text for t in relabelled]).vectors
    new_version = train(
        relabelled, vectors, shared_encoder(None, 2).model, "relabelled"
    ).model.save(artefact)

    after = await mesh.router.Route(route_request(SIMPLE), metadata=SERVICE_AUTH, timeout=10)
    whole = artefact.read_bytes()  # noqa: ASYNC240 - a test's quick file work
    artefact.write_bytes(whole[: len(whole) // 2])  # noqa: ASYNC240 - caught mid-copy
    still = await mesh.router.Route(route_request(SIMPLE), metadata=SERVICE_AUTH, timeout=10)

    assert before.classifier_version != new_version
    assert after.classifier_version == new_version
    assert after.tier == types_pb2.TIER_COMPLEX  # the new model's opinion
    assert still.classifier_version == new_version  # the last good model keeps serving


async def test_the_rules_classifier_gives_the_fixed_tier(mesh: Mesh) -> None:
    plan = await mesh.router.Route(
        route_request(COMPLEX, "fixed"), metadata=SERVICE_AUTH, timeout=10
    )

    assert plan.tier == types_pb2.TIER_MODERATE
    assert plan.model == "gpt-4o-mini"
    assert plan.classifier == "rules"
    assert probabilities(plan) == {"simple": 0.0, "moderate": 1.0, "complex": 0.0}


async def test_the_llm_classifier_reports_the_tier_and_its_billed_tokens(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    plan = await mesh.router.Route(
        route_request(SIMPLE, "cheap_llm"), metadata=SERVICE_AUTH, timeout=10
    )

    assert plan.tier == types_pb2.TIER_SIMPLE  # the simulator's answer for a short question
    assert plan.classifier == "llm"
    assert plan.classifier_model == "gpt-4o-mini"
    assert plan.classifier_usage.input_tokens > 0
    assert plan.classifier_usage.output_tokens == 1
    sent = simulator.requests[-1]
    assert sent["max_tokens"] == 10
    assert sent["messages"][-1]["content"] == SIMPLE


@pytest.mark.parametrize("answer", ["I think this one is hard", "simple or complex", ""])
async def test_an_unparseable_llm_classification_routes_to_complex(
    mesh: Mesh, simulator: OpenAISimulator, answer: str
) -> None:
    simulator.script("gpt-4o-mini", answer)

    plan = await mesh.router.Route(
        route_request(SIMPLE, "cheap_llm"), metadata=SERVICE_AUTH, timeout=10
    )
    stats = await mesh.router.GetRouteStats(
        router_pb2.GetRouteStatsRequest(features=["cheap_llm"]), metadata=SERVICE_AUTH, timeout=5
    )

    assert plan.tier == types_pb2.TIER_COMPLEX
    assert plan.model == "gpt-4o"
    assert "not a tier" in plan.reason
    assert plan.classifier_usage.input_tokens > 0  # paid for all the same
    assert stats.features[0].classifier_failures == 1


async def test_a_failed_llm_classification_routes_to_complex(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.fail_next(3, status=503)  # the call and the SDK's two retries

    plan = await mesh.router.Route(
        route_request(SIMPLE, "cheap_llm"), metadata=SERVICE_AUTH, timeout=10
    )

    assert plan.tier == types_pb2.TIER_COMPLEX
    assert "failed" in plan.reason


async def test_a_caller_that_names_the_model_skips_routing(mesh: Mesh) -> None:
    plan = await mesh.router.Route(
        route_request(COMPLEX, requested_model="gpt-4o-mini"), metadata=SERVICE_AUTH, timeout=10
    )

    assert (plan.model, plan.classifier, plan.tier) == ("gpt-4o-mini", "caller", 1)
    assert plan.escalation_model == ""


async def test_stats_count_the_tiers_and_the_share_below_complex(mesh: Mesh) -> None:
    for text in (SIMPLE, COMPLEX, "How do I reset my password?", COMPLEX):
        await mesh.router.Route(route_request(text, "half"), metadata=SERVICE_AUTH, timeout=10)

    stats = await mesh.router.GetRouteStats(
        router_pb2.GetRouteStatsRequest(features=["half"]), metadata=SERVICE_AUTH, timeout=5
    )

    half = stats.features[0]
    routed = {TIERS[t.tier - 1]: t.requests for t in half.tiers}
    assert half.requests == 4 == sum(routed.values())
    assert half.cheap_share_observed == (routed["simple"] + routed["moderate"]) / 4
    assert half.cheap_share_target == 0.5
    assert 0 < half.cheap_tier_threshold <= 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (route_request(SIMPLE, "nope"), "feature"),
        (
            router_pb2.RouteRequest(
                feature="default",
                messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content="hi")],
            ),
            "messages",
        ),
    ],
)
async def test_a_bad_route_request_is_refused_naming_the_field(
    mesh: Mesh, request_: router_pb2.RouteRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.router.Route(request_, metadata=SERVICE_AUTH, timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_a_mesh_with_a_missing_artefact_refuses_to_start(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[features.default]\nrouter_artefact = "{tmp_path / "none.npz"}"\n')
    env = mesh_env(simulator, tmp_path)

    with pytest.raises(
        ConfigError, match=r"features\.default\.router_artefact: .*no such artefact"
    ):
        await start_mesh(load_config(config, env=env), env, SERVICES, TracerProvider(), port=0)


async def test_escalation_without_a_model_to_escalate_to_is_a_configuration_error(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[features.x]\nescalation = "self_rating"\nescalation_model = ""\n')
    env = mesh_env(simulator, tmp_path)

    with pytest.raises(ConfigError, match=r"features\.x\.escalation_model: self_rating"):
        await start_mesh(load_config(config, env=env), env, SERVICES, TracerProvider(), port=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
async def test_a_vector_that_is_not_finite_is_refused_not_routed(mesh: Mesh, bad: float) -> None:
    vector = [0.0] * 383 + [bad]
    request = router_pb2.RouteRequest(
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Where is my card?")],
        embedding=vector,
        embedding_model=shared_encoder(None, 1).model,
    )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.router.Route(request, metadata=SERVICE_AUTH, timeout=10)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("embedding")


FAR_AWAY = "Derive the closed form of the Black-Scholes price of a European call option"


async def test_a_question_far_from_the_training_data_goes_to_the_safe_tier(
    mesh: Mesh, artefact: Path
) -> None:
    model = TierModel.load(artefact)
    in_domain = await mesh.router.Route(route_request(SIMPLE), metadata=SERVICE_AUTH, timeout=10)
    far = await mesh.router.Route(route_request(FAR_AWAY), metadata=SERVICE_AUTH, timeout=10)
    stats = await mesh.router.GetRouteStats(
        router_pb2.GetRouteStatsRequest(features=["default"]), metadata=SERVICE_AUTH, timeout=5
    )

    assert model.centroids is not None
    assert 0 < model.ood_min_similarity < 1
    assert in_domain.tier == types_pb2.TIER_SIMPLE
    assert (far.tier, far.model) == (types_pb2.TIER_COMPLEX, "gpt-4o")
    assert "out of domain (nearest intent at similarity" in far.reason
    assert "the safe tier" in far.reason
    assert (far.out_of_domain, in_domain.out_of_domain) == (True, False)
    assert stats.features[0].out_of_domain == 1
    routes = [s for s in mesh.spans.get_finished_spans() if s.name.endswith("/Route")]
    assert [r.attributes["costmesh.route.out_of_domain"] for r in routes if r.attributes] == [
        False,
        True,
    ]


async def test_a_feature_may_send_out_of_domain_questions_to_the_llm_classifier_billed(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.script("gpt-4o-mini", "simple")

    far = await mesh.router.Route(
        route_request(FAR_AWAY, "unsure_llm"), metadata=SERVICE_AUTH, timeout=10
    )

    assert far.tier == types_pb2.TIER_SIMPLE  # the llm classifier's word, not the artefact's
    assert far.reason.startswith("embedding classifier")
    assert "out of domain" in far.reason
    assert far.classifier_usage.input_tokens > 0  # inference bills it as a routing row
    assert far.classifier_model == "gpt-4o-mini"


def test_an_artefact_from_before_the_detection_routes_as_it_did(
    trained_model: TierModel, tmp_path: Path
) -> None:
    old = dataclasses.replace(
        trained_model, centroids=None, ood_min_similarity=0.0, familiar_similarity=0.0
    )
    old.save(tmp_path / "old.npz")
    loaded = TierModel.load(tmp_path / "old.npz")
    without_ramp = dataclasses.replace(trained_model, familiar_similarity=0.0)
    questions = shared_encoder(None, 2).embed_sync([FAR_AWAY, SIMPLE, COMPLEX]).vectors

    assert loaded.centroids is None
    assert loaded.nearest_similarity(questions) is None
    assert not loaded.unfamiliarity(questions).any()
    # With the bar but no familiar similarity: out of domain or not, nothing between.
    nearest = without_ramp.nearest_similarity(questions)
    assert nearest is not None
    np.testing.assert_array_equal(
        without_ramp.unfamiliarity(questions), nearest < without_ramp.ood_min_similarity
    )


async def test_a_question_near_the_edge_of_the_training_data_must_be_surer_to_go_cheaper(
    simulator: OpenAISimulator, tmp_path: Path, trained_model: TierModel, artefact: Path
) -> None:
    # The tiny training set makes the classifier certain; softened, it is 64% sure of
    # simple for SIMPLE. Then an artefact whose familiar region ends just above
    # SIMPLE's similarity to its nearest intent: in domain, but unfamiliarity 0.9.
    soft = dataclasses.replace(trained_model, temperature=2.5)
    vector = shared_encoder(None, 2).embed_sync([SIMPLE]).vectors
    (nearest,) = soft.nearest_similarity(vector)  # type: ignore[misc]
    edge = dataclasses.replace(
        soft, familiar_similarity=nearest + 0.09, ood_min_similarity=nearest - 0.01
    )
    soft.save(tmp_path / "soft.npz")
    edge.save(tmp_path / "edge.npz")
    config = config_for(artefact) + "".join(
        f'[features.{name}]\nrouter_artefact = "{tmp_path / name}.npz"\n'
        for name in ("soft", "edge")
    )

    (tmp_path / "mesh").mkdir()
    async with running_mesh(simulator, tmp_path / "mesh", config) as mesh:
        familiar = await mesh.router.Route(
            route_request(SIMPLE, "soft"), metadata=SERVICE_AUTH, timeout=10
        )
        at_edge = await mesh.router.Route(
            route_request(SIMPLE, "edge"), metadata=SERVICE_AUTH, timeout=10
        )
        routes = [s for s in mesh.spans.get_finished_spans() if s.name.endswith("/Route")]

    assert probabilities(familiar) == pytest.approx(probabilities(at_edge))  # same classifier
    assert familiar.tier == types_pb2.TIER_SIMPLE
    assert cheap_score(list(probabilities(at_edge).values())) < 0.96  # the raised bar
    assert (at_edge.tier, at_edge.model, at_edge.out_of_domain) == (
        types_pb2.TIER_COMPLEX,
        "gpt-4o",
        False,
    )
    assert "0.96 (the knob 0.60 raised: unfamiliarity 0.90)" in at_edge.reason
    unfamiliar = [r.attributes["costmesh.route.unfamiliarity"] for r in routes if r.attributes]
    assert unfamiliar == [0.0, pytest.approx(0.9)]


async def test_out_of_domain_questions_do_not_lower_a_cheap_share_target_s_bar(
    mesh: Mesh,
) -> None:
    for _ in range(3):
        await mesh.router.Route(route_request(FAR_AWAY, "half"), metadata=SERVICE_AUTH, timeout=10)
    simple = await mesh.router.Route(
        route_request(SIMPLE, "half"), metadata=SERVICE_AUTH, timeout=10
    )
    stats = await mesh.router.GetRouteStats(
        router_pb2.GetRouteStatsRequest(features=["half"]), metadata=SERVICE_AUTH, timeout=5
    )

    (half,) = stats.features
    assert half.out_of_domain == 3
    assert half.requests == 4
    # The share is of the traffic the classifier could judge: one request, sent cheap.
    assert simple.tier == types_pb2.TIER_SIMPLE
    assert half.cheap_share_observed == 1.0


async def test_the_ledger_row_says_the_answer_was_routed_out_of_domain(mesh: Mesh) -> None:
    await mesh.inference.Complete(user_request(FAR_AWAY, "default"), metadata=AUTH, timeout=10)
    await mesh.inference.Complete(user_request(SIMPLE, "default"), metadata=AUTH, timeout=10)
    await mesh.running.settled()

    rows = {
        r.model: r for r in await ledger_rows(mesh) if r.purpose == ledger_pb2.CALL_PURPOSE_ANSWER
    }

    assert rows["gpt-4o"].route_out_of_domain
    assert "out of domain" in rows["gpt-4o"].route_reason
    assert not rows["gpt-4o-mini"].route_out_of_domain
    # And the chargeback report, read from the ledger's daily rollup, counts it.
    spend = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_FEATURE),
        metadata=AUTH, timeout=5,
    )  # fmt: skip
    assert [(r.key, r.calls, r.out_of_domain_calls) for r in spend.rows] == [("default", 2, 1)]
    out = io.StringIO()
    args = ["ledger", "report", "--addr", mesh.address, "--key", DEMO_KEY,
            "--by", "feature", "--format", "csv"]  # fmt: skip
    with contextlib.redirect_stdout(out):
        assert await asyncio.to_thread(main, args) == 0
    report = {r["feature"]: r for r in csv.DictReader(io.StringIO(out.getvalue()))}
    assert report["default"]["out_of_domain_pct"] == "50.0"
