"""Gateway vs vLLM's own OpenAI server, same kit model and patches, same concurrent streaming load.

    .venv/bin/python loadtests/bench_gateway_vs_vllm.py [--requests 512] [--concurrency 16]

Starts `vllm serve` on the kit's base-v1 with the three patches, measures it, stops it; then the
same for `patchserve serve` (vLLM engine). Writes loadtests/results/gateway_vs_vllm.json and prints
throughput, TTFT, inter-token and end-to-end latency (p50/p99) of both and their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtests" / "results" / "gateway_vs_vllm.json"
MODELS = ["tiny", "sentiment", "reverse", "qa"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{cmd} did not come up: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def workload(kit: Path, requests: int) -> list[dict]:
    """Requests over the base and the three patches; sampled with fixed seeds so both servers make the same tokens."""
    prompts = {m: [json.loads(line)["prompt"] for line in (kit / "eval" / f"{m if m != 'tiny' else 'qa'}.jsonl")
                   .read_text().splitlines()] for m in MODELS}
    jobs = []
    for i in range(requests):
        model = MODELS[i % len(MODELS)]
        jobs.append({"model": model, "prompt": prompts[model][i % len(prompts[model])], "max_tokens": 48,
                     "temperature": 1.0, "seed": i, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True}})
    return jobs


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    started = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": stamps[0] - started if stamps else end - started,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "e2e": end - started, "tokens": tokens}


async def load(url: str, jobs: list[dict], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        async def guarded(body):
            async with sem:
                return await one(client, url, body)

        await asyncio.gather(*(guarded(b) for b in jobs[:concurrency]))  # warm-up: adapters, caches
        started = time.perf_counter()
        results = await asyncio.gather(*(guarded(b) for b in jobs))
        wall = time.perf_counter() - started
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)

    def pct(values, q):
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]

    return {
        "requests": len(results), "wall_s": round(wall, 3), "completion_tokens": tokens,
        "throughput_tok_s": round(tokens / wall, 2), "throughput_req_s": round(len(results) / wall, 3),
        "ttft_p50_s": pct([r["ttft"] for r in results], 50), "ttft_p99_s": pct([r["ttft"] for r in results], 99),
        "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "e2e_p50_s": pct([r["e2e"] for r in results], 50), "e2e_p99_s": pct([r["e2e"] for r in results], 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    kit = args.kit.resolve()
    jobs = workload(kit, args.requests)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    logs = RESULTS.parent
    logs.mkdir(parents=True, exist_ok=True)
    results = {}

    port = free_port()
    # `vllm serve` itself looks up a distribution named "vllm" (ours is vllm-cpu) and stops; its server
    # module runs the same OpenAI server.
    vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(kit / "base-v1"),
                "--port", str(port),
                "--host", "127.0.0.1", "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
                "--max-model-len", "256", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "8", "--seed", "0",
                "--lora-modules", *(f"{p}={kit / 'patches' / p}" for p in MODELS[1:])]
    print("vllm serve: starting", flush=True)
    proc = start(vllm_cmd, env, f"http://127.0.0.1:{port}", logs / "vllm-serve.log")
    try:
        results["vllm_serve"] = asyncio.run(load(f"http://127.0.0.1:{port}", jobs, args.concurrency))
    finally:
        stop(proc)

    port = free_port()
    gw_env = {**env, "PATCHSERVE_KIT_DIR": str(kit), "PATCHSERVE_ENGINE": "vllm", "PATCHSERVE_PORT": str(port)}
    print("patchserve: starting", flush=True)
    proc = start([sys.executable, "-m", "service.cli", "serve"], gw_env, f"http://127.0.0.1:{port}",
                 logs / "patchserve.log")
    try:
        results["patchserve"] = asyncio.run(load(f"http://127.0.0.1:{port}", jobs, args.concurrency))
    finally:
        stop(proc)

    ours, theirs = results["patchserve"], results["vllm_serve"]
    results["ratios"] = {
        "throughput_tok_s": round(ours["throughput_tok_s"] / theirs["throughput_tok_s"], 3),
        "ttft_p50": round(ours["ttft_p50_s"] / theirs["ttft_p50_s"], 3),
        "itl_p50": round(ours["itl_p50_s"] / theirs["itl_p50_s"], 3),
        "e2e_p50": round(ours["e2e_p50_s"] / theirs["e2e_p50_s"], 3),
        "e2e_p99": round(ours["e2e_p99_s"] / theirs["e2e_p99_s"], 3),
    }
    results["settings"] = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": 48,
                           "models": MODELS, "kit": str(kit),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.write_text(json.dumps(results, indent=2))
    for name in ("vllm_serve", "patchserve"):
        r = results[name]
        print(f"{name:11s} {r['throughput_tok_s']:8.1f} tok/s {r['throughput_req_s']:6.2f} req/s  "
              f"TTFT p50 {r['ttft_p50_s'] * 1000:7.1f} ms p99 {r['ttft_p99_s'] * 1000:7.1f} ms  "
              f"ITL p50 {r['itl_p50_s'] * 1000:6.1f} ms  e2e p50 {r['e2e_p50_s']:.3f} s p99 {r['e2e_p99_s']:.3f} s")
    print("ratios patchserve/vllm:", json.dumps(results["ratios"]))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
