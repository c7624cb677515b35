"""service/replica/adapter_pool.py: loads once, leases keep a version resident, idle unwanted versions leave."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_engine import AdapterLoadError


async def test_ensure_materializes_and_loads_a_version_once(pool, engine, store, new_version):
    v = new_version("p")
    await pool.ensure(v)
    await pool.ensure(v)
    assert engine.add_calls[v.ref] == 1
    assert engine.adapters() == [v.ref]
    ref = pool.ref(v)
    assert ref.name == v.ref
    for name, digest in v.files.items():  # the engine was given the version's exact files
        with store.blobs.open(digest) as blob:
            assert (pool.versions_dir / v.ref / name).read_bytes() == blob.read()
    assert ref.path == str(pool.versions_dir / v.ref)


async def test_concurrent_ensures_of_one_version_load_it_once(pool, engine, new_version, eventually):
    v = new_version("p")
    engine.add_gate = asyncio.Event()
    waiters = [asyncio.create_task(pool.ensure(v)) for _ in range(6)]
    await eventually(lambda: v.ref in engine.adding, what="the first load reached the engine")
    await asyncio.sleep(0.05)  # let every other ensure queue up behind the version's lock
    assert not any(t.done() for t in waiters), "an ensure returned before the version was loaded"
    engine.add_gate.set()
    await asyncio.gather(*waiters)
    assert engine.add_calls[v.ref] == 1
    assert engine.adapters() == [v.ref]


async def test_a_leased_version_stays_until_released(pool, engine, new_version, eventually):
    v = new_version("p")
    await pool.ensure(v)
    pool.acquire(v.ref)
    pool.acquire(v.ref)
    assert pool.leases_held() == {v.ref: 2}
    await pool.keep({})  # no longer wanted, but two requests hold it
    assert v.ref in engine.adapters() and engine.remove_calls[v.ref] == 0
    pool.release(v.ref)
    await asyncio.sleep(0.02)  # the release would unload in a task: give it the chance to (wrongly) run
    assert v.ref in engine.adapters(), "unloaded while a request still held it"
    pool.release(v.ref)  # the last one out unloads it
    await eventually(lambda: v.ref not in engine.adapters(), what="the last release unloaded the version")
    assert engine.remove_calls[v.ref] == 1
    assert pool.leases_held() == {}


async def test_keep_loads_wanted_and_removes_idle_unwanted_versions(pool, engine, new_version):
    v1, v2, other = new_version("p"), new_version("p"), new_version("q")
    await pool.keep({v1.ref: v1, v2.ref: v2})
    assert sorted(engine.adapters()) == [v1.ref, v2.ref]
    await pool.keep({v2.ref: v2, other.ref: other})
    assert sorted(engine.adapters()) == sorted([other.ref, v2.ref])  # removed by keep itself, not later
    assert engine.remove_calls == {v1.ref: 1}
    assert engine.add_calls == {v1.ref: 1, v2.ref: 1, other.ref: 1}


async def test_releasing_a_wanted_version_keeps_it_loaded(pool, engine, new_version):
    v = new_version("p")
    await pool.keep({v.ref: v})
    pool.acquire(v.ref)
    pool.release(v.ref)
    await asyncio.sleep(0.02)
    assert engine.adapters() == [v.ref] and engine.remove_calls[v.ref] == 0


async def test_a_version_unloaded_then_asked_for_again_is_reloaded(pool, engine, new_version):
    v = new_version("p")
    await pool.keep({v.ref: v})
    await pool.keep({})
    assert engine.adapters() == []
    pool.acquire(v.ref)  # a pinned request for it arrives
    await pool.ensure(v)
    assert engine.adapters() == [v.ref] and engine.add_calls[v.ref] == 2
    pool.release(v.ref)


async def test_a_request_for_a_version_being_unloaded_waits_and_has_it_loaded_again(pool, engine, new_version,
                                                                                     eventually):
    """The module's promise: a request that arrives while its version is being unloaded waits for the
    unload, then has the version loaded again, rather than reaching the engine without it."""
    v = new_version("p")
    await pool.keep({v.ref: v})
    engine.remove_gate = asyncio.Event()
    unload = asyncio.create_task(pool.keep({}))
    await eventually(lambda: v.ref in engine.removing, what="the unload reached the engine")
    pool.acquire(v.ref)  # a pinned request is admitted meanwhile …
    ensure = asyncio.create_task(pool.ensure(v))  # … and makes sure its version is there
    await asyncio.sleep(0.02)
    ensured_early = ensure.done()
    engine.remove_gate.set()
    await asyncio.gather(unload, ensure)
    assert v.ref in engine.adapters(), "ensure returned but the version is not in the engine"
    assert not ensured_early, "ensure returned while the version was being removed"
    pool.release(v.ref)
    await eventually(lambda: engine.adapters() == [], what="unloaded once the lease was given back")


async def test_a_failed_load_is_not_remembered_as_loaded(pool, engine, new_version):
    v = new_version("p")
    engine.fail_add = {v.ref}
    with pytest.raises(AdapterLoadError):
        await pool.ensure(v)
    assert engine.adapters() == []
    engine.fail_add = False
    await pool.ensure(v)  # the next ensure tries again
    assert engine.adapters() == [v.ref] and engine.add_calls[v.ref] == 2
