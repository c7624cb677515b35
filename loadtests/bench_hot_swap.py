"""Hot-swap timings: how fast a rollback takes effect, and how fast a second replica follows.

    .venv/bin/python loadtests/bench_hot_swap.py [--engine transformers|vllm] [--moves 20]

Starts a Redis and two gateway replicas on it (shared blob directory), uploads two kit patches as
versions 1 and 2 of one patch, and, under a streaming load on replica A, rolls the alias back and
forth. For each move it records the API round trip on A (A answers only once it serves the new
version, which the next request checks), and how long until replica B serves it. Then it activates
fresh versions that are not resident yet (the load is part of the move). Writes
loadtests/results/hot_swap_<engine>.json and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters_store.redis_server import EmbeddedRedis  # noqa: E402
from tests.gateway_server import GatewayProcess  # noqa: E402
from tests.prometheus_server import free_port  # noqa: E402


def ms(values: list[float]) -> dict:
    """p50 / p95 / max of `values` (seconds) in milliseconds."""
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1), "n": len(ordered)}


def upload(admin: httpx.Client, name: str, patch_dir: Path) -> int:
    files = [("file", (f.name, f.read_bytes())) for f in sorted(patch_dir.iterdir())]
    r = admin.post(f"/admin/patches/{name}/versions", files=files)
    r.raise_for_status()
    return r.json()["version"]


async def served_by(client: httpx.AsyncClient, url: str, model: str) -> str:
    r = await client.post(f"{url}/v1/completions", json={"model": model, "prompt": "Reverse: a b c\nOutput:",
                                                         "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    return r.headers["x-patchserve-served-by"]


async def replica_serves(client: httpx.AsyncClient, gw: GatewayProcess, alias: str, engine_name: str) -> float:
    started = time.perf_counter()
    while (await client.get(f"{gw.url}/admin/replica")).json()["aliases"].get(alias) != engine_name:
        if time.perf_counter() - started > 30:
            raise TimeoutError(f"replica never served {engine_name}")
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def measure(a: GatewayProcess, b: GatewayProcess, kit: Path, moves: int) -> dict:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    headers = {"authorization": f"Bearer {a.admin_key}"}
    with a.admin() as admin:
        upload(admin, name, kit / "patches" / "sentiment")
        upload(admin, name, kit / "patches" / "reverse")
        admin.post(f"/admin/aliases/{name}/activate", json={"version": 1}).raise_for_status()
        admin.post(f"/admin/aliases/{name}/activate",
                   json={"version": 2, "force": True, "reason": "bench"}).raise_for_status()

    stop, streams, failures = asyncio.Event(), [], []

    async def load(client: httpx.AsyncClient) -> None:
        body = {"model": name, "prompt": "Reverse: red blue green\nOutput:", "max_tokens": 12, "temperature": 0,
                "stream": True, "ignore_eos": True}
        while not stop.is_set():
            started = time.perf_counter()
            try:
                async with client.stream("POST", f"{a.url}/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for _ in r.aiter_lines():
                        pass
                streams.append(time.perf_counter() - started)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    rollback_api, replica_follow, wrong_first = [], [], 0
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        workers = [asyncio.create_task(load(client)) for _ in range(4)]
        await asyncio.sleep(1.0)
        current = 2
        for i in range(moves):
            target = 1 if current == 2 else 2
            started = time.perf_counter()
            r = await client.post(f"{a.url}/admin/aliases/{name}/rollback", json={"reason": f"bench {i}"})
            r.raise_for_status()
            rollback_api.append(time.perf_counter() - started)
            if await served_by(client, a.url, name) != f"base=base-v1; patch={name}@{target}":
                wrong_first += 1
            replica_follow.append(await replica_serves(client, b, name, f"{name}@{target}") + rollback_api[-1])
            current = target
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*workers)

        cold = []  # versions not resident anywhere: the move includes loading the adapter
        with a.admin() as admin:
            for _ in range(5):
                version = upload(admin, name, kit / "patches" / "qa")
                started = time.perf_counter()
                admin.post(f"/admin/aliases/{name}/activate",
                           json={"version": version, "force": True, "reason": "bench"}).raise_for_status()
                cold.append(time.perf_counter() - started)
    return {
        "moves": moves,
        "rollback_to_resident_api": ms(rollback_api),
        "first_request_after_rollback_on_new_version": moves - wrong_first,
        "replica_b_serves_after": ms(replica_follow),
        "activate_not_resident_api": ms(cold),
        "streams_during_moves": {"completed": len(streams), "failed": len(failures), **ms(streams)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-hot-swap-"))
    redis_server = EmbeddedRedis(root / "redis", free_port()).start()
    shared = {"PATCHSERVE_REDIS_URL": redis_server.url, "PATCHSERVE_BLOB_DIR": str(root / "blobs")}
    replicas = []
    try:
        for label in ("a", "b"):
            (root / label).mkdir()
            print(f"starting replica {label} ({args.engine}) …", flush=True)
            replicas.append(GatewayProcess(args.kit, args.engine, root / label,
                                           PATCHSERVE_DATA_DIR=str(root / label / "data"), **shared).start(600))
        results = asyncio.run(measure(*replicas, args.kit, args.moves))
    finally:
        for gw in replicas:
            gw.stop()
        redis_server.stop()
    results = {"engine": args.engine, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **results}
    out = REPO / "loadtests" / "results" / f"hot_swap_{args.engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
