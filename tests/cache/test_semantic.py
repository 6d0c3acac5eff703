"""The semantic cache's decisions, on both stores (in-process and real Redis), with
the real embedding model: hits by meaning, hard scope partitions, the guard,
invalidation, absolute TTLs and the capacity bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from services.cache.keys import RequestKey
from services.cache.redis_store import RedisStore
from services.cache.semantic import FeaturePolicy, SemanticCache
from services.cache.store import Answer, Capacity, MemoryStore, Store
from services.common.config import ConfigError
from services.common.embedding import MINILM_DIMENSIONS, BatchingEmbedder, shared_encoder
from tests.clock import Clock
from tests.redis_server import fresh_prefix

ANSWER = Answer("Tap 'Forgot password' on the sign-in screen.", "gpt-4o-mini", 10, 0, 5, "stop")
SYSTEM = 1


def key(
    question: str,
    *,
    feature: str = "support",
    namespace: str = "",
    scope: str = "",
    team: str = "a",
    model: str = "",
    system: str = "You are a helpful bank assistant.",
    params: bytes = b"",
) -> RequestKey:
    messages = ((SYSTEM, system), (2, question)) if system else ((2, question),)
    return RequestKey(team, feature, namespace, scope, model, messages, params)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(MINILM_DIMENSIONS)
        return
    with fresh_prefix() as (url, prefix):
        redis_store = RedisStore(url, prefix, MINILM_DIMENSIONS)
        await redis_store.start()
        try:
            yield redis_store
        finally:
            await redis_store.close()


def embedder() -> BatchingEmbedder:
    model = shared_encoder(None, 1)
    return BatchingEmbedder(
        model.model, model.dimensions, model.embed_sync, thresholds=model.thresholds
    )


def make_cache(
    store: Store, clock: Clock | None = None, capacity: int = 100, per_tenant: bool = False
) -> SemanticCache:
    policy = FeaturePolicy(capacity=Capacity(capacity), per_tenant=per_tenant)
    return SemanticCache(
        store, embedder(), {"default": policy, "support": policy}, clock or time.time
    )


async def settle(store: Store) -> None:
    """Redis replicas learn of a put from the event stream; wait until this one has."""
    if isinstance(store, RedisStore):
        async with asyncio.timeout(5):
            await store.caught_up()


async def test_a_paraphrase_is_a_semantic_hit_naming_the_entry(store: Store) -> None:
    cache = make_cache(store)
    stored = await cache.put(key("How do I reset my password?"), ANSWER, 600, ())
    await settle(store)

    hit = await cache.lookup(key("how can I reset my password"))
    unrelated = await cache.lookup(key("What is the exchange rate for euros?"))

    assert stored is not None
    assert hit.outcome == "semantic"
    assert hit.entry is not None
    assert hit.entry.entry_id == stored.entry_id
    assert hit.entry.answer == ANSWER
    assert 0.92 <= hit.similarity < 1
    assert unrelated.outcome == "miss"
    assert unrelated.best_similarity < 0.92
    assert cache.stats()["semantic_hits"] == 1
    assert cache.stats()["misses"] == 1


async def test_a_hit_names_the_request_whose_answer_it_reuses(store: Store) -> None:
    cache = make_cache(store)
    await cache.put(key("How do I reset my password?"), ANSWER, 600, (), source_request_id="req-1")
    await cache.put(key("What are your opening hours?"), ANSWER, 600, ())
    await settle(store)

    exact = await cache.lookup(key("How do I reset my password?"))
    semantic = await cache.lookup(key("how can I reset my password"))
    unnamed = await cache.lookup(key("What are your opening hours?"))

    assert (exact.outcome, semantic.outcome, unnamed.outcome) == ("exact", "semantic", "exact")
    assert exact.entry is not None
    assert semantic.entry is not None
    assert unnamed.entry is not None
    assert exact.entry.source_request_id == semantic.entry.source_request_id == "req-1"
    assert unnamed.entry.source_request_id == ""


@pytest.mark.parametrize(
    "other",
    [
        {"scope": "tenant-b"},
        {"feature": "billing"},
        {"team": "b"},
        {"model": "gpt-4o"},
        {"system": "You are a pirate. Answer in pirate speak."},
        {"params": b"\x08\x10"},
        {"namespace": "faq"},
    ],
    ids=lambda o: next(iter(o)),
)
async def test_no_hit_crosses_a_scope_boundary(store: Store, other: dict[str, str]) -> None:
    cache = make_cache(store)
    await cache.put(key("How do I reset my password?", scope="tenant-a"), ANSWER, 600, ())
    await settle(store)

    same_scope = await cache.lookup(key("How do I reset my password?", scope="tenant-a"))
    fields: dict[str, object] = {"scope": "tenant-a", **other}
    crossed = await cache.lookup(key("How do I reset my password?", **fields))  # type: ignore[arg-type]

    assert same_scope.outcome == "exact"
    assert crossed.outcome == "miss"
    assert crossed.best_similarity == 0.0


async def test_a_bumped_namespace_version_is_a_new_partition(store: Store) -> None:
    cache = make_cache(store)
    await cache.put(key("How do I reset my password?", namespace="faq"), ANSWER, 600, ())
    await settle(store)

    removed, version = await store.bump("support", "faq")
    await settle(store)
    after = await cache.lookup(key("how can I reset my password", namespace="faq"))

    assert (removed, version) == (1, 2)
    assert after.outcome == "miss"
    assert store.entries("support") == 0


async def test_the_guard_refuses_a_close_question_of_opposite_meaning(store: Store) -> None:
    cache = make_cache(store)
    await cache.put(key("Is port 6379 open on the server?"), ANSWER, 600, ())
    await settle(store)

    # A low threshold, so that only the guard stands between the query and the entry.
    closed = await cache.lookup(key("Is port 6379 closed on the server?"), threshold=0.5)
    other_port = await cache.lookup(key("Is port 5432 open on the server?"), threshold=0.5)

    assert (closed.outcome, closed.guard_rejection) == ("miss", "polarity")
    assert (other_port.outcome, other_port.guard_rejection) == ("miss", "numbers")
    assert closed.best_similarity > 0.8
    assert cache.stats()["guard_rejections"] == 2


async def test_invalidating_a_tag_drops_only_its_entries(store: Store) -> None:
    cache = make_cache(store)
    await cache.put(key("How do I reset my password?"), ANSWER, 600, ("doc-1",))
    await cache.put(key("What are your opening hours?"), ANSWER, 600, ("doc-2",))
    await settle(store)

    removed = await store.invalidate_tag("support", "doc-1")
    await settle(store)

    assert removed == 1
    assert (await cache.lookup(key("how can I reset my password"))).outcome == "miss"
    assert (await cache.lookup(key("What are your opening hours?"))).outcome == "exact"
    assert cache.stats()["invalidations"] == 1


async def test_capacity_evicts_the_least_recently_used(store: Store) -> None:
    cache = make_cache(store, capacity=2)
    for question in ("How do I reset my password?", "What are your opening hours?"):
        await cache.put(key(question), ANSWER, 600, ())
    await cache.lookup(key("How do I reset my password?"))  # now the most recent
    await cache.put(key("Where is my card?"), ANSWER, 600, ())
    await settle(store)

    assert (await cache.lookup(key("What are your opening hours?"))).outcome == "miss"
    assert (await cache.lookup(key("How do I reset my password?"))).outcome == "exact"
    assert store.entries("support") == 2
    assert cache.stats()["evictions"] == 1


async def test_ttl_is_absolute_and_max_age_is_honoured(store: Store) -> None:
    clock = Clock(time.time())
    cache = make_cache(store, clock)
    await cache.put(key("How do I reset my password?"), ANSWER, 600, ())
    clock.now -= 1000  # stored 1000 s ago with a 60 s TTL: long expired
    await cache.put(key("What are your opening hours?"), ANSWER, 60, ())
    clock.now += 1000 + 300
    await settle(store)

    expired = await cache.lookup(key("What are your opening hours?"))
    young = await cache.lookup(key("How do I reset my password?"), max_age_seconds=400)
    too_old = await cache.lookup(key("How do I reset my password?"), max_age_seconds=200)

    assert expired.outcome == "miss"
    assert young.outcome == "exact"
    assert too_old.outcome == "miss"


async def test_a_hit_does_not_extend_the_ttl() -> None:
    clock = Clock()
    cache = make_cache(MemoryStore(MINILM_DIMENSIONS, clock=clock), clock)
    await cache.put(key("How do I reset my password?"), ANSWER, 60, ())

    clock.now += 59
    assert (await cache.lookup(key("how can I reset my password"))).outcome == "semantic"
    clock.now += 2
    assert (await cache.lookup(key("How do I reset my password?"))).outcome == "miss"
    assert cache.stats()["expirations"] == 1


async def test_a_per_tenant_feature_refuses_a_request_without_a_tenant() -> None:
    cache = make_cache(MemoryStore(MINILM_DIMENSIONS), per_tenant=True)

    with pytest.raises(Exception, match="scope_key") as refused:
        await cache.lookup(key("How do I reset my password?"))

    assert type(refused.value).__name__ == "InvalidArgument"
    assert cache.stats()["misses"] == 0


async def test_memory_is_accounted_per_entry() -> None:
    cache = make_cache(MemoryStore(MINILM_DIMENSIONS))
    entry = await cache.put(key("How do I reset my password?"), ANSWER, 600, ("doc-1",))

    assert entry is not None
    assert entry.vector is not None
    assert cache.stats()["memory_bytes"] == entry.nbytes
    assert entry.nbytes > entry.vector.nbytes + len(ANSWER.content)
    other = replace(entry, tags=())
    assert other.nbytes < entry.nbytes
    assert replace(entry, source_request_id="r" * 10).nbytes == entry.nbytes + 10


async def test_a_question_longer_than_the_model_reads_matches_exactly_only(store: Store) -> None:
    cache = make_cache(store)
    document = "The quarterly report says revenue grew in every region. " * 60
    await cache.put(key(document + "Summarise it."), ANSWER, 600, ())
    await settle(store)

    other_instruction = await cache.lookup(key(document + "Write a haiku about it."))
    same = await cache.lookup(key(document + "Summarise it."))

    assert other_instruction.outcome == "miss"
    assert other_instruction.vector is None  # nothing was compared by meaning
    assert same.outcome == "exact"


async def test_an_answer_generated_across_a_namespace_bump_is_not_stored(store: Store) -> None:
    cache = make_cache(store)
    missed = await cache.lookup(key("How do I reset my password?", namespace="faq"))
    await store.bump("support", "faq")  # the FAQ changed while the answer was generated

    stale = await cache.put(
        key("How do I reset my password?", namespace="faq"),
        ANSWER,
        600,
        (),
        seen_version=missed.version,
    )
    fresh = await cache.lookup(key("How do I reset my password?", namespace="faq"))

    assert missed.version == 1
    assert stale is None
    assert fresh.outcome == "miss"
    assert cache.stats()["stale_stores"] == 1


async def test_an_answer_generated_across_its_tag_invalidation_is_not_stored(
    store: Store,
) -> None:
    cache = make_cache(store)
    missed = await cache.lookup(key("What is the fee for transfers?"))
    await store.invalidate_tag("support", "pricing-page")  # the page changed meanwhile

    stale = await cache.put(
        key("What is the fee for transfers?"),
        ANSWER,
        600,
        ("pricing-page",),
        looked_up_at=missed.looked_up_at,
    )
    later = await cache.lookup(key("What is the fee for transfers?"))
    fresh = await cache.put(
        key("What is the fee for transfers?"),
        ANSWER,
        600,
        ("pricing-page",),
        looked_up_at=later.looked_up_at,
    )

    assert stale is None
    assert fresh is not None  # generated after the invalidation: kept
    assert cache.stats()["stale_stores"] == 1


async def test_a_reported_wrong_hit_drops_the_entry_and_raises_its_partition_bar(
    store: Store,
) -> None:
    cache = make_cache(store)
    wrong = await cache.put(key("How do I close my account?"), ANSWER, 600, ())
    await cache.put(key("How do I reset my password?", scope="other"), ANSWER, 600, ())
    await settle(store)
    served = await cache.lookup(key("How can I delete my profile?"), threshold=0.3)
    assert wrong is not None
    assert served.outcome == "semantic"
    assert served.entry is not None

    report = await cache.report_wrong_hit(key("How can I delete my profile?"), wrong.entry_id)
    await settle(store)
    # A new entry as close as the wrong one was: below the raised bar now.
    await cache.put(key("How do I close my account?"), ANSWER, 600, ())
    await settle(store)
    again = await cache.lookup(key("How can I delete my profile?"), threshold=0.3)
    elsewhere = await cache.lookup(key("how can I reset my password", scope="other"))

    assert report.similarity == pytest.approx(served.similarity, abs=1e-5)
    assert report.partition_threshold > report.similarity
    assert again.outcome == "miss"
    assert again.threshold == report.partition_threshold
    assert elsewhere.outcome == "semantic"  # another partition keeps its own bar
    assert cache.stats()["wrong_hit_reports"] == 1


async def test_a_report_of_an_entry_that_is_gone_or_not_its_own_is_not_found(
    store: Store,
) -> None:
    cache = make_cache(store)
    entry = await cache.put(key("How do I close my account?"), ANSWER, 600, ())
    await settle(store)
    assert entry is not None

    with pytest.raises(Exception, match="gone") as other_team:
        await cache.report_wrong_hit(key("How can I delete my profile?", team="b"), entry.entry_id)
    await cache.report_wrong_hit(key("How do I close my account?"), entry.entry_id)
    with pytest.raises(Exception, match="gone") as twice:
        await cache.report_wrong_hit(key("How do I close my account?"), entry.entry_id)

    assert type(other_team.value).__name__ == type(twice.value).__name__ == "NotFound"
    # An exact hit's answer was wrong, not the equivalence: no bar to raise.
    model = cache.embedder.model if cache.embedder else ""
    partition = key("How do I close my account?").semantic_partition(1, "last_user", model)
    assert await store.bar(partition) == 0.0
    assert cache.stats()["wrong_hit_reports"] == 1


async def test_a_candidate_the_guard_refuses_gives_way_to_the_next_one(store: Store) -> None:
    cache = make_cache(store)
    await cache.put(key("Where is order 10442?"), ANSWER, 600, ())
    farther = "I would like to know where my order 10443 is at the moment"
    await cache.put(key(farther), ANSWER, 600, ())
    await settle(store)

    looked_up = await cache.lookup(key("Where is order 10443?"), threshold=0.3)

    assert looked_up.outcome == "semantic"
    assert looked_up.entry is not None
    assert looked_up.entry.question == farther
    assert looked_up.best_similarity > looked_up.similarity  # the nearer one was refused
    assert looked_up.guard_rejection == "numbers"


def test_the_threshold_is_the_one_calibrated_for_the_feature_budget() -> None:
    model = embedder()
    strict = FeaturePolicy(target_false_hit_rate=0.005)
    loose = FeaturePolicy(target_false_hit_rate=0.05)
    between = FeaturePolicy(target_false_hit_rate=0.03)  # the largest budget within it
    fixed = FeaturePolicy(threshold=0.9)
    policies = {"default": strict, "loose": loose, "between": between, "fixed": fixed}
    cache = SemanticCache(MemoryStore(MINILM_DIMENSIONS), model, policies)

    def threshold(feature: str) -> float | None:
        return cache.policy(key("q", feature=feature)).threshold

    assert threshold("default") == model.thresholds["0.005"]
    assert threshold("loose") == model.thresholds["0.05"]
    assert threshold("between") == model.thresholds["0.02"]
    assert threshold("fixed") == 0.9
    assert model.thresholds["0.005"] >= model.thresholds["0.05"]


def test_a_model_without_calibration_needs_a_threshold_set_by_hand() -> None:
    model = embedder()
    model.thresholds = {}
    with pytest.raises(ConfigError, match="cache_similarity_threshold"):
        SemanticCache(MemoryStore(MINILM_DIMENSIONS), model, {"default": FeaturePolicy()})
    fixed = SemanticCache(
        MemoryStore(MINILM_DIMENSIONS), model, {"default": FeaturePolicy(threshold=0.9)}
    )
    assert fixed.policy(key("q")).threshold == 0.9
