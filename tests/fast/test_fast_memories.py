"""Side memories in the store (adapters_store/memories.py) and on a replica (resolver, memory pool, sync, serving),
on a real Redis and the fake engine: versions and pointers, refusals, which requests a memory serves, and
requests that finish on the memory version they were admitted with."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from adapters_store.errors import Conflict, Incompatible, Invalid, NotFound
from adapters_store.memories import EditRecord
from service.api.openai import protocol as p
from tests.fast.support import BASE, OTHER_BASE


def _version(store, name: str, edits: int = 1, parent: int = 0):
    digest = store.blobs.put_bytes(f"memory of {name} {uuid.uuid4().hex}".encode())
    records = [EditRecord(id=f"e{i}", prompt=f"fact {i} of", target=" new") for i in range(edits)]
    return store.memories.create_version(name, {"memory.safetensors": digest}, parent, records,
                                         [r.id for r in records], [], {"gate": {"passed": True}})


def _name() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def test_versions_and_pointer_move_like_an_alias(store):
    m = store.memories
    name = _name()
    record = m.create(name, BASE)
    assert (record.base, record.target) == (BASE, BASE) and m.pointer(name).version == 0
    v1, v2 = _version(store, name), _version(store, name, edits=2, parent=1)
    assert (v1.version, v2.version, v2.parent) == (1, 2, 1)
    m.activate(name, 1, actor="op", reason="first")
    m.activate(name, 2, actor="op", reason="second", if_current=1)
    assert m.rollback(name, actor="op", reason="undo").version == 1
    assert m.rollback(name, actor="op").version == 2  # a rollback is undone by a rollback
    assert m.rollback(name, to_version=0, actor="op").version == 0  # before the first edit
    assert [(h.from_version, h.to_version, h.action) for h in m.history(name)] == [
        (0, 1, "activate"), (1, 2, "activate"), (2, 1, "rollback"), (1, 2, "rollback"), (2, 0, "rollback")]
    audit = [e for e in store.registry.audit(limit=50) if e.target == name]
    assert [e.action for e in audit][-3:] == ["memory_rollback"] * 3 and audit[-1].to_ref == f"{name}@0"


def test_refusals_change_nothing(store, new_version):
    m = store.memories
    name = _name()
    with pytest.raises(Invalid):
        m.create("Bad Name", BASE)
    with pytest.raises(Incompatible, match="unknown base"):
        m.create(name, "no-such-base")
    with pytest.raises(NotFound):
        m.create(name, BASE, target="no-such-alias")
    m.create(name, BASE)
    with pytest.raises(Conflict, match="exists"):
        m.create(name, BASE)
    with pytest.raises(Conflict, match="attached to"):
        m.create(_name(), BASE)  # one memory per target: the base holds this one
    with pytest.raises(NotFound, match="no version"):
        m.activate(name, 3)
    _version(store, name)
    m.activate(name, 1)
    with pytest.raises(Conflict, match="moved meanwhile"):
        m.activate(name, 0, if_current=7)
    with pytest.raises(Conflict, match="already serves"):
        m.activate(name, 1)
    assert m.pointer(name).version == 1 and len(m.history(name)) == 1


def test_edit_ids_are_reserved_once_per_job(store):
    name = _name()
    store.memories.create(name, BASE)
    first = store.memories.reserve_edit_ids(name, 10, "job-a")
    assert store.memories.reserve_edit_ids(name, 10, "job-a") == first  # a retried job: the same ids
    assert store.memories.reserve_edit_ids(name, 5, "job-b") == first + 10


async def _complete(serving, model: str) -> tuple[str, str]:
    sub = serving.submit_completion(p.CompletionRequest(model=model, prompt="Hello", max_tokens=3, temperature=0))
    await serving.admit(sub)
    try:
        body = await serving.complete(sub, chat=False)
    finally:
        serving.release(sub)
    return sub.resolved.served_by, body["choices"][0]["text"]


async def test_a_memory_serves_its_target_and_moves_with_its_pointer(replica, store, new_version, alias, listening,
                                                                     eventually):
    new_version("p")
    store.registry.activate(alias, "p", 1)
    name = _name()
    store.memories.create(name, BASE)
    _version(store, name), _version(store, name, parent=1)
    await replica.sync.start()
    await listening()
    s = replica.serving
    assert "memory=" not in (await _complete(s, alias))[0]  # version 0: nothing yet
    store.memories.activate(name, 1)
    await eventually(lambda: name in replica.resolver.memories)
    served, text = await _complete(s, alias)
    assert served == f"base={BASE}; patch=p@1; memory={name}@1" and f"p@1+{name}@1" in text
    assert (await _complete(s, "tiny"))[0] == f"base={BASE}; patch=none; memory={name}@1"  # the base: every alias
    store.memories.activate(name, 2)
    await eventually(lambda: replica.resolver.memories[name].version == 2)
    assert (await _complete(s, alias))[0].endswith(f"memory={name}@2")
    assert sorted(replica.engine.memories()) == [f"{name}@1", f"{name}@2"]  # the previous stays for a rollback
    store.memories.rollback(name, to_version=0)
    await eventually(lambda: name not in replica.resolver.memories)
    assert "memory=" not in (await _complete(s, alias))[0]


async def test_an_alias_memory_overrides_its_bases_and_another_base_is_not_served(replica, store, new_version, alias,
                                                                                listening, eventually):
    new_version("p"), new_version("q")
    store.registry.activate(alias, "p", 1)
    other_alias = f"{alias}-o"
    store.registry.activate(other_alias, "q", 1)
    on_base, on_alias, elsewhere = _name(), _name(), _name()
    store.memories.create(on_base, BASE)
    store.memories.create(on_alias, BASE, target=alias)
    store.memories.create(elsewhere, OTHER_BASE)
    for name in (on_base, on_alias, elsewhere):
        _version(store, name)
        store.memories.activate(name, 1)
    await replica.sync.start()
    await listening()
    await eventually(lambda: {on_base, on_alias} <= set(replica.resolver.memories))
    assert (await _complete(replica.serving, alias))[0].endswith(f"memory={on_alias}@1")
    assert (await _complete(replica.serving, other_alias))[0].endswith(f"memory={on_base}@1")
    assert elsewhere not in replica.resolver.memories and f"{elsewhere}@1" not in replica.engine.memories()


async def test_a_request_finishes_on_the_memory_it_was_admitted_with(replica, store, listening, eventually):
    name = _name()
    store.memories.create(name, BASE)
    _version(store, name), _version(store, name, parent=1), _version(store, name, parent=2)
    store.memories.activate(name, 1)
    await replica.sync.start()
    await listening()
    await eventually(lambda: name in replica.resolver.memories)
    engine = replica.engine
    engine.hold = asyncio.Event()  # requests stop after their first token
    s = replica.serving
    sub = s.submit_completion(p.CompletionRequest(model="tiny", prompt="Hello", max_tokens=3, temperature=0))
    await s.admit(sub)
    running = asyncio.create_task(s.complete(sub, chat=False))
    await eventually(lambda: engine.running() == 1)
    # Two moves while it runs: 1 → 2 → 3. Version 1 is wanted by nobody now, but its lease keeps it loaded.
    store.memories.activate(name, 2)
    await eventually(lambda: replica.resolver.memories[name].version == 2)
    store.memories.activate(name, 3)
    await eventually(lambda: replica.resolver.memories[name].version == 3)
    assert f"{name}@1" in engine.memories(), "freed while a request admitted with it runs"
    engine.hold.set()
    body = await running
    s.release(sub)
    assert f"+{name}@1" in body["choices"][0]["text"] and sub.resolved.served_by.endswith(f"memory={name}@1")
    await eventually(lambda: f"{name}@1" not in engine.memories(), what="the slot freed after its last request")
