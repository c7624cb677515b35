"""KV policy records reach the replica: events and reconcile apply them, requests carry the policy in force.

The FakeEngine applies no KV policy, so it shows the other half too: a recorded policy the engine refuses is
not served, the replica keeps what it had and says why.
"""

from __future__ import annotations

import pytest

from adapters_store.kv_policies import KVPolicies
from service import metrics
from service.kv.policy import IDENTITY, KVPolicy
from service.replica.kv_state import KVState
from service.replica.resolver import KVInForce, Resolver
from tests.fast.support import BASE


def test_an_alias_policy_overrides_the_base_and_the_default_says_nothing():
    resolver = Resolver(bases={BASE: BASE})
    assert resolver.resolve(BASE).served_by == f"base={BASE}; patch=none"
    resolver.kv[BASE] = KVInForce(BASE, 3, IDENTITY)
    assert resolver.resolve(BASE).kv is None  # the default: no policy to carry, the header as before
    resolver.kv[BASE] = KVInForce(BASE, 4, KVPolicy(quant="int4"))
    assert resolver.resolve(BASE).served_by.endswith(f"; kv={BASE}@4")


@pytest.mark.asyncio(loop_scope="function")
async def test_records_are_applied_on_events_and_refusals_are_shown(replica, store, new_version, alias, eventually,
                                                                    listening):
    kv = KVState(KVPolicies(store.registry), replica.engine, replica.resolver, BASE)
    replica.sync.kv = kv
    version = new_version(alias)
    store.registry.activate(alias, alias, version.version)
    await replica.sync.start()
    await listening()
    records = KVPolicies(store.registry)

    records.set(alias, {})  # the default, on an alias: applied (any engine keeps a cache as computed)
    await eventually(lambda: alias in replica.resolver.kv, what="the alias's record applied")
    assert replica.resolver.kv[alias].version == 1 and replica.resolver.resolve(alias).kv is None

    records.set(BASE, {"quant": "int4"})  # the FakeEngine compresses nothing: refused, never served silently
    await eventually(lambda: BASE in kv.refused, what="the base's record refused")
    assert BASE not in replica.resolver.kv and replica.resolver.resolve(alias).kv is None
    shown = kv.describe()["scopes"][BASE]
    assert shown["label"] == "none" and shown["refused"]["version"] == 1 and "applies no KV policy" in \
        shown["refused"]["reason"]
    assert metrics.kv_policy_refused.labels(replica.engine.name, BASE)._value.get() == 1
    assert kv.announcement()["refused"] == {BASE: 1}
