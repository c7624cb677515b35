"""service/replica/live_guard.py: after a move, live greedy requests are replayed on the previous version;
too little agreement rolls the alias back through the registry (so every replica follows)."""

from __future__ import annotations

import asyncio

import pytest_asyncio

from service import metrics
from service.api.openai import protocol as p

WINDOW = 4


async def _serve(replica, model: str, prompts: list[str], **kw) -> list[str]:
    """Run requests as the routes do (admit, complete, release); what served each."""
    served = []
    for prompt in prompts:
        sub = replica.serving.submit_completion(p.CompletionRequest(model=model, prompt=prompt, max_tokens=3,
                                                                    temperature=kw.get("temperature", 0)))
        await replica.serving.admit(sub)
        try:
            await replica.serving.complete(sub, chat=False)
        finally:
            replica.serving.release(sub)
        served.append(sub.resolved.patch.ref)
    return served


def _shadows(engine) -> list:
    return [r for r in engine.requests if r.request_id.startswith("shadow-")]


def _agreement(alias: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("patchserve_live_agreement", {"alias": alias})


def _settled(guard) -> bool:
    """Whether the guard's background comparisons are all done (read from its private task set: the guard
    has no public way to wait for them, and a negative check means nothing before they ran)."""
    return not guard._tasks


def _prompts(n: int) -> list[str]:
    return [f"question {i}?" for i in range(n)]


@pytest_asyncio.fixture(loop_scope="function")
async def watched(replica, store, new_version, alias, listening):
    """`alias` at p@1 with a live check in its gate; p@2 registered; the replica started."""
    new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    store.evals.set_gate(alias, {"min_live_agreement": 0.5, "live_window": WINDOW})
    await replica.sync.start()
    await listening()
    return replica


async def test_a_version_that_answers_differently_is_rolled_back_automatically(watched, store, alias, eventually):
    r = watched
    store.registry.activate(alias, "p", 2, actor="op", reason="new data")
    await eventually(lambda: r.resolver.pointer(alias).ref == "p@2")
    swaps = metrics.REGISTRY.get_sample_value("patchserve_hot_swaps_total",
                                              {"alias": alias, "kind": "auto_rollback", "reason": "automatic"}) or 0

    served = await _serve(r, alias, _prompts(WINDOW))
    assert served == ["p@2"] * WINDOW, "clients are answered by the new version; the check runs afterwards"

    pointer = await eventually(lambda: (a := store.registry.get_alias(alias)) and a.ref == "p@1" and a,
                               what="the alias was rolled back to p@1")
    assert (pointer.action, pointer.updated_by) == ("auto_rollback", "live-guard")
    last = store.registry.last_move(alias)
    assert (last.action, last.actor, last.from_ref, last.to_ref) == ("auto_rollback", "live-guard", "p@2", "p@1")
    assert f"live agreement with p@1 0.00 < 0.5 over {WINDOW} requests" == last.reason
    audit = [e for e in store.registry.audit(limit=50) if e.target == alias]
    assert (audit[-1].action, audit[-1].from_ref, audit[-1].to_ref) == ("auto_rollback", "p@2", "p@1")
    assert _agreement(alias) == 0.0

    # Each of the window's requests was replayed once, on the version it replaced, with the same prompt.
    shadows = _shadows(r.engine)
    assert len(shadows) == WINDOW and {s.adapter.name for s in shadows} == {"p@1"}
    client_prompts = [q.prompt_token_ids for q in r.engine.requests if not q.request_id.startswith("shadow-")]
    assert sorted(s.prompt_token_ids for s in shadows) == sorted(client_prompts)

    # The replica follows the registry: the alias serves p@1 again, counted as an automatic swap.
    await eventually(lambda: r.resolver.pointer(alias).ref == "p@1", what="the replica applied the rollback")
    assert metrics.REGISTRY.get_sample_value("patchserve_hot_swaps_total", {
        "alias": alias, "kind": "auto_rollback", "reason": "automatic"}) == swaps + 1
    assert await _serve(r, alias, _prompts(1)) == ["p@1"]
    await asyncio.sleep(0.05)
    assert len(_shadows(r.engine)) == WINDOW, "a rollback is not second-guessed"


async def test_a_version_that_answers_the_same_stays(watched, store, alias, eventually):
    r = watched
    r.engine.voices["p@2"] = "p@1"  # other weights, same answers
    store.registry.activate(alias, "p", 2, actor="op", reason="same behaviour, smaller file")
    await eventually(lambda: r.resolver.pointer(alias).ref == "p@2")
    assert await _serve(r, alias, _prompts(WINDOW + 2)) == ["p@2"] * (WINDOW + 2)
    await eventually(lambda: _agreement(alias) == 1.0, what="the live agreement was measured")
    await eventually(lambda: _settled(r.guard), what="the guard's comparisons settled")
    assert len(_shadows(r.engine)) == WINDOW, "only the window's requests are replayed"
    pointer = store.registry.get_alias(alias)
    assert (pointer.ref, pointer.action) == ("p@2", "activate")
    assert [e.action for e in store.registry.alias_history(alias)] == ["activate", "activate"]
    assert r.resolver.pointer(alias).ref == "p@2"


async def test_without_a_live_check_in_the_gate_nothing_is_replayed(watched, store, alias, eventually):
    r = watched
    store.evals.set_gate(alias, {"min_exact_match": 0.5})  # a gate, but no min_live_agreement
    store.registry.activate(alias, "p", 2)
    await eventually(lambda: r.resolver.pointer(alias).ref == "p@2")
    await _serve(r, alias, _prompts(WINDOW))
    await eventually(lambda: _settled(r.guard), what="the guard's comparisons settled")
    assert _shadows(r.engine) == []
    assert store.registry.get_alias(alias).ref == "p@2"


async def test_only_greedy_requests_on_the_alias_itself_are_compared(watched, store, alias, eventually):
    r = watched
    store.registry.activate(alias, "p", 2)
    await eventually(lambda: r.resolver.pointer(alias).ref == "p@2")
    await _serve(r, alias, _prompts(WINDOW), temperature=0.8)  # sampled: not comparable item by item
    await _serve(r, "p@2", _prompts(WINDOW))  # pinned: not the alias's traffic
    await eventually(lambda: _settled(r.guard), what="the guard's comparisons settled")
    assert _shadows(r.engine) == []
    assert store.registry.get_alias(alias).ref == "p@2"


async def test_a_shadow_rollout_that_disagrees_stops_itself(replica, store, new_version, alias, eventually,
                                                            listening):
    new_version("p"), new_version("p")
    store.registry.activate(alias, "p", 1)
    await replica.sync.start()
    await listening()
    replica.rollouts.start(alias, "p", 2, "shadow", min_agreement=0.9, min_requests=3, actor="op")
    await eventually(lambda: alias in replica.resolver.rollouts, what="the rollout was applied")
    assert await _serve(replica, alias, _prompts(3)) == ["p@1"] * 3  # shadow: clients see the active version
    await eventually(lambda: replica.rollouts.get(alias) is None, what="the rollout stopped itself")
    audit = [e for e in store.registry.audit(limit=50) if e.target == alias]
    assert (audit[-1].action, audit[-1].actor, audit[-1].from_ref) == ("rollout_stopped_automatically",
                                                                        "live-guard", "p@2")
    assert "agreement 0.00 < 0.9 over 3 requests" in audit[-1].reason
    assert {s.adapter.name for s in _shadows(replica.engine)} == {"p@2"}, "mirrored to the candidate"
    await eventually(lambda: alias not in replica.resolver.rollouts, what="the replica dropped the rollout")
    assert store.registry.get_alias(alias).ref == "p@1", "a stopped rollout moves no alias"
