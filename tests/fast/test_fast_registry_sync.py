"""service/replica/registry_sync.py: the replica follows the registry (events, reconcile), loading before moving."""

from __future__ import annotations

import asyncio

import pytest

from service import metrics
from service.replica.registry_sync import RegistrySync
from service.replica.resolver import HostedElsewhere
from tests.fast.support import BASE, OTHER_BASE, subscribers


def _ref(replica, alias: str) -> str | None:
    pointer = replica.resolver.pointer(alias)
    return pointer.ref if pointer else None


def _sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_start_applies_every_alias_at_its_recorded_version_each_loaded_before_it_is_visible(
        replica, store, new_version, alias, eventually):
    p1, p2, q1 = new_version("p"), new_version("p"), new_version("q")
    other = f"{alias}-b"
    store.registry.activate(alias, "p", 1)
    store.registry.activate(alias, "p", 2)
    store.registry.activate(other, "q", 1)
    replica.engine.add_gate = asyncio.Event()
    start = asyncio.create_task(replica.sync.start())
    await eventually(lambda: replica.engine.adding, what="a load reached the engine")
    assert replica.resolver.aliases == {}, "an alias was visible before its version was loaded"
    assert not start.done(), "start() returned before the aliases' versions were loaded"
    replica.engine.add_gate.set()
    await start
    assert replica.resolver.aliases == {alias: ("p", 2), other: ("q", 1)}
    assert sorted(replica.resolver.versions["p"]) == [1, 2]
    # The active versions, and the alias's previous one (p@1) for a fast rollback.
    assert sorted(replica.engine.adapters()) == sorted([p1.ref, p2.ref, q1.ref])
    assert replica.engine.add_calls == {p1.ref: 1, p2.ref: 1, q1.ref: 1}
    assert replica.resolver.resolve(alias).patch.ref == p2.ref
    assert _sample("patchserve_alias_active_info", alias=alias, patch="p", version="2", base=BASE) == 1


async def test_an_activation_reaches_the_replica_through_its_event(replica, store, new_version, alias, eventually,
                                                                   listening):
    """With no periodic reconcile in reach (interval 60 s), only the pub/sub event can move the alias."""
    p1, p2 = new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    sync = RegistrySync(store.registry, replica.resolver, replica.pool, BASE, store.redis_url, interval_s=60)
    await sync.start()
    try:
        await listening()
        swaps = _sample("patchserve_hot_swaps_total", alias=alias, kind="activate", reason="operator")
        replica.engine.add_gate = asyncio.Event()
        store.registry.activate(alias, "p", 2, actor="op", reason="better")
        await eventually(lambda: p2.ref in replica.engine.adding, what="the event made the replica load p@2")
        assert _ref(replica, alias) == p1.ref, "the alias moved before its new version was loaded"
        replica.engine.add_gate.set()
        await eventually(lambda: _ref(replica, alias) == p2.ref, what="the alias moved to p@2")
        assert p2.ref in replica.engine.adapters()
        assert p1.ref in replica.engine.adapters(), "the previous version left: a rollback would have to load it"
        assert replica.engine.remove_calls[p1.ref] == 0
        assert _sample("patchserve_hot_swaps_total", alias=alias, kind="activate", reason="operator") == swaps + 1
    finally:
        await sync.stop()


async def test_a_move_made_while_nobody_listened_is_repaired_by_reconcile(replica, store, new_version, alias):
    new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.reconcile()  # applied once; no listener, no periodic task
    assert _ref(replica, alias) == "p@1"
    repairs = _sample("patchserve_registry_repairs_total")
    store.registry.activate(alias, "p", 2)  # its event reaches nobody
    await asyncio.sleep(0.05)
    assert _ref(replica, alias) == "p@1"
    await replica.sync.reconcile()
    assert _ref(replica, alias) == "p@2"
    assert "p@2" in replica.engine.adapters() and "p@1" in replica.engine.adapters()
    assert _sample("patchserve_registry_repairs_total") == repairs + 1, "a repair is counted as one"
    await replica.sync.reconcile()  # nothing left to repair
    assert _sample("patchserve_registry_repairs_total") == repairs + 1


async def test_the_periodic_reconcile_repairs_a_lost_event(replica, store, new_version, alias, eventually):
    new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    listener = [t for t in asyncio.all_tasks() if t.get_name() == "registry-events"]
    assert len(listener) == 1
    listener[0].cancel()  # events are lost from now on; only the 0.2 s reconcile is left
    await asyncio.gather(listener[0], return_exceptions=True)
    store.registry.activate(alias, "p", 2)
    await eventually(lambda: _ref(replica, alias) == "p@2", timeout=3, what="the periodic reconcile moved it")


async def test_the_previous_version_stays_resident_and_older_ones_leave(replica, store, new_version, alias,
                                                                        eventually, listening):
    p1, p2, p3 = new_version("p"), new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    await listening()
    store.registry.activate(alias, "p", 2)
    await eventually(lambda: _ref(replica, alias) == p2.ref)
    assert sorted(replica.engine.adapters()) == [p1.ref, p2.ref]
    store.registry.activate(alias, "p", 3)
    await eventually(lambda: _ref(replica, alias) == p3.ref)
    await eventually(lambda: p1.ref not in replica.engine.adapters(), what="p@1, two moves back, was unloaded")
    assert sorted(replica.engine.adapters()) == [p2.ref, p3.ref]
    # A rollback is a pointer move: p@2 was never unloaded, so it is not loaded again.
    store.registry.rollback(alias, actor="op", reason="regression")
    await eventually(lambda: _ref(replica, alias) == p2.ref)
    assert replica.engine.add_calls[p2.ref] == 1
    assert sorted(replica.engine.adapters()) == [p2.ref, p3.ref], "p@3 is now the previous version: it stays"


async def test_new_and_deleted_versions_reach_the_resolver(replica, store, new_version, alias, eventually,
                                                           listening):
    new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    await listening()
    new_version("p")
    await eventually(lambda: 2 in replica.resolver.versions.get("p", {}), what="the new version was read")
    assert replica.resolver.resolve("p@2").patch.ref == "p@2"  # pinned requests may name it at once
    assert "p@2" not in replica.engine.adapters(), "a version no alias serves is not loaded ahead of need"
    store.registry.delete_version("p", 2)
    await eventually(lambda: 2 not in replica.resolver.versions.get("p", {}), what="the deletion was read")


async def test_an_alias_moved_to_a_base_not_hosted_here_is_hosted_elsewhere(replica, store, new_version, alias,
                                                                           eventually, listening):
    new_version("p")
    ported = new_version("p-ported", base=OTHER_BASE)
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    await listening()
    store.registry.activate(alias, "p-ported", 1, reason="base upgrade")
    await eventually(lambda: replica.resolver.elsewhere.get(alias) == OTHER_BASE)
    assert alias not in replica.resolver.aliases
    with pytest.raises(HostedElsewhere):
        replica.resolver.resolve(alias)
    assert ported.ref not in replica.engine.adapters(), "this replica cannot serve a version of another base"
    store.registry.rollback(alias)  # back on our base: served here again
    await eventually(lambda: _ref(replica, alias) == "p@1")
    assert alias not in replica.resolver.elsewhere


async def test_a_canary_rollout_is_followed_and_its_candidate_loaded(replica, store, new_version, alias,
                                                                    eventually, listening):
    new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    await listening()
    replica.rollouts.start(alias, "p", 2, "canary", percent=50.0)
    await eventually(lambda: alias in replica.resolver.rollouts, what="the rollout was applied")
    assert replica.resolver.rollouts[alias].candidate.ref == "p@2"
    assert "p@2" in replica.engine.adapters(), "a canary's candidate is loaded before any user is sent to it"
    served = {replica.resolver.resolve(alias, f"user-{i}").patch.ref for i in range(200)}
    assert served == {"p@1", "p@2"}
    replica.rollouts.stop(alias)
    await eventually(lambda: alias not in replica.resolver.rollouts, what="the stopped rollout was dropped")
    assert {replica.resolver.resolve(alias, f"user-{i}").patch.ref for i in range(200)} == {"p@1"}


async def test_stop_unsubscribes_and_stops_following(replica, store, new_version, alias, eventually, listening):
    new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    await listening()
    tasks = [t for t in asyncio.all_tasks() if t.get_name() in ("registry-events", "registry-reconcile")]
    assert len(tasks) == 2
    await replica.sync.stop()
    assert all(t.done() for t in tasks)
    await eventually(lambda: subscribers(store) == 0, what="the replica's subscription was closed")
    store.registry.activate(alias, "p", 2)
    await asyncio.sleep(0.5)  # more than two reconcile intervals: a live sync would have moved by now
    assert _ref(replica, alias) == "p@1"
