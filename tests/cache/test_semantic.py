"""The exact-match store: absolute TTLs, bounded size, tags and namespace versions."""

from __future__ import annotations

from services.cache.keys import RequestKey
from services.cache.store import Answer, ExactStore
from tests.clock import Clock


def key(
    question: str, feature: str = "support", namespace: str = "", scope: str = "", team: str = "a"
) -> RequestKey:
    return RequestKey(
        team, feature, namespace, scope, "", ((2, question),), (("max_tokens", None),)
    )


ANSWER = Answer("answer", "gpt-4o-mini", 10, 0, 5, "stop")


def test_equal_requests_share_a_key_and_different_ones_do_not() -> None:
    assert key("a").digest(1) == key("a").digest(1)
    assert key("a").digest(1) != key("a", scope="tenant").digest(1)
    assert key("a").digest(1) != key("a").digest(2)
    assert key("a").digest(1) != key("a", feature="search").digest(1)
    assert key("a").digest(1) != key("a", team="b").digest(1)


def test_ttl_is_absolute_hits_do_not_extend_it() -> None:
    clock = Clock()
    store = ExactStore(10, clock)
    store.store(key("q"), ANSWER, ttl_seconds=60, tags=())

    clock.now += 59
    assert store.lookup(key("q")) is not None
    clock.now += 2
    assert store.lookup(key("q")) is None
    assert store.counters[("support", "expirations")] == 1


def test_max_age_refuses_older_entries_without_dropping_them() -> None:
    clock = Clock()
    store = ExactStore(10, clock)
    store.store(key("q"), ANSWER, ttl_seconds=600, tags=())
    clock.now += 100

    assert store.lookup(key("q"), max_age_seconds=50) is None
    assert store.lookup(key("q"), max_age_seconds=500) is not None


def test_capacity_evicts_the_least_recently_used() -> None:
    store = ExactStore(2, Clock())
    store.store(key("a"), ANSWER, 60, ())
    store.store(key("b"), ANSWER, 60, ())
    store.lookup(key("a"))
    store.store(key("c"), ANSWER, 60, ())

    assert store.lookup(key("b")) is None
    assert store.lookup(key("a")) is not None
    assert store.count() == 2
    assert store.counters[("support", "evictions")] == 1


def test_invalidate_by_tag_drops_only_tagged_entries_of_the_feature() -> None:
    store = ExactStore(10, Clock())
    store.store(key("a"), ANSWER, 60, ("doc-1",))
    store.store(key("b"), ANSWER, 60, ("doc-2",))
    store.store(key("a", feature="search"), ANSWER, 60, ("doc-1",))

    assert store.invalidate_tag("support", "doc-1") == 1
    assert store.lookup(key("a")) is None
    assert store.lookup(key("b")) is not None
    assert store.lookup(key("a", feature="search")) is not None


def test_namespace_bump_makes_old_entries_unreachable_and_reclaims_them() -> None:
    store = ExactStore(10, Clock())
    store.store(key("a", namespace="faq"), ANSWER, 60, ())
    store.store(key("a", namespace="other"), ANSWER, 60, ())

    removed, version = store.bump_namespace("support", "faq")

    assert (removed, version) == (1, 2)
    assert store.lookup(key("a", namespace="faq")) is None
    assert store.lookup(key("a", namespace="other")) is not None
    store.store(key("a", namespace="faq"), ANSWER, 60, ())
    assert store.lookup(key("a", namespace="faq")) is not None
