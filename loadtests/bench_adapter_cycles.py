"""Adapter load/unload cycles: is the memory really given back?

    .venv/bin/python loadtests/bench_adapter_cycles.py [--engine vllm|transformers] [--cycles 200]

Each cycle loads a kit patch under a new engine name (`patch@N`, as every new version is), serves one
request with it, and unloads it. The resident memory of the process and its children (vLLM's engine
core runs in a child) is sampled along the way; writes loadtests/results/adapter_cycles_<engine>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import psutil

from service.engines import create_engine
from service.engines.protocol import AdapterRef, GenerationRequest, SamplingConfig
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


async def cycles(engine_kind: str, kit: Path, count: int) -> dict:
    settings = Settings(engine=engine_kind)
    engine = create_engine(settings, str(kit / "base-v1"))
    await engine.start()
    patches = ["sentiment", "reverse", "qa"]
    prompt = engine.tokenizer("Review: good great kind\nSentiment:")["input_ids"]
    samples = []
    try:
        for i in range(count + 20):  # the first 20 warm up allocator pools and caches, then we measure
            adapter = AdapterRef(f"{patches[i % 3]}@{i + 1}", str(kit / "patches" / patches[i % 3]))
            started = time.perf_counter()
            await engine.add_adapter(adapter)
            request = GenerationRequest(f"cycle-{i}", prompt, SamplingConfig(max_tokens=2, temperature=0.0), adapter)
            async for _ in engine.generate(request):
                pass
            await engine.remove_adapter(adapter.name)
            if i >= 20 and (i - 20) % 20 == 0 or i == count + 19:
                samples.append({"cycle": i - 19, "rss_mib": round(rss_mib(), 1),
                                "last_cycle_s": round(time.perf_counter() - started, 4),
                                "resident": len(engine.adapters())})
                print(f"cycle {i - 19:4d}: rss {samples[-1]['rss_mib']:8.1f} MiB, adapters resident "
                      f"{samples[-1]['resident']}", flush=True)
    finally:
        await engine.stop()
    first, last = samples[0]["rss_mib"], samples[-1]["rss_mib"]
    return {"engine": engine_kind, "cycles": count, "samples": samples, "rss_first_mib": first,
            "rss_last_mib": last, "rss_growth_mib": round(last - first, 1),
            "rss_growth_per_100_cycles_mib": round((last - first) / count * 100, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    result = asyncio.run(cycles(args.engine, args.kit.resolve(), args.cycles))
    out = REPO / "loadtests" / "results" / f"adapter_cycles_{args.engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.engine}: {args.cycles} load/unload cycles, rss {result['rss_first_mib']} → "
          f"{result['rss_last_mib']} MiB ({result['rss_growth_mib']:+} MiB); wrote {out}")


if __name__ == "__main__":
    main()
