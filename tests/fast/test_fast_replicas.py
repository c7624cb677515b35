"""Heartbeats (adapters_store/replicas.py) and the router's routing table on a real Redis, no gateway."""

from __future__ import annotations

import time

import pytest

from adapters_store.errors import Conflict
from adapters_store.replicas import ReplicaInfo
from service.router.table import RoutingTable
from tests.fast.support import BASE, OTHER_BASE


def _info(replica_id: str, base: str = BASE, **fields) -> ReplicaInfo:
    return ReplicaInfo(**{"id": replica_id, "url": f"http://{replica_id}", "base": base, "names": [base],
                          "ready": True, "started_at": 1.0, **fields})


def test_a_heartbeat_expires_with_its_ttl_and_a_withdrawal_is_immediate(store):
    directory = store.replicas
    directory.announce(_info("a"), ttl_s=0.3)
    directory.announce(_info("b"), ttl_s=30)
    assert [r.id for r in directory.live()] == ["a", "b"]
    time.sleep(0.4)
    assert [r.id for r in directory.live()] == ["b"]  # a stopped beating: gone, and pruned from the set
    assert directory.r.smembers(directory._set) == {b"b"}
    directory.withdraw("b")
    assert directory.live() == []


def test_only_ready_replicas_that_are_not_draining_host_a_base(store):
    directory = store.replicas
    directory.announce(_info("starting", ready=False), ttl_s=30)
    directory.announce(_info("leaving", draining=True), ttl_s=30)
    with pytest.raises(Conflict, match=f"no live replica hosts base {BASE}"):
        directory.require_host(BASE)
    directory.announce(_info("up"), ttl_s=30)
    assert [r.id for r in directory.hosting(BASE)] == ["up"]
    directory.require_host(BASE)
    with pytest.raises(Conflict):
        directory.require_host(OTHER_BASE)


def test_a_base_and_an_alias_cannot_share_a_name(store, new_version):
    version = new_version("shared-name")
    store.registry.activate("shared-name", version.name, version.version)
    with pytest.raises(Conflict, match="name of an alias"):
        store.registry.register_base("shared-name", "1")
    with pytest.raises(Conflict, match="name of a base"):
        store.registry.activate(BASE, version.name, version.version)
    assert store.registry.get_alias(BASE) is None


async def test_the_routing_table_routes_by_base_skips_refusers_and_finds_moved_aliases(store, new_version):
    on_base, on_other = new_version("routed"), new_version("routed", base=OTHER_BASE)
    store.registry.activate("routed", on_base.name, on_base.version)
    for replica in (_info("a1"), _info("a2"), _info("b1", base=OTHER_BASE)):
        store.replicas.announce(replica, ttl_s=30)
    table = RoutingTable(store.replicas, store.registry)
    await table.refresh()
    assert table.base_of("routed") == BASE and table.base_of(BASE) == BASE
    assert table.base_of(f"routed@{on_other.version}") == OTHER_BASE  # a pinned version: its own base
    assert table.base_of("unknown") is None
    assert {r.id for r in table.candidates(BASE)} == {"a1", "a2"}
    table.in_flight["a1"] = 3
    assert [r.id for r in table.candidates(BASE)] == ["a2", "a1"]  # least busy first
    table.mark_down(table.candidates(BASE)[0])
    assert [r.id for r in table.candidates(BASE)] == ["a1"]
    store.replicas.announce(ReplicaInfo(**{**vars(_info("a2")), "started_at": 2.0}), ttl_s=30)  # restarted
    await table.refresh()
    assert {r.id for r in table.candidates(BASE)} == {"a1", "a2"}
    # The alias moves: the view is stale until the next read, and a fresh lookup sees it at once.
    store.registry.activate("routed", on_other.name, on_other.version)
    assert table.base_of("routed") == BASE
    assert table.lookup_fresh("routed") == OTHER_BASE and table.base_of("routed") == OTHER_BASE
