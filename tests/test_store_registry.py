"""The registry against a real Redis server: versions, aliases, rollback, audit and events."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from adapters_store.errors import StoreError
from adapters_store.registry import Registry
from service.api.errors import status_for  # the store's refusals as the API answers them


def _files(n: int) -> dict[str, str]:
    return {"adapter_config.json": f"{n:064x}", "adapter_model.safetensors": f"{n + 1:064x}"}


@pytest.fixture
def registry(store_registry) -> Registry:
    store_registry.register_base("base-v1", "1", path="/kit/base-v1", module_shapes={"q_proj": (128, 128)})
    return store_registry


def _status(call) -> tuple[int, str]:
    with pytest.raises(StoreError) as e:
        call()
    return status_for(e.value), e.value.message


def test_bases_register_once_and_list(registry):
    base = registry.get_base("base-v1")
    assert (base.version, base.path, base.module_shapes) == ("1", "/kit/base-v1", {"q_proj": (128, 128)})
    again = registry.register_base("base-v1", "1", path="/kit/base-v1", module_shapes={"q_proj": (128, 128)})
    assert again == base, "registering the same base again changes nothing"
    assert _status(lambda: registry.register_base("base-v1", "2", path="/elsewhere"))[0] == 409
    registry.register_base("base-v2", "2", files={"model.safetensors": "ab" * 32})
    assert [b.name for b in registry.list_bases()] == ["base-v1", "base-v2"]
    assert registry.get_base("nope") is None
    assert _status(lambda: registry.register_base("../etc", "1", path="/x"))[0] == 400


def test_versions_are_monotonic_immutable_and_never_reused(registry):
    made = [registry.create_version("acme", "base-v1", _files(i), {"step": i}, actor="alice").version
            for i in range(3)]
    assert made == [1, 2, 3]
    v2 = registry.get_version("acme", 2)
    assert (v2.files, v2.meta, v2.created_by, v2.origin, v2.parents) == (_files(1), {"step": 1}, "alice", "upload", ())
    deleted = registry.delete_version("acme", 3, actor="alice", reason="bad upload")
    assert deleted.files == _files(2)
    assert registry.create_version("acme", "base-v1", _files(9)).version == 4, "a deleted number is not reused"
    assert [v.version for v in registry.list_versions("acme")] == [1, 2, 4]
    assert registry.get_version("acme", 2) == v2, "a version never changes once written"
    assert registry.list_patches() == ["acme"]


def test_a_refused_version_registers_nothing(registry):
    assert _status(lambda: registry.create_version("acme", "no-such-base", _files(0)))[0] == 422
    assert _status(lambda: registry.create_version("acme", "base-v1", _files(0), parents=["acme@7"]))[0] == 404
    assert _status(lambda: registry.create_version("a/b", "base-v1", _files(0)))[0] == 400
    assert _status(lambda: registry.create_version("acme", "base-v1", _files(0), origin="magic"))[0] == 400
    assert _status(lambda: registry.create_version("acme", "base-v1", {"../x": "0" * 64}))[0] == 400
    assert _status(lambda: registry.create_version("acme", "base-v1", {"x": "/etc/passwd"}))[0] == 400
    assert registry.list_versions("acme") == [] and registry.list_patches() == []
    assert registry.create_version("acme", "base-v1", _files(0)).version == 1, "no number was used up"


def test_lineage_is_recorded(registry):
    registry.create_version("acme", "base-v1", _files(0))
    registry.create_version("faq", "base-v1", _files(1))
    registry.register_base("base-v2", "2", path="/kit/base-v2")
    ported = registry.create_version("acme", "base-v2", _files(2), origin="port", parents=["acme@1"])
    merged = registry.create_version("combo", "base-v1", _files(3), origin="merge", parents=["acme@1", "faq@1"],
                                     meta={"method": "ties"})
    assert (ported.version, ported.base, ported.parents) == (2, "base-v2", ("acme@1",))
    assert registry.get_version("combo", 1).parents == ("acme@1", "faq@1") == merged.parents


def test_activate_rollback_history_audit_and_events(registry):
    for i in range(3):
        registry.create_version("acme", "base-v1", _files(i))
    with registry.subscribe() as events:
        registry.activate("support", "acme", 1, "base-v1", actor="alice", reason="first")
        registry.activate("support", "acme", 3, actor="alice", reason="new")
        assert registry.get_alias("support").ref == "acme@3"
        back = registry.rollback("support", actor="bob", reason="regressed")
        assert (back.ref, back.base, back.updated_by) == ("acme@1", "base-v1", "bob")
        assert registry.rollback("support", to_version=2, actor="bob").ref == "acme@2"
        moves = [events.get(timeout=2) for _ in range(4)]
    assert [(m["type"], m["version"], m["from"]) for m in moves] == [
        ("alias_moved", 1, ""), ("alias_moved", 3, "acme@1"), ("alias_moved", 1, "acme@3"),
        ("alias_moved", 2, "acme@1")]
    history = registry.alias_history("support")
    assert [(h.from_ref, h.to_ref, h.action, h.actor) for h in history] == [
        ("", "acme@1", "activate", "alice"), ("acme@1", "acme@3", "activate", "alice"),
        ("acme@3", "acme@1", "rollback", "bob"), ("acme@1", "acme@2", "rollback", "bob")]
    audit = [a for a in registry.audit() if a.target == "support"]
    assert [(a.action, a.actor, a.from_ref, a.to_ref, a.reason) for a in audit] == [
        ("activate", "alice", "", "acme@1", "first"), ("activate", "alice", "acme@1", "acme@3", "new"),
        ("rollback", "bob", "acme@3", "acme@1", "regressed"), ("rollback", "bob", "acme@1", "acme@2", "")]
    assert all(a.at > 0 for a in audit)


def test_rollback_refusals_change_nothing(registry):
    registry.create_version("acme", "base-v1", _files(0))
    registry.create_version("acme", "base-v1", _files(1))
    assert _status(lambda: registry.rollback("support"))[0] == 404
    registry.activate("support", "acme", 1)
    assert _status(lambda: registry.rollback("support"))[0] == 409, "nothing before the first version"
    assert _status(lambda: registry.rollback("support", to_version=9))[0] == 404
    assert _status(lambda: registry.rollback("support", to_version=1))[0] == 409, "already there"
    assert _status(lambda: registry.activate("support", "acme", 2, "base-v9"))[0] == 422
    assert _status(lambda: registry.activate("support", "acme", 2, if_current="acme@2"))[0] == 409
    assert registry.get_alias("support").ref == "acme@1" and len(registry.alias_history("support")) == 1
    assert registry.activate("support", "acme", 2, if_current="acme@1").ref == "acme@2"


def test_a_version_an_alias_points_to_cannot_be_deleted(registry):
    registry.create_version("acme", "base-v1", _files(0))
    registry.create_version("acme", "base-v1", _files(1))
    registry.activate("support", "acme", 2)
    status, message = _status(lambda: registry.delete_version("acme", 2))
    assert status == 409 and "support" in message
    assert registry.get_version("acme", 2) is not None
    registry.activate("support", "acme", 1)
    registry.delete_version("acme", 2)
    assert _status(lambda: registry.delete_version("acme", 2))[0] == 404
    assert _status(lambda: registry.activate("support", "acme", 2))[0] == 404


def test_concurrent_moves_never_lose_a_history_entry(registry):
    for i in range(4):
        registry.create_version("acme", "base-v1", _files(i))

    def mover(n: int) -> None:
        reg = Registry(redis.Redis(connection_pool=registry.r.connection_pool), prefix=registry.prefix)
        for i in range(10):
            reg.activate("support", "acme", 1 + (n + i) % 4, actor=f"t{n}")

    threads = [threading.Thread(target=mover, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = registry.alias_history("support")
    assert len(history) == 80
    # Each entry's "from" is the previous entry's "to": the moves were serialised, none interleaved.
    assert all(a.to_ref == b.from_ref for a, b in zip(history, history[1:]))
    assert registry.get_alias("support").ref == history[-1].to_ref
    assert len([a for a in registry.audit(limit=1000) if a.target == "support"]) == 80


def test_snapshot_lists_every_alias_pointer(registry):
    registry.create_version("acme", "base-v1", _files(0))
    registry.create_version("faq", "base-v1", _files(1))
    registry.activate("support", "acme", 1)
    registry.activate("help", "faq", 1)
    assert {a: p.ref for a, p in registry.snapshot().items()} == {"support": "acme@1", "help": "faq@1"}
    assert [p.alias for p in registry.list_aliases()] == ["help", "support"]


def test_audit_reads_since_an_entry_or_a_time(registry):
    registry.create_version("acme", "base-v1", _files(0), actor="alice", reason="upload")
    first = registry.audit()[-1]
    assert (first.action, first.target, first.actor, first.reason) == ("create_version", "acme@1", "alice", "upload")
    time.sleep(0.01)
    middle = time.time()
    registry.create_version("acme", "base-v1", _files(1))
    registry.activate("support", "acme", 2, actor="carol", reason="go")
    after_first = registry.audit(since=first.id)
    assert [a.action for a in after_first] == ["create_version", "activate"]
    assert registry.audit(since=middle) == after_first
    assert registry.audit(limit=1) == after_first[-1:]
    assert registry.audit(since=first.id, limit=1) == after_first[:1]
