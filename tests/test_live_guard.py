"""Automatic rollback on a live regression: a damaged version, forced past the gate, is undone by live traffic.

On the session's transformers gateway: the alias asks for a live check (min_live_agreement); after a
forced move, its first greedy requests are replayed on the version it replaced; too little agreement
rolls the alias back on its own, audited with the figures and counted as an automatic rollback. A
faithful version under the same watch stays.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import openai

from tests.conftest import read_jsonl
from tests.test_gate import _damaged, _files

WINDOW = 8


async def _traffic(gw, alias: str, prompts: list[str]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    raws = await asyncio.gather(*(client.completions.with_raw_response.create(
        model=alias, prompt=p, max_tokens=12, temperature=0) for p in prompts))
    return [r.headers["x-patchserve-served-by"] for r in raws]


def _eventually(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.1)


def _wait_for(admin, alias: str, ref: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (detail := admin.get(f"/admin/aliases/{alias}").json())["ref"] != ref:
        assert time.monotonic() < deadline, f"{alias} still at {detail['ref']}"
        time.sleep(0.1)
    return detail


async def test_a_forced_regression_is_rolled_back_by_live_traffic(gateways, kit_dir, tmp_path):
    gw = gateways.get("transformers")
    name = f"live-{uuid.uuid4().hex[:8]}"
    prompts = [r["prompt"] for r in read_jsonl(kit_dir / "eval" / "reverse.jsonl")[:WINDOW]]
    with gw.admin() as admin:
        assert admin.post(f"/admin/patches/{name}/versions", files=_files(kit_dir / "patches" / "reverse"),
                          data={"activate": "true"}).status_code == 201
        assert admin.put(f"/admin/aliases/{name}/gate",
                         json={"min_live_agreement": 0.5, "live_window": WINDOW}).status_code == 200
        assert admin.post(f"/admin/patches/{name}/versions",
                          files=_files(_damaged(kit_dir, tmp_path / "bad"))).status_code == 201
        forced = admin.post(f"/admin/aliases/{name}/activate",
                            json={"version": 2, "force": True, "reason": "the tenant insists"})
        assert forced.status_code == 200

        served = await _traffic(gw, name, prompts)
        assert set(served) == {f"base=base-v1; patch={name}@2"}, "clients got the forced version meanwhile"
        detail = await asyncio.to_thread(_wait_for, admin, name, f"{name}@1")
        last = detail["history"][-1]
        assert (last["action"], last["actor"], last["from_ref"]) == ("auto_rollback", "live-guard", f"{name}@2")
        assert "live agreement" in last["reason"]
        audit = [e for e in admin.get("/admin/audit", params={"limit": 100}).json() if e["target"] == name]
        assert audit[-1]["action"] == "auto_rollback"
        assert gw.metric("patchserve_live_agreement", alias=name) < 0.5
        _eventually(lambda: gw.metric("patchserve_hot_swaps_total", alias=name, kind="auto_rollback",
                                      reason="automatic") == 1)  # counted when this replica applies the move
        assert set(await _traffic(gw, name, prompts[:2])) == {f"base=base-v1; patch={name}@1"}

        # The same watch on a faithful version: it agrees, and it stays.
        assert admin.post(f"/admin/patches/{name}/versions",
                          files=_files(kit_dir / "patches" / "reverse")).status_code == 201
        assert admin.post(f"/admin/aliases/{name}/activate",
                          json={"version": 3, "force": True, "reason": "same weights"}).status_code == 200
        await _traffic(gw, name, prompts)
        deadline = time.monotonic() + 30
        while gw.metric("patchserve_live_agreement", alias=name) < 1.0:
            assert time.monotonic() < deadline, "the faithful version's live agreement was never measured"
            await asyncio.sleep(0.1)
        assert admin.get(f"/admin/aliases/{name}").json()["ref"] == f"{name}@3"


def _served(gw, alias: str, user: str | None, prompt: str) -> str:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.completions.with_raw_response.create(model=alias, prompt=prompt, max_tokens=12, temperature=0,
                                                      **({"user": user} if user else {}))
    return raw.headers["x-patchserve-served-by"]


def test_a_canary_is_sticky_per_user_and_stops_itself_when_it_disagrees(gateways, kit_dir, tmp_path):
    gw = gateways.get("transformers")
    name = f"canary-{uuid.uuid4().hex[:8]}"
    prompts = [r["prompt"] for r in read_jsonl(kit_dir / "eval" / "reverse.jsonl")[:4]]
    with gw.admin() as admin:
        assert admin.post(f"/admin/patches/{name}/versions", files=_files(kit_dir / "patches" / "reverse"),
                          data={"activate": "true"}).status_code == 201
        assert admin.post(f"/admin/patches/{name}/versions",
                          files=_files(_damaged(kit_dir, tmp_path / "bad"))).status_code == 201
        assert admin.put(f"/admin/aliases/{name}/rollout", json={"version": 2, "mode": "canary"}).status_code == 400
        started = admin.put(f"/admin/aliases/{name}/rollout", json={
            "version": 2, "mode": "canary", "percent": 50, "min_agreement": 0.5, "min_requests": 60,
            "reason": "try the new one on half the users"})
        assert started.status_code == 200 and (started.json()["patch"], started.json()["version"]) == (name, 2)
        deadline = time.monotonic() + 10  # the replica picks it up from the event (or the next reconcile)
        users = [f"user-{i}" for i in range(12)]
        while True:
            seen = {u: _served(gw, name, u, prompts[0]) for u in users}
            if len(set(seen.values())) == 2 or time.monotonic() > deadline:
                break
        assert set(seen.values()) == {f"base=base-v1; patch={name}@1", f"base=base-v1; patch={name}@2"}
        seen = {u: _served(gw, name, u, prompts[0]) for u in users}  # all asked after the replica applied it
        for u in users[:6]:  # sticky: a user keeps the version the canary gave them
            assert {_served(gw, name, u, p) for p in prompts} == {seen[u]}

        # More traffic: once 60 canary answers were compared, the candidate's disagreement stops the rollout.
        deadline = time.monotonic() + 120
        while admin.get(f"/admin/aliases/{name}/rollout").status_code != 404:
            assert time.monotonic() < deadline, "the rollout never stopped"
            for u in users:
                _served(gw, name, u, prompts[len(u) % len(prompts)])
        audit = [e for e in admin.get("/admin/audit", params={"limit": 100}).json() if e["target"] == name]
        assert audit[-1]["action"] == "rollout_stopped_automatically" and "agreement" in audit[-1]["reason"]
        _eventually(lambda: gw.metric("patchserve_rollouts_stopped_total", alias=name, reason="automatic") == 1)
        assert admin.get(f"/admin/aliases/{name}").json()["ref"] == f"{name}@1", "the alias itself never moved"
        deadline = time.monotonic() + 5
        while {_served(gw, name, u, prompts[0]) for u in users} != {f"base=base-v1; patch={name}@1"}:
            assert time.monotonic() < deadline, "users still reach the stopped candidate"


def test_shadow_mode_mirrors_without_answering(gateways, kit_dir):
    gw = gateways.get("transformers")
    name = f"shadow-{uuid.uuid4().hex[:8]}"
    prompts = [r["prompt"] for r in read_jsonl(kit_dir / "eval" / "reverse.jsonl")[:6]]
    with gw.admin() as admin:
        # Only the first activates: a second `activate` would queue a gated move to @2 that lands mid-test.
        for activate in ("true", "false"):
            assert admin.post(f"/admin/patches/{name}/versions", files=_files(kit_dir / "patches" / "reverse"),
                              data={"activate": activate}).status_code == 201
        assert admin.get(f"/admin/aliases/{name}").json()["ref"] == f"{name}@1"
        assert admin.put(f"/admin/aliases/{name}/rollout", json={
            "version": 2, "mode": "shadow", "min_agreement": 0.9, "min_requests": 4}).status_code == 200
        deadline = time.monotonic() + 10
        while gw.metric("patchserve_rollout_compared_total", alias=name) < len(prompts):
            assert time.monotonic() < deadline, "requests were not mirrored"
            assert {_served(gw, name, None, p) for p in prompts} == {f"base=base-v1; patch={name}@1"}
        # Mirrors run after each answer: let the last ones finish before reading the two counters.
        previous = -1.0
        while (compared := gw.metric("patchserve_rollout_compared_total", alias=name)) != previous:
            assert time.monotonic() < deadline + 30, "mirrors never settled"
            previous = compared
            time.sleep(0.5)
        assert gw.metric("patchserve_rollout_agreed_total", alias=name) == compared, "same weights: all agree"
        assert admin.get(f"/admin/aliases/{name}/rollout").json()["mode"] == "shadow", "an agreeing shadow stays"
        stopped = admin.delete(f"/admin/aliases/{name}/rollout", params={"reason": "seen enough"})
        assert stopped.status_code == 200 and admin.get(f"/admin/aliases/{name}/rollout").status_code == 404
