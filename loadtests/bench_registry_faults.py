"""Registry faults, as a timeline: inference through a Redis outage, and admin writes across primary failovers.

    .venv/bin/python loadtests/bench_registry_faults.py [--engine transformers|vllm] [--outage-s 30] [--kills 10]

Outage: a gateway with an inference key, 8 clients streaming completions; the registry's redis-server
is killed with -9, kept down, restarted. Failover: a primary, a replica and three Sentinels; an operator
flips an alias without pause while the primary is killed `--kills` times. For each second the
timeline counts streams served and failed and admin answers by status. Writes
loadtests/results/registry_faults_<engine>.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters_store.redis_server import EmbeddedRedis  # noqa: E402
from tests.gateway_server import GatewayProcess  # noqa: E402
from tests.prometheus_server import free_port  # noqa: E402
from tests.redis_ha import RedisHA  # noqa: E402
from tests.registry_load import AliasFlipper, StreamingClients  # noqa: E402


def timeline(start: float, streams: list, admin: list, marks: dict[str, float]) -> list[dict]:
    """One row per second since `start`: streams ok/failed, admin answers by status, and what happened then."""
    end = max([t for t, *_ in streams] + [t for t, *_ in admin] + [start])
    rows = []
    for second in range(int(end - start) + 1):
        lo, hi = start + second, start + second + 1
        row = {"t": second, "streams_ok": sum(1 for t, ok, _ in streams if lo <= t < hi and ok),
               "streams_failed": sum(1 for t, ok, _ in streams if lo <= t < hi and not ok), "admin": {}}
        for t, status, _ in admin:
            if lo <= t < hi:
                row["admin"][str(status)] = row["admin"].get(str(status), 0) + 1
        row["events"] = [name for name, at in marks.items() if lo <= at < hi]
        rows.append(row)
    return rows


def outage(kit: Path, engine: str, outage_s: float, work: Path) -> dict:
    port = free_port()
    server = EmbeddedRedis(work / "redis", port).start()
    gw = GatewayProcess(kit, engine, work, PATCHSERVE_REDIS_URL=server.url).start()
    admin_calls: list[tuple[float, int, str]] = []
    marks: dict[str, float] = {}
    try:
        with gw.admin() as admin:
            key = admin.post("/admin/keys", json={"role": "inference", "name": "bench"}).json()["key"]
            start = time.monotonic()
            with StreamingClients(gw.url, key, 8) as clients:
                time.sleep(5)
                server.proc.kill()
                server.proc.wait()
                marks["redis killed"] = time.monotonic()
                while time.monotonic() - marks["redis killed"] < outage_s:
                    r = admin.post("/admin/keys", json={"role": "inference", "name": "during"})
                    admin_calls.append((time.monotonic(), r.status_code, "create key"))
                    time.sleep(0.5)
                server = EmbeddedRedis(work / "redis", port).start()
                marks["redis restarted"] = time.monotonic()
                while True:
                    r = admin.post("/admin/keys", json={"role": "inference", "name": "after"})
                    admin_calls.append((time.monotonic(), r.status_code, "create key"))
                    if r.status_code == 201:
                        marks["admin writes accepted"] = time.monotonic()
                        break
                    time.sleep(0.2)
                time.sleep(5)
    finally:
        gw.stop()
        server.stop()
    return {"streams_ok": clients.ok, "streams_failed": len(clients.failures), "failures": clients.failures[:10],
            "writable_after_restart_s": round(marks["admin writes accepted"] - marks["redis restarted"], 2),
            "timeline": timeline(start, clients.events, admin_calls, marks)}


def failover(kit: Path, engine: str, kills: int, work: Path) -> dict:
    ha = RedisHA(work / "redis").start()
    gw = GatewayProcess(kit, engine, work, PATCHSERVE_REDIS_SENTINELS=ha.sentinel_setting).start()
    marks: dict[str, float] = {}
    promotions, recoveries = [], []
    try:
        files = [("file", (f.name, f.read_bytes())) for f in sorted((kit / "patches" / "reverse").iterdir())]
        with gw.admin() as admin:
            admin.post("/admin/patches/reverse/versions", files=files).raise_for_status()
            admin.post("/admin/aliases/reverse/activate",
                       json={"version": 2, "force": True, "reason": "bench"}).raise_for_status()
        flipper = AliasFlipper(gw.url, gw.admin_key)
        start = time.monotonic()
        with StreamingClients(gw.url, clients=2, models=("reverse",)) as clients:
            flipper.start()
            time.sleep(2)
            for i in range(kills):
                killed = time.monotonic()
                marks[f"kill {i + 1}"] = killed
                promoted, _ = ha.kill_primary()
                promotions.append(promoted)
                while not flipper.acknowledged or flipper.acknowledged[-1][0] < killed:
                    time.sleep(0.05)
                recoveries.append(next(at for at, _ in flipper.acknowledged if at > killed) - killed)
                time.sleep(1)
            flipper.stop.set()
            flipper.join(60)
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {gw.admin_key}"}, timeout=30) as admin:
            history = {m["reason"] for m in admin.get("/admin/aliases/reverse").json()["history"]}
        lost = [reason for _, reason in flipper.acknowledged if reason not in history]
    finally:
        gw.stop()
        ha.stop()
    return {"kills": kills, "acknowledged_moves": len(flipper.acknowledged), "lost": len(lost),
            "admin_statuses": flipper.statuses(), "streams_ok": clients.ok, "streams_failed": len(clients.failures),
            "promotion_s": {"p50": round(statistics.median(promotions), 2), "max": round(max(promotions), 2)},
            "writes_back_after_kill_s": {"p50": round(statistics.median(recoveries), 2),
                                         "max": round(max(recoveries), 2)},
            "timeline": timeline(start, clients.events, flipper.outcomes, marks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--outage-s", type=float, default=30)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"outage: {args.outage_s:.0f} s of Redis down under 8 streaming clients …", flush=True)
        (Path(tmp) / "outage").mkdir()
        first = outage(args.kit, args.engine, args.outage_s, Path(tmp) / "outage")
        print(f"  {first['streams_ok']} streams served, {first['streams_failed']} failed; admin writes accepted "
              f"{first['writable_after_restart_s']} s after Redis came back", flush=True)
        print(f"failover: {args.kills} primary kills under Sentinel while an operator flips an alias …", flush=True)
        (Path(tmp) / "failover").mkdir()
        second = failover(args.kit, args.engine, args.kills, Path(tmp) / "failover")
        print(f"  {second['acknowledged_moves']} acknowledged moves, {second['lost']} lost; admin answers "
              f"{second['admin_statuses']}; promotion p50 {second['promotion_s']['p50']} s; admin writes back p50 "
              f"{second['writes_back_after_kill_s']['p50']} s, max {second['writes_back_after_kill_s']['max']} s; "
              f"{second['streams_ok']} streams, {second['streams_failed']} failed")
    out = REPO / "loadtests" / "results" / f"registry_faults_{args.engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine": args.engine, "outage": first, "failover": second,
                               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
