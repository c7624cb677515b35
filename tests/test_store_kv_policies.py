"""KV policy records against a real Redis server: versions, compare-and-set, rollback, history, audit, events."""

from __future__ import annotations

import pytest

from adapters_store.errors import StoreError
from adapters_store.kv_policies import KVPolicies
from service.api.errors import status_for


@pytest.fixture
def kv(store_registry) -> KVPolicies:
    store_registry.register_base("base-v1", "1", path="/kit/base-v1")
    store_registry.create_version("qa", "base-v1", {"adapter_config.json": "a" * 64})
    store_registry.activate("qa", "qa", 1)
    return KVPolicies(store_registry)


def _status(call) -> tuple[int, str]:
    with pytest.raises(StoreError) as e:
        call()
    return status_for(e.value), e.value.message


def test_set_rollback_history_audit_and_events(kv):
    with kv.registry.subscribe() as events:
        first = kv.set("base-v1", {"quant": "int4"}, actor="op", reason="smaller")
        second = kv.set("base-v1", {"quant": "int8"}, actor="op", reason="safer", if_version=1)
        back = kv.rollback("base-v1", actor="op", reason="undo")
        seen = [e for e in (events.get(timeout=2) for _ in range(6)) if e and e.get("type") == "kv_policy_changed"]
    assert (first.version, second.version, back.version) == (1, 2, 3)
    assert back.policy == {"quant": "int4"} and back.action == "kv_policy_rollback"
    assert kv.rollback("base-v1").policy == {"quant": "int8"}  # twice: where it was
    assert kv.get("base-v1").version == 4 and set(kv.all()) == {"base-v1"}
    assert [(h.from_version, h.to_version) for h in kv.history("base-v1")] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [e["version"] for e in seen] == [1, 2, 3] and all(e["scope"] == "base-v1" for e in seen)
    audit = [e for e in kv.registry.audit() if e.target == "kv:base-v1"]
    assert [(e.action, e.from_ref, e.to_ref) for e in audit][:3] == [
        ("kv_policy_set", "", "kv@1"), ("kv_policy_set", "kv@1", "kv@2"), ("kv_policy_rollback", "kv@2", "kv@3")]


def test_an_alias_has_a_policy_of_its_own_and_the_default_is_empty(kv):
    assert kv.get("qa") is None
    assert kv.set("qa", {}).policy == {}  # an empty policy (the default) comes back as one, not as a list
    assert kv.set("qa", {"evict": "snapkv", "budget": 0.5}).version == 2
    assert kv.get("base-v1") is None


def test_refusals_change_nothing(kv):
    kv.set("base-v1", {"quant": "int4"})
    assert _status(lambda: kv.set("nope", {"quant": "int4"})) == (404, "no base or alias nope to set a KV policy on")
    status, message = _status(lambda: kv.set("base-v1", {"quant": "int2"}, if_version=0))
    assert status == 409 and "changed meanwhile" in message
    assert _status(lambda: kv.rollback("qa"))[0] == 404  # never set: nothing to undo
    assert kv.get("base-v1").version == 1 and len(kv.history("base-v1")) == 1


def test_undoing_the_first_change_restores_the_default(kv):
    kv.set("base-v1", {"quant": "int4"})
    back = kv.rollback("base-v1")
    assert (back.version, back.policy, back.action) == (2, {}, "kv_policy_rollback")
