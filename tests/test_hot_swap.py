"""Hot-swap under load, on both engines: moves and rollbacks while streams run, and unloads that wait.

Every response must name exactly one version in `x-patchserve-served-by` and carry exactly that
version's greedy output (its reference is taken by pinning `name@N` on the same gateway).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
import openai

from tests.conftest import read_jsonl

MAX_TOKENS = 12
SWAPS = 20


def _upload(admin: httpx.Client, name: str, directory) -> int:
    files = [("file", (f.name, f.read_bytes())) for f in sorted(directory.iterdir())]
    r = admin.post(f"/admin/patches/{name}/versions", files=files)
    assert r.status_code == 201, r.text
    return r.json()["version"]


def _two_version_alias(gateway, kit_dir) -> str:
    """A fresh alias whose version 1 is the sentiment patch and version 2 the reverse patch; active: 1."""
    name = f"swap-{uuid.uuid4().hex[:8]}"
    with gateway.admin() as admin:
        assert _upload(admin, name, kit_dir / "patches" / "sentiment") == 1
        assert _upload(admin, name, kit_dir / "patches" / "reverse") == 2
        assert admin.post(f"/admin/aliases/{name}/activate", json={"version": 1}).status_code == 200
    return name


def _version_of(header: str, name: str) -> int:
    match = re.fullmatch(rf"base=base-v1; patch={re.escape(name)}@(\d+)", header)
    assert match, f"served-by names no single version: {header!r}"
    return int(match[1])


async def _stream(client: openai.AsyncOpenAI, model: str, prompt: str, **extra) -> tuple[str, str]:
    raw = await client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                            temperature=0, stream=True, **extra)
    text = ""
    async for chunk in raw.parse():
        text += chunk.choices[0].text if chunk.choices else ""
    return raw.headers["x-patchserve-served-by"], text


async def test_swaps_under_streaming_load_fail_nothing(gateway, kit_dir):
    name = _two_version_alias(gateway, kit_dir)
    prompts = ([r["prompt"] for r in read_jsonl(kit_dir / "eval" / "reverse.jsonl")[:3]]
               + [r["prompt"] for r in read_jsonl(kit_dir / "eval" / "sentiment.jsonl")[:2]])
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    reference = {(v, p): (await _stream(client, f"{name}@{v}", p))[1] for v in (1, 2) for p in prompts}
    assert sum(reference[1, p] != reference[2, p] for p in prompts) >= 3, "the versions must be told apart"

    results, failures, stop = [], [], asyncio.Event()

    async def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            prompt = prompts[i % len(prompts)]
            i += 1
            try:
                results.append((prompt, *(await _stream(client, name, prompt))))
            except Exception as exc:  # a failed request is what this test must never see
                failures.append(repr(exc))

    workers = [asyncio.create_task(load(w)) for w in range(6)]
    await asyncio.sleep(1.0)
    moves = []
    with gateway.admin() as admin:
        for i in range(SWAPS):
            started = time.perf_counter()
            if i % 2 == 0:
                r = await asyncio.to_thread(admin.post, f"/admin/aliases/{name}/activate",
                                           json={"version": 2, "force": True, "reason": "swap test"})
            else:
                r = await asyncio.to_thread(admin.post, f"/admin/aliases/{name}/rollback", json={"reason": "load"})
            assert r.status_code == 200, r.text
            moves.append(time.perf_counter() - started)
            # Effective at once on this replica: the next request is served by the version just chosen.
            header, _ = await _stream(client, name, prompts[0])
            assert _version_of(header, name) == (2 if i % 2 == 0 else 1)
            await asyncio.sleep(0.4)
    stop.set()
    await asyncio.gather(*workers)

    assert failures == []
    served = [(_version_of(header, name), prompt, text) for prompt, header, text in results]
    wrong = [(v, p, t) for v, p, t in served if t != reference[v, p]]
    assert wrong == [], f"{len(wrong)} responses differ from their version's reference"
    counts = {v: sum(1 for s in served if s[0] == v) for v in (1, 2)}
    assert min(counts.values()) >= 5, counts
    print(f"\n{gateway.env['PATCHSERVE_ENGINE']}: {len(served)} streams, by version {counts}, "
          f"moves p50 {sorted(moves)[len(moves) // 2] * 1000:.0f} ms, max {max(moves) * 1000:.0f} ms")
    # The alias's history holds all of it, in order.
    with gateway.admin() as admin:
        history = admin.get(f"/admin/aliases/{name}").json()["history"]
    assert [h["action"] for h in history] == ["activate"] + ["force_activate", "rollback"] * (SWAPS // 2)


async def test_an_adapter_leaves_only_after_its_last_request(gateway, kit_dir):
    name = _two_version_alias(gateway, kit_dir)
    with gateway.admin() as admin:
        third = _upload(admin, name, kit_dir / "patches" / "qa")
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300)
    prompt = read_jsonl(kit_dir / "eval" / "reverse.jsonl")[0]["prompt"]
    expected = await _long(client, f"{name}@1", prompt)

    # Other long requests keep the engine busy, so the one under watch is still running when the alias moves.
    busy = [asyncio.create_task(_long(client, "tiny", f"{i} {prompt}")) for i in range(3)]
    watched = asyncio.create_task(_long(client, name, prompt, with_header=True))
    ready = {}
    deadline = time.monotonic() + 60
    auth = {"authorization": f"Bearer {gateway.admin_key}"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=auth) as http:
        while not ready.get("leases", {}).get(f"{name}@1"):
            assert time.monotonic() < deadline and not watched.done(), "the watched request never started"
            ready = (await http.get("/admin/replica")).json()
        # Two moves: version 1 is then neither active nor the previous version; only the request holds it.
        for version in (2, third):
            moved = await http.post(f"/admin/aliases/{name}/activate",
                                    json={"version": version, "force": True, "reason": "unload test"})
            assert moved.status_code == 200
        ready = (await http.get("/admin/replica")).json()
    assert ready["aliases"][name] == f"{name}@{third}"
    assert ready["leases"].get(f"{name}@1"), "the watched request finished before the moves; make it longer"
    assert f"{name}@1" in ready["adapters"], "unloaded while a request still used it"
    header, text = await watched
    await asyncio.gather(*busy)
    assert _version_of(header, name) == 1 and text == expected
    with gateway.admin() as admin:
        deadline = time.monotonic() + 10
        while f"{name}@1" in admin.get("/admin/replica").json()["adapters"]:
            assert time.monotonic() < deadline, "an unwanted, idle version was never unloaded"
            await asyncio.sleep(0.1)
        assert f"{name}@2" in admin.get("/admin/replica").json()["adapters"]  # the previous version stays


async def _long(client, model: str, prompt: str, with_header: bool = False):
    """A greedy stream of 200 tokens (EOS ignored), collected: its text, and its served-by header if asked."""
    raw = await client.completions.with_raw_response.create(model=model, prompt=prompt, temperature=0, stream=True,
                                                            max_tokens=200, extra_body={"ignore_eos": True})
    text = ""
    async for chunk in raw.parse():
        text += chunk.choices[0].text if chunk.choices else ""
    return (raw.headers["x-patchserve-served-by"], text) if with_header else text
