"""The router tier, measured: its cost against calling a gateway directly, and base moves and a rolling
restart under streaming load through it.

    .venv/bin/python loadtests/bench_scale_out.py [--engine vllm|transformers] [--clients 8] [--segment-s 20]

1. Overhead: one gateway and one router on it; the same streaming load (8 clients, 32 tokens each)
   alternately direct and through the router, in 4 segments each (A/B interleaved, so drift on
   this noisy machine hits both alike): TTFT p50/p99 and completed requests per second.
2. Operations: two base-v1 gateways and one base-v2 gateway behind the router; under the same
   streaming load on an alias, 20 moves of the alias between the bases, then a rolling restart
   (SIGTERM, drain, start) of both base-v1 gateways: failed requests and TTFT by phase.
Writes loadtests/results/scale_out_<engine>.json and a PNG of TTFT over time, and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters_store.redis_server import EmbeddedRedis  # noqa: E402
from tests.gateway_server import GatewayProcess, RouterProcess  # noqa: E402
from tests.prometheus_server import free_port  # noqa: E402

TOKENS = 32


class StreamLoad:
    """`clients` coroutines streaming completions of `model` at `url` until stopped; one record per request."""

    def __init__(self, url: str, model: str, clients: int, prompt: str = "The"):
        self.url, self.model, self.clients, self.prompt = url, model, clients, prompt
        self.records: list[dict] = []  # started, ttft, ended, ok, served_by
        self._stop = asyncio.Event()

    async def _one(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            record = {"started": started, "ttft": None, "ended": None, "ok": False, "served_by": None}
            try:
                async with client.stream("POST", f"{self.url}/v1/completions",
                                         json={"model": self.model, "prompt": self.prompt, "max_tokens": TOKENS,
                                               "temperature": 0, "stream": True, "ignore_eos": True,
                                               "stream_options": {"include_usage": True}}) as r:
                    record["served_by"] = r.headers.get("x-patchserve-served-by")
                    # Tokens are counted from the usage the answer ends with, not from its events: a busy
                    # engine merges tokens a slow reader has not taken yet into one event.
                    tokens, last = 0, ""
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            if record["ttft"] is None:
                                record["ttft"] = time.perf_counter() - started
                            if '"completion_tokens"' in line:
                                tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", tokens)
                        last = line or last
                    record["ok"] = r.status_code == 200 and tokens >= TOKENS and last == "data: [DONE]"
                    if not record["ok"]:  # what a failure looked like, for the results file
                        record["error"] = f"status {r.status_code}, {tokens} tokens, last line {last[:300]!r}"
            except httpx.HTTPError as exc:
                record["error"] = repr(exc)
            record["ended"] = time.perf_counter()
            self.records.append(record)

    async def run_for(self, seconds: float) -> list[dict]:
        """Run the load for `seconds`; the records of requests that started in that window."""
        return await self.run_while(asyncio.sleep(seconds))

    async def run_while(self, work) -> list[dict]:
        """Run the load while `work` (a coroutine) runs; the records of requests started meanwhile."""
        self._stop.clear()
        first = len(self.records)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=self.clients * 2)) as client:
            tasks = [asyncio.create_task(self._one(client)) for _ in range(self.clients)]
            try:
                await work
            finally:
                self._stop.set()
                await asyncio.gather(*tasks)
        return self.records[first:]


def summary(records: list[dict], seconds: float | None = None) -> dict:
    ttfts = sorted(r["ttft"] for r in records if r["ok"] and r["ttft"] is not None)
    out = {"requests": len(records), "failed": sum(1 for r in records if not r["ok"])}
    if ttfts:
        out |= {"ttft_p50_ms": round(statistics.median(ttfts) * 1000, 2),
                "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000, 2)}
    if seconds:
        out["requests_per_s"] = round(sum(1 for r in records if r["ok"]) / seconds, 2)
    return out


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU of a process and (unless told not to) its descendants: the gateway's engine runs in
    children; this process's children are the servers under test, not the load."""
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if children else [])]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


async def overhead(gw: GatewayProcess, router: RouterProcess, clients: int, segment_s: float) -> dict:
    """A/B segments, direct and through the router, same load; and the CPU each process spent per request."""
    by_path = {"direct": [], "router": []}
    who = {"gateway": gw.proc.pid, "router": router.proc.pid, "load": psutil.Process().pid}
    cpu = {path: dict.fromkeys(who, 0.0) for path in by_path}
    await StreamLoad(gw.url, "tiny", clients).run_for(5)  # warm-up
    for _ in range(4):
        for path, url in (("direct", gw.url), ("router", router.url)):
            before = {name: cpu_seconds(pid, name != "load") for name, pid in who.items()}
            by_path[path] += await StreamLoad(url, "tiny", clients).run_for(segment_s)
            for name, pid in who.items():
                cpu[path][name] += cpu_seconds(pid, name != "load") - before[name]
            print(f"  {path:<6} segment: {summary(by_path[path][-200:])}", flush=True)
    result = {path: summary(records, 4 * segment_s) for path, records in by_path.items()}
    for path, records in by_path.items():
        done = max(1, sum(1 for r in records if r["ok"]))
        result[path]["cpu_ms_per_request"] = {name: round(1000 * s / done, 2) for name, s in cpu[path].items()}
    d, r = result["direct"], result["router"]
    result["ttft_p50_added_ms"] = round(r["ttft_p50_ms"] - d["ttft_p50_ms"], 2)
    result["throughput_ratio"] = round(r["requests_per_s"] / d["requests_per_s"], 3)
    return result


async def operations(v1: list[GatewayProcess], start_v2, router: RouterProcess, key: str, kit_dir: Path,
                     clients: int, moves: int) -> tuple[dict, list[dict]]:
    """Base moves, then a rolling restart, under streaming load through the router."""
    admin = httpx.AsyncClient(base_url=router.url, headers={"authorization": f"Bearer {key}"}, timeout=120)
    await asyncio.to_thread(start_v2)  # registers base-v2 from its checkpoint
    await asyncio.sleep(1)  # the router's next read sees it
    files = [("files", (f.name, f.read_bytes())) for f in (kit_dir / "patches" / "sentiment").iterdir()]
    uploaded = await admin.post("/admin/patches/sentiment/versions", files=files, data={"base": "base-v2"})
    uploaded.raise_for_status()
    v2_version = uploaded.json()["version"]
    r = await admin.post("/admin/aliases/sentiment/activate",
                         json={"version": v2_version, "force": True, "reason": "benchmark: first move"})
    r.raise_for_status()
    load = StreamLoad(router.url, "sentiment", clients, "Review: warm lovely day\nSentiment:")
    phases = {}

    async def do_moves() -> None:
        for i in range(moves):
            target = 1 if i % 2 == 0 else v2_version
            moved = await admin.post("/admin/aliases/sentiment/activate", json={"version": target})
            moved.raise_for_status()
            await asyncio.sleep(0.5)
        (await admin.post("/admin/aliases/sentiment/activate", json={"version": 1})).raise_for_status()
        await asyncio.sleep(1)

    async def rolling_restart() -> None:
        for gw in v1:
            gw.proc.terminate()
            await asyncio.to_thread(gw.proc.wait, 120)
            await asyncio.to_thread(gw.start)
        await asyncio.sleep(1)

    t0 = time.perf_counter()
    phases["baseline"] = summary(await load.run_for(10), 10)
    started = time.perf_counter()
    phases[f"{moves}_base_moves"] = summary(await load.run_while(do_moves()), None)
    phases[f"{moves}_base_moves"]["seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    phases["rolling_restart"] = summary(await load.run_while(rolling_restart()), None)
    phases["rolling_restart"]["seconds"] = round(time.perf_counter() - started, 1)
    await admin.aclose()
    timeline = [{"t": round(r["started"] - t0, 3), "ttft_ms": round(r["ttft"] * 1000, 1) if r["ttft"] else None,
                 "ok": r["ok"], "served_by": r["served_by"], **({"error": r["error"]} if "error" in r else {})}
                for r in load.records]
    return phases, timeline


def plot(timeline: list[dict], phases: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for base, colour in (("base-v1", "tab:blue"), ("base-v2", "tab:orange")):
        points = [(r["t"], r["ttft_ms"]) for r in timeline if r["ok"] and r["served_by"]
                  and r["served_by"].startswith(f"base={base}")]
        if points:
            ax.scatter(*zip(*points), s=4, color=colour, label=f"served by {base}")
    failed = [r["t"] for r in timeline if not r["ok"]]
    if failed:
        ax.scatter(failed, [0] * len(failed), marker="x", color="red", label="failed")
    ax.set_xlabel("seconds")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(" · ".join(f"{k}: {v['requests']} req, {v['failed']} failed" for k, v in phases.items()))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--segment-s", type=float, default=20.0)
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--overhead-only", action="store_true", help="Measure the router's cost and stop.")
    args = parser.parse_args()

    from service.cli import ensure_kit
    from service.settings import get_settings

    kit_dir = get_settings().kit_path
    ensure_kit(kit_dir, get_settings().kit_seed)
    result = {"engine": args.engine, "clients": args.clients, "tokens": TOKENS}
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        root = Path(tmp)
        server = EmbeddedRedis(root / "redis", free_port()).start()
        shared = {"PATCHSERVE_REDIS_URL": server.url, "PATCHSERVE_BLOB_DIR": str(root / "blobs"),
                  "PATCHSERVE_WORKER_IN_PROCESS": "false"}
        started: list = []

        def gateway(name: str, **env: str) -> GatewayProcess:
            (root / name).mkdir()
            gw = GatewayProcess(kit_dir, args.engine, root / name, PATCHSERVE_DATA_DIR=str(root / name / "data"),
                                PATCHSERVE_REPLICA_ID=name, **shared, **env)
            started.append(gw)
            return gw.start()

        try:
            print("1. router overhead: one gateway, direct vs through the router", flush=True)
            a = gateway("v1-a")
            router = RouterProcess(server.url, root)
            started.append(router)
            router.start()
            result["overhead"] = await overhead(a, router, args.clients, args.segment_s)
            print(f"  router adds {result['overhead']['ttft_p50_added_ms']} ms to TTFT p50; throughput "
                  f"{result['overhead']['throughput_ratio']}× direct", flush=True)

            if args.overhead_only:
                return write(result, None, None, args.engine)
            print(f"2. {args.moves} base moves and a rolling restart under load, through the router", flush=True)
            b = gateway("v1-b")
            start_v2 = lambda: gateway("v2", PATCHSERVE_BASE="base-v2", PATCHSERVE_SEED_KIT="false",
                                       PATCHSERVE_BASE_ALIASES="[]", PATCHSERVE_BASE_PATH=str(kit_dir / "base-v2"),
                                       PATCHSERVE_BASE_VERSION="kit")
            phases, timeline = await operations([a, b], start_v2, router, a.admin_key, kit_dir, args.clients,
                                                args.moves)
            result["operations"] = phases
        finally:
            for process in reversed(started):
                process.stop()
            server.stop()
    write(result, timeline, phases, args.engine)


def write(result: dict, timeline: list[dict] | None, phases: dict | None, engine: str) -> None:
    """The results file (and, after the operations part, its TTFT plot); prints the figures."""
    suffix = "" if phases is not None else "_overhead"
    out = REPO / "loadtests" / "results" / f"scale_out_{engine}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "timeline": timeline or []}, indent=2) + "\n")
    written = [str(out.relative_to(REPO))]
    if phases is not None:
        plot(timeline, phases, out.with_suffix(".png"))
        written.append(str(out.with_suffix(".png").relative_to(REPO)))
    print(json.dumps(result, indent=2))
    print(f"written to {' and '.join(written)}")


if __name__ == "__main__":
    asyncio.run(main())
