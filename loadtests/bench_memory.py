"""Knowledge edits, measured as users meet them: the kit's edits applied through the admin API, answers read
greedily through `/v1` on a vLLM gateway.

    .venv/bin/python loadtests/bench_memory.py [--edits all] [--requests 96] [--concurrency 8]

1. Edits in sequence, as jobs: 1, then 9 (T = 10), then batches of 10 up to T = 100, then the rest of the
   kit's edits. At T = 1, 10, 20, … 100 and at the last: Rel (each edit prompt answered with its target),
   Gen (its paraphrases), Loc (its locality prompts answered as before the first edit; split into those that ask a
   fact and the kit's task prompts, which the bare base answers without knowing the task), over every edit
   applied so far; the probe perplexity ratio and job time from the job; each kit alias's evaluation score
   with the memory against without it.
2. Decode throughput with the memory (every edit) and without it (version 0), the same streaming load on
   `tiny` (`--requests` of 48 tokens, `ignore_eos`, `--concurrency` at once), in alternating segments.
3. Rollback to version 0: the call's latency, the answers compared with those from before the edits, and
   the time until a second replica (transformers) serves it.
Writes loadtests/results/memory.json and memory.png (Rel/Gen/Loc against T) and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters_store.redis_server import EmbeddedRedis  # noqa: E402
from service.evaluation.scoring import exact_match, normalize  # noqa: E402
from tests.gateway_server import GatewayProcess  # noqa: E402
from tests.prometheus_server import free_port  # noqa: E402

MEMORY = "facts"
CHECKPOINTS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def answers(client: httpx.AsyncClient, model: str, prompts: list[str], concurrency: int = 8) -> list[str]:
    """Greedy answers (up to the first newline) through /v1, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> str:
        async with gate:
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12,
                                                           "temperature": 0, "stop": ["\n"]})
            r.raise_for_status()
            return r.json()["choices"][0]["text"]

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def rel_gen_loc(edits: list[dict], got: dict[str, str], before: dict[str, str], task_prompts: set[str]) -> dict:
    """Rel, Gen and Loc over `edits`; Loc also split into locality prompts that ask a fact and the kit's task
    prompts (answered by the bare base, which never learnt the task: its answer is a sentence of the world)."""
    rel = [exact_match(got[e["prompt"]], e["target"]) for e in edits]
    gen = [exact_match(got[p], e["target"]) for e in edits for p in e["paraphrases"]]
    kept = [(float(normalize(got[p]) == normalize(before[p])), p in task_prompts) for e in edits for p in e["locality"]]
    loc = [k for k, _ in kept]
    facts, tasks = [k for k, t in kept if not t], [k for k, t in kept if t]

    def share(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    return {"T": len(edits), "rel": share(rel), "gen": share(gen), "loc": share(loc), "loc_facts": share(facts),
            "loc_task_prompts": share(tasks)}


async def task_scores(client: httpx.AsyncClient, kit: Path, manifest: dict) -> dict:
    out = {}
    for alias in manifest["patches"]:
        rows = jsonl(kit / manifest["eval_sets"][alias])
        got = await answers(client, alias, [r["prompt"] for r in rows])
        out[alias] = {"score": round(sum(exact_match(g, r["reference"]) for g, r in zip(got, rows)) / len(rows), 4),
                      "answers": got}
    return out


async def decode_rate(url: str, requests: int, concurrency: int) -> float:
    """Generated tokens per second over `requests` streams of 48 tokens."""
    gate = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        async with gate:
            async with client.stream("POST", "/v1/completions", json={
                    "model": "tiny", "prompt": f"Varnok {i} lives in", "max_tokens": 48, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"text"' in line:
                        tokens += 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        return tokens / (time.perf_counter() - started)


async def measure(a: GatewayProcess, b: GatewayProcess, key: str, kit: Path, manifest: dict, limit: int | None,
                  requests: int, concurrency: int) -> dict:
    edits = jsonl(kit / manifest["edit_set"])[:limit]
    prompts = list(dict.fromkeys(p for e in edits for p in (e["prompt"], *e["paraphrases"], *e["locality"])))
    admin = httpx.AsyncClient(base_url=a.url, headers={"authorization": f"Bearer {key}"}, timeout=600)
    client = httpx.AsyncClient(base_url=a.url, timeout=300)
    print(f"answers before any edit ({len(prompts)} prompts) and task scores", flush=True)
    before = dict(zip(prompts, await answers(client, "tiny", prompts)))
    tasks_before = await task_scores(client, kit, manifest)
    task_prompts = {r["prompt"] for alias in manifest["patches"] for r in jsonl(kit / manifest["eval_sets"][alias])}
    sizes = [1, 9] + [10] * 9
    sizes.append(len(edits) - sum(sizes))
    rows, applied = [], []
    for size in [s for s in sizes if s > 0]:
        batch = edits[len(applied): len(applied) + size]
        if not batch:  # fewer edits asked for (--edits) than the schedule holds
            break
        started = time.perf_counter()
        r = await admin.post(f"/admin/memories/{MEMORY}/edits", json={"edits": batch, "reason": "benchmark"})
        r.raise_for_status()
        job = await asyncio.to_thread(a.wait_job, r.headers["location"], 1800)
        seconds = time.perf_counter() - started
        result = job.get("result") or {}
        if job["state"] != "succeeded" or not result.get("activated"):
            print(f"  batch refused or failed at T={len(applied) + size}: {job.get('error') or result.get('gate')}")
            # measure what is served anyway: force it, so the table shows the figures the gate refused
            await admin.post(f"/admin/memories/{MEMORY}/activate", json={
                "version": result["version"], "force": True, "reason": "benchmark: measure a refused version"})
        applied += batch
        t = len(applied)
        if t not in CHECKPOINTS and t != len(edits):
            continue
        await asyncio.sleep(0.2)
        asked = list(dict.fromkeys(p for e in applied for p in (e["prompt"], *e["paraphrases"], *e["locality"])))
        got = dict(zip(asked, await answers(client, "tiny", asked)))
        row = rel_gen_loc(applied, got, before, task_prompts) | {
            "version": result.get("version"), "job_s": round(seconds, 1), "gate": result.get("gate", {}).get("passed"),
            "perplexity_ratio": result.get("perplexity_ratio"), "job_report": result.get("report", {}).get("all"),
            "job_tasks": result.get("report", {}).get("tasks")}
        scores = await task_scores(client, kit, manifest)
        # The kit's edit prompts begin with the edited person's name: a task prompt naming one may rightly change.
        names = {e["prompt"].split()[0] for e in applied}
        row["tasks"] = {}
        for alias, s in scores.items():
            asked_of = [r["prompt"] for r in jsonl(kit / manifest["eval_sets"][alias])]
            same = [(x == y, bool(names & set(re.findall(r"\w+", p))))
                    for x, y, p in zip(s["answers"], tasks_before[alias]["answers"], asked_of)]
            unrelated = [x for x, named in same if not named]
            row["tasks"][alias] = {
                "score": s["score"], "before": tasks_before[alias]["score"],
                "agreement": round(sum(x for x, _ in same) / len(same), 4),
                # the prompts that name no edited person: what a memory must leave alone
                "unrelated": round(sum(unrelated) / len(unrelated), 4) if unrelated else None,
                "unrelated_prompts": len(unrelated)}
        rows.append(row)
        print(f"  T={t:>3}  Rel {row['rel']:.2f}  Gen {row['gen']:.2f}  Loc {row['loc']:.2f} "
              f"(facts {row['loc_facts']}, task prompts {row['loc_task_prompts']})  "
              f"ppl ratio {row['perplexity_ratio']}  job {row['job_s']} s  "
              f"tasks (all / naming no edited person) "
              f"{json.dumps({k: [v['agreement'], v['unrelated']] for k, v in row['tasks'].items()})}", flush=True)

    print("decode throughput, memory on and off (alternating)", flush=True)
    last = (await admin.get(f"/admin/memories/{MEMORY}")).json()["version"]
    rates = {"with": [], "without": []}
    await decode_rate(a.url, 16, concurrency)  # warm-up
    for _ in range(3):
        for state, version in (("with", last), ("without", 0)):
            if (await admin.get(f"/admin/memories/{MEMORY}")).json()["version"] == version:
                rates[state].append(await decode_rate(a.url, requests, concurrency))
                continue
            # a version its gate refused is measured all the same (forced, with a reason)
            (await admin.post(f"/admin/memories/{MEMORY}/activate", json={
                "version": version, "force": True, "reason": "benchmark: throughput"})).raise_for_status()
            rates[state].append(await decode_rate(a.url, requests, concurrency))
            print(f"  {state:<7} {rates[state][-1]:.0f} tokens/s", flush=True)
    throughput = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    throughput["ratio"] = round(throughput["with"] / throughput["without"], 3)

    print("rollback to before the edits", flush=True)
    (await admin.post(f"/admin/memories/{MEMORY}/activate", json={
        "version": last, "force": True, "reason": "benchmark: rollback"})).raise_for_status()
    await asyncio.sleep(2)
    started = time.perf_counter()
    (await admin.post(f"/admin/memories/{MEMORY}/rollback", json={"version": 0, "reason": "benchmark"})
     ).raise_for_status()
    call_ms = (time.perf_counter() - started) * 1000
    async with httpx.AsyncClient(base_url=b.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as bc:
        while (await bc.get("/admin/replica")).json()["memories"].get(MEMORY) is not None:
            await asyncio.sleep(0.01)
    replica_b_ms = (time.perf_counter() - started) * 1000
    after = dict(zip(prompts, await answers(client, "tiny", prompts)))
    rollback = {"call_ms": round(call_ms, 1), "second_replica_ms": round(replica_b_ms, 1),
                "answers_as_before": sum(after[p] == before[p] for p in prompts), "prompts": len(prompts)}
    await admin.aclose(), await client.aclose()
    return {"edits": rows, "throughput": throughput, "rollback": rollback}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    t = [r["T"] for r in rows]
    for key, label in (("rel", "Rel (edit prompt)"), ("gen", "Gen (paraphrases)"), ("loc", "Loc (unrelated)")):
        ax.plot(t, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("edits applied (T)")
    ax.set_ylabel("share answered as required, greedy via /v1")
    ax.set_ylim(0, 1.05)
    ax.set_title("patchserve side memory (WISE) on the kit, vLLM engine")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    parser.add_argument("--edits", default="all", help="how many of the kit's edits (default: all)")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    manifest = json.loads((args.kit / "manifest.json").read_text())
    limit = None if args.edits == "all" else int(args.edits)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = EmbeddedRedis(root / "redis", free_port()).start()
        shared = {"PATCHSERVE_REDIS_URL": redis.url, "PATCHSERVE_BLOB_DIR": str(root / "blobs")}
        a = b = None
        try:
            (root / "a").mkdir(), (root / "b").mkdir()
            a = GatewayProcess(args.kit, "vllm", root / "a", PATCHSERVE_DATA_DIR=str(root / "a" / "data"),
                               **shared).start()
            # B serves and measures the rollback; it runs no worker, so every job is A's (vLLM's host).
            b = GatewayProcess(args.kit, "transformers", root / "b", PATCHSERVE_DATA_DIR=str(root / "b" / "data"),
                               PATCHSERVE_WORKER_IN_PROCESS="false", **shared).start()
            results = asyncio.run(measure(a, b, a.admin_key, args.kit, manifest, limit, args.requests,
                                          args.concurrency))
        finally:
            for gw in (a, b):
                if gw is not None:
                    gw.stop()
            redis.stop()
    results = {"engine": "vllm", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "kit": manifest["kit_hash"], **results}
    out = REPO / "loadtests" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results["edits"], out / "memory.png")
    print(json.dumps({k: v for k, v in results.items() if k != "edits"}, indent=2))
    print(f"wrote {out / 'memory.json'} and {out / 'memory.png'}")


if __name__ == "__main__":
    main()
