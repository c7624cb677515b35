"""Serving three aliases from one merged version against three separate versions: decode throughput and
resident adapters, on the gateway.

    .venv/bin/python loadtests/bench_merge_serving.py [--engine vllm|transformers] [--requests 192]
        [--concurrency 12] [--max-tokens 48] [--rounds 2]

Starts `patchserve serve` (the tests' gateway process) on a fresh data dir, where the kit's aliases
sentiment, reverse and qa each serve their own patch. A merge job (`POST /admin/merges`, `--method`,
default distill, rank 16) folds the three into one version, and each alias is asked to move to it
through its own gate (its evaluation set, against the version it serves): the verdicts are recorded.
Then, `--rounds` times: the three aliases on their own versions, then all three on the merge (these
back-and-forth moves are forced: serving figures only), each time under the same load: streaming
completions round-robin over the three aliases with the kit's prompts (ignore_eos), and base-only before
and after (the machine's drift). Alternating the two states spreads that drift over both. For each
state: output tokens/s, inter-token latency p50/p99, TTFT p50, and what the replica holds
(/admin/replica): the adapters resident, the adapters the requests used, and their weight bytes. Last,
the three source versions are deleted (no longer anyone's rollback target) and the resident adapters are
read once more.

Writes loadtests/results/merge_serving.json and merge_serving.png; prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtests" / "results"
sys.path.insert(0, str(REPO))

from loadtests.bench_adapters import (  # noqa: E402
    BASE_MODEL,
    Gateway,
    check_kit,
    http_client,
    jobs_for,
    log,
    ms,
    one_http,
    prompts,
    run_load,
)

ALIASES = ["sentiment", "reverse", "qa"]
MERGED = "served-merge"


def weight_bytes(kit: Path, admin: httpx.Client, ref: str) -> int:
    """Bytes of a version's adapter weights: the kit's file for a kit patch, the validation summary otherwise."""
    name, _, version = ref.rpartition("@")
    # The kit's own patches (recall's too: resident, not in the mix) have no summary in their record; may be deleted.
    if version == "1" and (kit / "patches" / name / "adapter_model.safetensors").is_file():
        return (kit / "patches" / name / "adapter_model.safetensors").stat().st_size
    return int(admin.get(f"/admin/patches/{name}/versions/{version}").json()["meta"]["weights_bytes"])


def holding(kit: Path, admin: httpx.Client) -> dict:
    """What the replica holds now: the adapters resident and their weight bytes; the adapters the aliases use."""
    replica = admin.get("/admin/replica").json()
    resident = sorted(replica["adapters"])
    serving = sorted(set(replica["aliases"][a] for a in ALIASES))
    return {"resident": resident, "resident_bytes": sum(weight_bytes(kit, admin, r) for r in resident),
            "serving": serving, "serving_bytes": sum(weight_bytes(kit, admin, r) for r in serving)}


def settle(kit: Path, admin: httpx.Client, wanted: set[str], timeout: float = 60) -> dict:
    """Wait until the aliases point where wanted; then what the replica holds."""
    deadline = time.monotonic() + timeout
    while True:
        held = holding(kit, admin)
        if set(held["serving"]) == wanted or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def merge_job(gw: Gateway, body: dict) -> tuple[dict, float]:
    """Run a merge job of the three aliases' versions through the API: its result and its time (queued to done)."""
    with gw.admin() as admin:
        r = admin.post("/admin/merges", json={"sources": [f"{a}@1" for a in ALIASES], "reason": "bench", **body})
    if r.status_code != 202:
        raise RuntimeError(f"merge refused: {r.status_code} {r.text[:300]}")
    job = gw.wait_job(r.headers["location"], timeout=900)
    if job["state"] != "succeeded":
        raise RuntimeError(f"merge job failed: {job['error']}")
    return job["result"], job["updated_at"] - job["created_at"]


def gated_move(gw: Gateway, alias: str, patch: str, version: int) -> dict:
    """Ask to move `alias` to the merge through its own gate (the alias's evaluation set, against the version
    it serves): the verdict, with the figures the gate read."""
    with gw.admin() as admin:
        r = admin.post(f"/admin/aliases/{alias}/activate", json={"patch": patch, "version": version,
                                                                 "reason": "bench_merge_serving: gated move"})
    if r.status_code == 200:
        return {"alias": alias, "moved": True, "gated": False}
    if r.status_code != 202:
        raise RuntimeError(f"activate {alias} → {patch}@{version}: {r.status_code} {r.text[:300]}")
    job = gw.wait_job(r.headers["location"], timeout=900)
    result = job.get("result") or {}
    report = result.get("report") or {}
    return {"alias": alias, "moved": bool(result.get("activated")), "gated": True, "state": job["state"],
            **{k: report.get(k) for k in ("score_old", "score_new", "nfr", "pfr", "perplexity_ratio")},
            "gate": result.get("gate"), "error": job.get("error")}


def move(admin: httpx.Client, alias: str, patch: str, version: int) -> None:
    now = admin.get(f"/admin/aliases/{alias}").json()
    if (now["patch"], now["version"]) == (patch, version):
        return
    r = admin.post(f"/admin/aliases/{alias}/activate", json={
        "patch": patch, "version": version, "force": True, "reason": "bench_merge_serving: serving figures only"})
    if r.status_code != 200:
        raise RuntimeError(f"activate {alias} → {patch}@{version}: {r.status_code} {r.text[:300]}")


async def load(gw: Gateway, models: list[str], texts: list[str], args, offset: int) -> dict:
    async with http_client(args) as client:
        jobs = jobs_for(models, texts, args.requests, args.max_tokens, offset=offset)
        warmup = jobs_for(models, texts, args.concurrency, 4, offset=offset + 50_000)
        return await run_load(lambda body: one_http(client, gw.url, body), jobs, args.concurrency, warmup)


def measure(gw: Gateway, kit: Path, texts: list[str], args, state: str, offset: int) -> dict:
    base = asyncio.run(load(gw, [BASE_MODEL], texts, args, offset))
    with gw.admin() as admin:
        held = holding(kit, admin)
    mix = asyncio.run(load(gw, ALIASES, texts, args, offset + 10_000))
    base_end = asyncio.run(load(gw, [BASE_MODEL], texts, args, offset + 20_000))
    base_tok_s = (base["throughput_tok_s"] + base_end["throughput_tok_s"]) / 2
    log(f"  {state}: {mix['throughput_tok_s']:.1f} tok/s ({mix['throughput_tok_s'] / base_tok_s:.2f} of base-only), "
        f"ITL p50 {ms(mix['itl_p50_s'])} ms, failures {mix['failures']}; resident {held['resident']}")
    return {"state": state, "mix": mix, "base_tok_s": round(base_tok_s, 2),
            "ratio_to_base": round(mix["throughput_tok_s"] / base_tok_s, 3), **held}


def summary(rows: list[dict], state: str) -> dict:
    mine = [r for r in rows if r["state"] == state]
    mean = lambda key: round(statistics.fmean(key(r) for r in mine), 4)  # noqa: E731
    return {"rounds": len(mine), "throughput_tok_s": mean(lambda r: r["mix"]["throughput_tok_s"]),
            "ratio_to_base": mean(lambda r: r["ratio_to_base"]),
            "itl_p50_ms": mean(lambda r: r["mix"]["itl_p50_s"] * 1000),
            "itl_p99_ms": mean(lambda r: r["mix"]["itl_p99_s"] * 1000),
            "ttft_p50_ms": mean(lambda r: r["mix"]["ttft_p50_s"] * 1000),
            "failures": sum(r["mix"]["failures"] for r in mine),
            # Held in the first round: later, each state's rollback targets include the other state's versions.
            "resident": mine[0]["resident"], "resident_bytes": mine[0]["resident_bytes"],
            "serving": mine[0]["serving"], "serving_bytes": mine[0]["serving_bytes"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = ["separate", "merged", "merged, sources deleted"]
    s = results["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bars = [s["separate"]["throughput_tok_s"], s["merged"]["throughput_tok_s"]]
    left.bar(states[:2], bars, color=["tab:blue", "tab:orange"])
    for r in results["rounds"]:
        left.plot(0 if r["state"] == "separate" else 1, r["mix"]["throughput_tok_s"], "k.", ms=6)
    left.set_ylabel("decode throughput, output tok/s (mean; dots: rounds)")
    left.set_title(f"3 aliases round-robin, {results['settings']['engine']} engine")
    held = [s["separate"], s["merged"], results["retired"]]
    right.bar([x - 0.2 for x in range(3)], [h["resident_bytes"] / 1024 for h in held], 0.4, label="resident")
    right.bar([x + 0.2 for x in range(3)], [h["serving_bytes"] / 1024 for h in held], 0.4,
              label="used by the aliases")
    for x, h in enumerate(held):
        right.text(x - 0.2, h["resident_bytes"] / 1024, str(len(h["resident"])), ha="center", va="bottom")
        right.text(x + 0.2, h["serving_bytes"] / 1024, str(len(h["serving"])), ha="center", va="bottom")
    right.set_xticks(range(3), states, fontsize=8)
    right.set_ylabel("adapter weights, KiB (number of adapters on top)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=Path(os.environ.get("PATCHSERVE_KIT_DIR",
                                                                        REPO / ".patchserve" / "kit")))
    parser.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="separate → merged alternations")
    parser.add_argument("--method", default="distill")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    kit = args.kit.resolve()
    check_kit(kit)
    RESULTS.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    texts = prompts(kit)
    gw = Gateway(kit, args.engine, RESULTS, {})
    rows: list[dict] = []
    try:
        log(f"starting the gateway ({args.engine} engine)")
        gw.start()
        merge, merge_s = merge_job(gw, {"method": args.method, "rank": args.rank, "name": MERGED})
        log(f"merged {merge['ref']} in {merge_s:.1f} s (min retention {merge['min_retention']:.2f})")
        tall, tall_s = merge_job(gw, {"method": "ties", "rank": args.rank, "name": "tall-merge", "tall": True})
        log(f"TIES merge with TALL storage in {tall_s:.1f} s: one adapter keeps at least {tall['min_retention']:.2f}, "
            f"the rebuilt sources {tall['tall']['min_retention']:.2f}")
        gates = [gated_move(gw, alias, MERGED, merge["version"]) for alias in ALIASES]
        log("each alias's own gate on the merge: " + ", ".join(
            f"{g['alias']} {'moved' if g['moved'] else 'refused'} (NFR {g.get('nfr')})" for g in gates))
        for k in range(args.rounds):
            with gw.admin() as admin:
                for alias in ALIASES:
                    move(admin, alias, alias, 1)
                settle(kit, admin, {f"{a}@1" for a in ALIASES})
            rows.append(measure(gw, kit, texts, args, "separate", offset=k * 100_000))
            with gw.admin() as admin:
                for alias in ALIASES:
                    move(admin, alias, MERGED, merge["version"])
                settle(kit, admin, {merge["ref"]})
            rows.append(measure(gw, kit, texts, args, "merged", offset=k * 100_000 + 50_000))
        with gw.admin() as admin:
            for alias in ALIASES:
                r = admin.delete(f"/admin/patches/{alias}/versions/1", params={"reason": "retired"})
                if r.status_code != 200:
                    raise RuntimeError(f"delete {alias}@1: {r.status_code} {r.text[:300]}")
            deadline = time.monotonic() + 30
            while len((retired := holding(kit, admin))["resident"]) > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        gw.stop()
    results = {"merge": {**{k: merge[k] for k in ("ref", "method", "rank", "energy_kept", "min_retention",
                                                   "seconds")}, "job_s": round(merge_s, 1)},
               "tall_merge": {"job_s": round(tall_s, 1), "seconds": tall["seconds"],
                              "min_retention": tall["min_retention"], "tall": tall["tall"],
                              "retention": tall["retention"]},
               "gates": gates, "rounds": rows, "summary": {s: summary(rows, s) for s in ("separate", "merged")},
               "retired": retired,
               "settings": {"engine": args.engine, "requests": args.requests, "concurrency": args.concurrency,
                            "max_tokens": args.max_tokens, "rounds": args.rounds, "cpu_count": os.cpu_count(),
                            "kit": str(kit), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    sep, mer = results["summary"]["separate"], results["summary"]["merged"]
    results["throughput_ratio"] = round(mer["throughput_tok_s"] / sep["throughput_tok_s"], 3)
    results["resident_bytes_ratio"] = round(retired["resident_bytes"] / sep["resident_bytes"], 3)
    out = RESULTS / "merge_serving.json"
    out.write_text(json.dumps(results, indent=1))
    for state, s in (("separate", sep), ("merged", mer)):
        print(f"{state:9s} {s['throughput_tok_s']:7.1f} tok/s ({s['ratio_to_base']:.2f} of base-only)  ITL p50 "
              f"{s['itl_p50_ms']:.1f} ms p99 {s['itl_p99_ms']:.1f} ms  TTFT p50 {s['ttft_p50_ms']:.0f} ms  "
              f"failures {s['failures']}  resident {len(s['resident'])} ({s['resident_bytes'] / 1024:.0f} KiB)  "
              f"used {len(s['serving'])} ({s['serving_bytes'] / 1024:.0f} KiB)")
    print(f"merge jobs of the three kit patches: {args.method} {merge_s:.1f} s (merging {merge['seconds']['merge']} s, "
          f"retention {merge['seconds']['retention']} s); TIES with TALL storage {tall_s:.1f} s "
          f"(rebuilt sources keep at least {tall['tall']['min_retention']:.0%}, "
          f"one adapter {tall['min_retention']:.0%})")
    for g in gates:
        print(f"gate on the merge for {g['alias']}: {'moved' if g['moved'] else 'refused'}; score "
              f"{g.get('score_old')} → {g.get('score_new')}, NFR {g.get('nfr')}, perplexity ratio "
              f"{g.get('perplexity_ratio')}" + (f"; {'; '.join(g['gate']['reasons'])}" if g.get("gate") and
                                                g["gate"].get("reasons") else ""))
    print(f"sources deleted: resident {retired['resident']} ({retired['resident_bytes'] / 1024:.0f} KiB)")
    print(f"merged / separate: throughput {results['throughput_ratio']:.2f}, resident adapter bytes once the "
          f"sources are retired {results['resident_bytes_ratio']:.2f}")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
