"""service/replica/resolver.py: what a request's `model` resolves to (plain data; no Redis, no engine)."""

from __future__ import annotations

import pytest

from adapters_store.registry import PatchVersion
from adapters_store.rollouts import Rollout
from service.replica.resolver import HostedElsewhere, Resolver, Trial, UnknownModel

BASE = "base-v1"


def _v(name: str, version: int, base: str = BASE) -> PatchVersion:
    return PatchVersion(name=name, version=version, base=base, files={})


def _rollout(alias: str, candidate: PatchVersion, mode: str = "canary", percent: float = 30.0) -> Rollout:
    return Rollout(alias, candidate.name, candidate.version, mode, percent, None, 20, 0.0, "test")


@pytest.fixture
def resolver() -> Resolver:
    versions = {"sent": {1: _v("sent", 1), 2: _v("sent", 2), 3: _v("sent", 3)}, "other": {1: _v("other", 1)}}
    return Resolver(bases={BASE: BASE, "tiny": BASE}, versions=versions,
                    aliases={"sentiment": ("sent", 2), "o": ("other", 1)}, elsewhere={"moved": "base-v2"})


def test_a_base_resolves_to_itself_with_no_patch(resolver):
    for name in (BASE, "tiny"):
        r = resolver.resolve(name)
        assert (r.model, r.base, r.patch) == (name, BASE, None)
        assert r.served_by == f"base={BASE}; patch=none"
        assert r.version_label == "none"


def test_an_alias_resolves_to_its_active_version(resolver):
    r = resolver.resolve("sentiment")
    assert (r.model, r.base, r.patch) == ("sentiment", BASE, _v("sent", 2))
    assert r.served_by == f"base={BASE}; patch=sent@2"
    assert r.version_label == "2"
    assert resolver.pointer("sentiment") == _v("sent", 2)
    assert resolver.pointer("nope") is None


def test_a_pinned_version_resolves_to_that_version_under_the_patch_name(resolver):
    r = resolver.resolve("sent@1")
    assert r.patch == _v("sent", 1)
    assert r.model == "sent", "the metrics label stays bounded: the patch name, never name@N"
    assert resolver.resolve("sent@3").patch == _v("sent", 3)


@pytest.mark.parametrize("model", ["nope", "sent@9", "sent@", "sent@x", "@1", "sentiment@2", "SENTIMENT", ""])
def test_anything_else_is_an_unknown_model(resolver, model):
    with pytest.raises(UnknownModel):
        resolver.resolve(model)


def test_an_alias_on_another_base_is_hosted_elsewhere(resolver):
    with pytest.raises(HostedElsewhere) as info:
        resolver.resolve("moved")
    assert (info.value.model, info.value.base) == ("moved", "base-v2")
    # elsewhere wins even over a stale local pointer of the same name
    resolver.aliases["moved"] = ("sent", 1)
    with pytest.raises(HostedElsewhere):
        resolver.resolve("moved")


def test_models_lists_bases_then_aliases(resolver):
    assert resolver.models() == [BASE, "tiny", "o", "sentiment"]


def test_a_canary_is_sticky_per_user_and_takes_about_its_percent(resolver):
    candidate = _v("sent", 3)
    resolver.rollouts["sentiment"] = Trial(_rollout("sentiment", candidate, percent=30.0), candidate)
    users = [f"user-{i}" for i in range(4000)]
    first = {u: resolver.resolve("sentiment", u).patch.ref for u in users}
    assert set(first.values()) == {"sent@2", "sent@3"}
    for u in users[:200]:  # the same user, again and again: the same version every time
        assert {resolver.resolve("sentiment", u).patch.ref for _ in range(5)} == {first[u]}
    share = sum(ref == "sent@3" for ref in first.values()) / len(users)
    assert 0.26 < share < 0.34, share
    # Only the alias's own name is split: a pinned version or another alias is untouched.
    assert resolver.resolve("sent@2", "user-1").patch.ref == "sent@2"
    assert {resolver.resolve("o", u).patch.ref for u in users[:100]} == {"other@1"}


def test_a_canary_bucket_depends_on_the_alias_too(resolver):
    """Users in one alias's canary are not the same users in every alias's canary."""
    resolver.versions["other"][2] = _v("other", 2)
    resolver.rollouts["sentiment"] = Trial(_rollout("sentiment", _v("sent", 3), percent=50.0), _v("sent", 3))
    resolver.rollouts["o"] = Trial(_rollout("o", _v("other", 2), percent=50.0), _v("other", 2))
    users = [f"u{i}" for i in range(1000)]
    in_a = {u for u in users if resolver.resolve("sentiment", u).patch.version == 3}
    in_b = {u for u in users if resolver.resolve("o", u).patch.version == 2}
    assert in_a != in_b
    assert 0.4 < len(in_a & in_b) / len(in_a) < 0.6


def test_canary_edges_and_anonymous_users(resolver):
    candidate = _v("sent", 3)
    resolver.rollouts["sentiment"] = Trial(_rollout("sentiment", candidate, percent=0.0), candidate)
    assert {resolver.resolve("sentiment", f"u{i}").patch.ref for i in range(300)} == {"sent@2"}
    resolver.rollouts["sentiment"] = Trial(_rollout("sentiment", candidate, percent=100.0), candidate)
    assert {resolver.resolve("sentiment", f"u{i}").patch.ref for i in range(300)} == {"sent@3"}
    # No user: each request draws afresh, still about `percent` of them.
    resolver.rollouts["sentiment"] = Trial(_rollout("sentiment", candidate, percent=50.0), candidate)
    share = sum(resolver.resolve("sentiment").patch.ref == candidate.ref for _ in range(4000)) / 4000
    assert 0.44 < share < 0.56, share


def test_a_shadow_rollout_never_serves_its_candidate(resolver):
    candidate = _v("sent", 3)
    resolver.rollouts["sentiment"] = Trial(_rollout("sentiment", candidate, mode="shadow", percent=100.0), candidate)
    assert {resolver.resolve("sentiment", f"u{i}").patch.ref for i in range(300)} == {"sent@2"}
