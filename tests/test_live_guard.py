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
        assert gw.metric("patchserve_hot_swaps_total", alias=name, kind="auto_rollback", reason="automatic") == 1
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
