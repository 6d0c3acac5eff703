"""RouterService servicer: classify the question, apply the feature's knob, plan models."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
from opentelemetry import trace

from costmesh.router.v1 import router_pb2, router_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.auth import current_principal
from services.common.config import Config, ConfigError
from services.common.embedding import BatchingEmbedder, ModelError, SentenceEncoder, shared_encoder
from services.common.errors import InvalidArgument
from services.common.server import ServiceDef
from services.providers.client import Providers
from services.providers.settings import ProviderSettings
from services.router.artefact import TIERS, ArtefactError
from services.router.classifiers import (
    ArtefactFile,
    Classifier,
    EmbeddingClassifier,
    LLMClassifier,
    RulesClassifier,
)
from services.router.plans import SHIPPED_ARTEFACT, FeaturePlan, RouterSettings
from services.router.policy import CheapShare, cheap_score, choose_tier, raised

log = logging.getLogger(__name__)
SERVICE_NAME = "costmesh.router.v1.RouterService"
TIER_TO_PROTO = {
    "simple": types_pb2.TIER_SIMPLE,
    "moderate": types_pb2.TIER_MODERATE,
    "complex": types_pb2.TIER_COMPLEX,
}
ESCALATION_TO_PROTO = {
    "off": router_pb2.ESCALATION_METHOD_UNSPECIFIED,
    "self_rating": router_pb2.ESCALATION_METHOD_SELF_RATING,
    "logprobs": router_pb2.ESCALATION_METHOD_LOGPROBS,
}
# How long an llm classification may take when the caller set no deadline.
_DEFAULT_TIME_LIMIT = 5.0


class FeatureRouter:
    """One feature's classifier, knob and routing statistics."""

    def __init__(
        self, name: str, plan: FeaturePlan, classifier: Classifier, cheap_share: CheapShare
    ) -> None:
        self.name = name
        self.plan = plan
        self.classifier = classifier
        self.cheap_share = cheap_share
        self.tiers: Counter[str] = Counter()
        self.failures = 0
        self.out_of_domain = 0

    async def route(
        self, request: router_pb2.RouteRequest, time_limit: float
    ) -> router_pb2.RouteResponse:
        plan = self.plan
        if request.requested_model:
            return self._as_requested(request.requested_model)
        question = next(
            (m.content for m in reversed(request.messages) if m.role == types_pb2.ROLE_USER), ""
        )
        found = await self.classifier.classify(
            question, request.embedding, request.embedding_model, time_limit
        )
        threshold = self.cheap_share.threshold()
        tier = choose_tier(found.probabilities, threshold, found.unfamiliarity)
        score = cheap_score(found.probabilities)
        if not (found.out_of_domain or found.failed):
            # A cheap-share target is a share of the traffic the classifier can judge:
            # safe-tier routings in the window would lower the bar for the rest.
            self.cheap_share.observe(score, tier)
        self.tiers[tier] += 1
        self.failures += found.failed
        self.out_of_domain += found.out_of_domain
        model = plan.models[tier]
        escalation = plan.escalation_model if plan.escalation_model != model else ""
        response = router_pb2.RouteResponse(
            tier=TIER_TO_PROTO[tier],
            model=model,
            escalation_model=escalation,
            confidence=found.probabilities[TIERS.index(tier)],
            reason=f"{found.explanation}; "
            f"{_verdict(found.probabilities, tier, threshold, found.unfamiliarity)}"
            f" -> {model}",
            probabilities=[
                types_pb2.TierProbability(tier=TIER_TO_PROTO[t], probability=p)
                for t, p in zip(TIERS, found.probabilities, strict=True)
            ],
            classifier=self.classifier.kind,
            classifier_version=found.version,
            cheap_tier_threshold=threshold,
            cheap_share_target=self.cheap_share.target,
            cheap_share_observed=self.cheap_share.observed,
            classifier_model=found.model,
            out_of_domain=found.out_of_domain,
        )
        if found.usage is not None:
            response.classifier_usage.CopyFrom(found.usage)
        if escalation and plan.escalation_method != "off":
            response.escalation_method = ESCALATION_TO_PROTO[plan.escalation_method]
            response.escalation_threshold = plan.escalation_threshold
            response.escalation_target_rate = plan.escalation_target_rate
        trace.get_current_span().set_attributes(
            {
                "costmesh.route.classifier": self.classifier.kind,
                "costmesh.route.classifier_version": found.version,
                "costmesh.route.embedded": found.embedded,
                "costmesh.route.out_of_domain": found.out_of_domain,
                "costmesh.route.unfamiliarity": found.unfamiliarity,
                "costmesh.route.cheap_tier_threshold": threshold,
                "costmesh.route.cheap_score": score,
                "costmesh.route.cheap_share_observed": self.cheap_share.observed,
                **{
                    f"costmesh.route.p_{t}": p
                    for t, p in zip(TIERS, found.probabilities, strict=True)
                },
            }
        )
        return response

    def _as_requested(self, model: str) -> router_pb2.RouteResponse:
        """The caller chose the model: report the cheapest tier it serves, plan nothing."""
        tier = next((t for t in TIERS if self.plan.models[t] == model), "")
        return router_pb2.RouteResponse(
            tier=TIER_TO_PROTO.get(tier, types_pb2.TIER_UNSPECIFIED),
            model=model,
            confidence=1.0,
            reason=f"caller asked for {model}; routing skipped",
            classifier="caller",
        )

    def stats(self) -> router_pb2.FeatureRouteStats:
        return router_pb2.FeatureRouteStats(
            feature=self.name,
            classifier=self.classifier.kind,
            classifier_version=self.classifier.version,
            requests=sum(self.tiers.values()),
            tiers=[
                router_pb2.TierCount(tier=TIER_TO_PROTO[t], requests=self.tiers[t]) for t in TIERS
            ],
            cheap_tier_threshold=self.cheap_share.threshold(),
            cheap_share_target=self.cheap_share.target,
            cheap_share_observed=self.cheap_share.observed,
            classifier_failures=self.failures,
            out_of_domain=self.out_of_domain,
        )


def _verdict(
    probabilities: tuple[float, float, float], tier: str, threshold: float, unfamiliarity: float
) -> str:
    bar = f"{raised(threshold, unfamiliarity):.2f}"
    if unfamiliarity > 0:
        bar += f" (the knob {threshold:.2f} raised: unfamiliarity {unfamiliarity:.2f})"
    if tier == TIERS[-1]:
        return f"P(below complex) {cheap_score(probabilities):.2f} < {bar}: complex"
    at_most = sum(probabilities[: TIERS.index(tier) + 1])
    return f"P(at most {tier}) {at_most:.2f} >= {bar}: {tier}"


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, features: dict[str, FeatureRouter]) -> None:
        self._features = features

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.RouteResponse:
        current_principal()
        feature = self._features.get(request.feature)
        if feature is None:
            raise InvalidArgument("feature", f"unknown feature {request.feature!r}")
        if request.embedding and not np.isfinite(np.asarray(request.embedding)).all():
            raise InvalidArgument("embedding", "must be finite numbers (a unit vector)")
        has_question = any(m.role == types_pb2.ROLE_USER for m in request.messages)
        if not has_question and not request.requested_model:
            raise InvalidArgument("messages", "at least one user message is required")
        # An llm classification gets part of the caller's time: when it fails, the
        # fallback to complex must still reach the caller before its deadline.
        remaining = context.time_remaining()
        budget = _DEFAULT_TIME_LIMIT if remaining is None else min(0.75 * remaining, 5.0)
        response = await feature.route(request, budget)
        trace.get_current_span().set_attributes(
            {
                "costmesh.feature": request.feature,
                "costmesh.route.tier": TIERS[response.tier - 1] if response.tier else "",
                "costmesh.route.model": response.model,
                "costmesh.route.escalation_model": response.escalation_model,
                "costmesh.route.reason": response.reason,
            }
        )
        return response

    async def GetRouteStats(
        self,
        request: router_pb2.GetRouteStatsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> router_pb2.GetRouteStatsResponse:
        current_principal()
        unknown = [f for f in request.features if f not in self._features]
        if unknown:
            raise InvalidArgument("features", f"unknown feature {unknown[0]!r}")
        names = list(request.features) or sorted(self._features)
        return router_pb2.GetRouteStatsResponse(features=[self._features[n].stats() for n in names])


def build(
    config: Config,
    env: Mapping[str, str],
    tracer_provider: trace.TracerProvider,
    *,
    stand_ins: Mapping[str, str] | None = None,
) -> ServiceDef:
    """The router with a classifier per configured feature; refuses a bad artefact."""
    settings = RouterSettings.from_config(config)
    tracer = tracer_provider.get_tracer("costmesh.router")
    encoder = _encoder(settings)  # first: these may refuse, and nothing is open yet
    artefacts = _artefacts(settings, encoder)
    shipped = [n for n, p in settings.plans.items() if p.classifier == "embedding"
               and p.artefact == SHIPPED_ARTEFACT]  # fmt: skip
    if shipped:
        log.info(
            "features %s route with the shipped artefact, trained on e-commerce and banking "
            "support tickets; for other traffic train one on your own: costmesh router train",
            ", ".join(shipped),
        )
    kinds = {p.classifier for p in settings.plans.values()}
    embedder = None
    if encoder is not None:
        embedder = BatchingEmbedder(
            encoder.model,
            encoder.dimensions,
            encoder.embed_sync,
            tracer=tracer,
            span_name="router.embed",
        )
    providers = None
    if "llm" in kinds or any(
        p.classifier == "embedding" and p.out_of_domain == "llm" for p in settings.plans.values()
    ):
        providers = Providers(ProviderSettings.from_config(config), env, tracer, stand_ins or {})
    features = {}
    for name, plan in settings.plans.items():
        classifier = _classifier(plan, artefacts, embedder, providers)
        prior: list[float] = []
        if plan.classifier == "embedding":
            prior = list(
                artefacts[str(plan.artefact)].current().meta.get("holdout_cheap_scores", [])
            )
        cheap_share = CheapShare(
            plan.cheap_share_target,
            plan.cheap_tier_min_probability,
            prior,
            settings.calibration_window,
        )
        features[name] = FeatureRouter(name, plan, classifier, cheap_share)
    servicer = RouterServicer(features)

    async def stop() -> None:
        if embedder is not None:
            await embedder.close()
        if providers is not None:
            await providers.close()

    return ServiceDef(
        SERVICE_NAME,
        lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
        stop=stop,
    )


def _classifier(
    plan: FeaturePlan,
    artefacts: Mapping[str, ArtefactFile],
    embedder: BatchingEmbedder | None,
    providers: Providers | None,
) -> Classifier:
    """The feature's classifier; an embedding one with the llm classifier behind it
    for out-of-domain questions when the feature asks for that."""
    if plan.classifier == "rules":
        return RulesClassifier(plan.tier)
    llm = None
    if plan.classifier == "llm" or (plan.classifier == "embedding" and plan.out_of_domain == "llm"):
        assert providers is not None
        llm = LLMClassifier(providers, plan.classifier_model)
    if plan.classifier == "llm":
        assert llm is not None
        return llm
    assert embedder is not None
    return EmbeddingClassifier(artefacts[str(plan.artefact)], embedder, llm)


def _encoder(settings: RouterSettings) -> SentenceEncoder | None:
    """The embedding model, when a feature routes with the embedding classifier."""
    if not any(p.classifier == "embedding" for p in settings.plans.values()):
        return None
    try:
        return shared_encoder(settings.model_dir, settings.embedding_threads)
    except (ModelError, OSError) as exc:
        raise ConfigError(f"router.model_dir: {exc}") from None


def _artefacts(
    settings: RouterSettings, encoder: SentenceEncoder | None
) -> dict[str, ArtefactFile]:
    """Every embedding feature's artefact, loaded once per file and checked against
    the model the router embeds with."""
    artefacts: dict[str, ArtefactFile] = {}
    for name, plan in settings.plans.items():
        if plan.classifier != "embedding":
            continue
        try:
            if str(plan.artefact) not in artefacts:
                artefacts[str(plan.artefact)] = ArtefactFile(plan.artefact, settings.reload_seconds)
            model = artefacts[str(plan.artefact)].current()
            assert encoder is not None  # an embedding feature has one
            if (model.embedding_model, model.dimensions) != (encoder.model, encoder.dimensions):
                raise ArtefactError(
                    f"{plan.artefact}: trained on {model.embedding_model} ({model.dimensions} "
                    f"dimensions); the router embeds with {encoder.model}: retrain it with "
                    "costmesh router train"
                )
        except ArtefactError as exc:
            raise ConfigError(f"features.{name}.router_artefact: {exc}") from None
    return artefacts
