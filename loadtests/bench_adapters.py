"""Many-adapter scaling: throughput and latency with 1, 8, 32, 64 distinct patches in the mix vs base-only.

    .venv/bin/python loadtests/bench_adapters.py [--engine vllm|transformers|both] [--requests 256]
        [--concurrency 16] [--max-tokens 48] [--max-loras 8,32] [--direct] [--vllm-serve] [--merge]

For each engine (and each PATCHSERVE_MAX_LORAS given): starts `patchserve serve` on a fresh data dir
and free ports, uploads 64 synthetic patches on base-v1 (the kit's three patches with lora_B scaled
and perturbed by a seeded amount, so every one is a different adapter the engine loads on its own)
and activates each on its own alias. Then, streaming completions with ignore_eos, measures base-only
and mixes of N distinct aliases (round-robin), then base-only again: output tokens/s, TTFT and
inter-token latency p50/p99, failures, and each mix's ratio to base-only in the same run (the mean
of the two base-only measurements: on a shared machine the load drifts). Then the cost of a cold
adapter: TTFT of the first request to a freshly uploaded version requested pinned (`cold-k@1`, not
resident) vs a warm alias, idle and under load. `--direct` adds the same mixes on vLLM's own AsyncLLM in this
process, and `--vllm-serve` on vLLM's own OpenAI server (same HTTP client), with the same adapter
files and no gateway, to tell vLLM's limits from ours.

Writes loadtests/results/adapters.json (and adapters.png if matplotlib is importable); prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtests" / "results"
sys.path.insert(0, str(REPO))

from tests.gateway_server import GatewayProcess  # noqa: E402
from tests.prometheus_server import free_port  # noqa: E402

KIT_PATCHES = ["sentiment", "reverse", "qa"]
BASE_MODEL = "tiny"
MIXES = [1, 8, 32, 64]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- synthetic patches ----------------------------------------------------------------------------
def check_kit(kit: Path) -> None:
    """Stop at once if the gateway would rebuild the kit (its hash is not the code's): that takes minutes of CPU."""
    from service.kit.config import KitConfig, cached

    seed = int(os.environ.get("PATCHSERVE_KIT_SEED", "1234"))
    if cached(kit, KitConfig(seed=seed)) is None:
        digest = KitConfig(seed=seed).digest()
        raise SystemExit(f"the kit at {kit} is missing or stale for this code (kit hash {digest}):"
                         f" build it first (.venv/bin/python -m service.cli kit build), then run this again")


def make_patches(kit: Path, out: Path, names: list[str], seed: int) -> dict[str, Path]:
    """One adapter directory per name: a kit patch (round-robin) with lora_B scaled by a seeded factor and
    perturbed by seeded noise, so no two share weights."""
    import torch
    from safetensors.torch import load_file, save_file

    dirs = {}
    for i, name in enumerate(names):
        source = kit / "patches" / KIT_PATCHES[i % len(KIT_PATCHES)]
        tensors = load_file(str(source / "adapter_model.safetensors"))
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        scale = 0.5 + torch.rand((), generator=g).item()  # 0.5 … 1.5
        for key, t in tensors.items():
            if "lora_B" in key:
                noise = torch.randn(t.shape, generator=g, dtype=t.dtype) * (t.std() + 1e-3) * 0.1
                tensors[key] = (t * scale + noise).contiguous()
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "adapter_config.json", d / "adapter_config.json")
        save_file(tensors, str(d / "adapter_model.safetensors"))
        dirs[name] = d
    return dirs


# -- the gateway ----------------------------------------------------------------------------------
class Gateway(GatewayProcess):
    """The tests' gateway process on a throwaway data dir, plus the uploads this benchmark makes."""

    def __init__(self, kit: Path, engine: str, logdir: Path, extra_env: dict[str, str]):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-adapters-{engine}-"))
        super().__init__(kit, engine, logdir, PATCHSERVE_DATA_DIR=str(self.tmp), VLLM_LOGGING_LEVEL="WARNING",
                         **extra_env)

    def stop(self) -> None:
        super().stop()
        # The embedded redis-server stops after the gateway and writes its log on the way out: wait for it.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", int(self.env["PATCHSERVE_REDIS_PORT"])), timeout=1).close()
            except OSError:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def upload(self, admin: httpx.Client, name: str, directory: Path, activate: bool) -> dict:
        files = {"adapter_config.json": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
                 "adapter_model.safetensors": ("adapter_model.safetensors",
                                               (directory / "adapter_model.safetensors").read_bytes())}
        r = admin.post(f"/admin/patches/{name}/versions", files=files,
                       data={"base": "base-v1", "activate": "true" if activate else "false",
                             "reason": "bench_adapters"})
        if r.status_code != 201:
            raise RuntimeError(f"upload {name}: {r.status_code} {r.text[:500]}")
        return r.json()


# -- load -----------------------------------------------------------------------------------------
def prompts(kit: Path) -> list[str]:
    out = []
    for m in KIT_PATCHES:
        out += [json.loads(line)["prompt"] for line in (kit / "eval" / f"{m}.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(out)
    return out


def jobs_for(models: list[str], texts: list[str], requests: int, max_tokens: int, offset: int = 0) -> list[dict]:
    return [{"model": models[i % len(models)], "prompt": texts[(i + offset) % len(texts)], "max_tokens": max_tokens,
             "temperature": 1.0, "seed": i + offset, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}} for i in range(requests)]


async def one_http(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    started = time.perf_counter()
    stamps, tokens = [], 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"{r.status_code} {r.text[:200]}", "model": body["model"]}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return {"error": repr(exc), "model": body["model"]}
    end = time.perf_counter()
    if tokens != body["max_tokens"]:
        return {"error": f"{tokens} tokens of {body['max_tokens']}", "model": body["model"]}
    return {"ttft": stamps[0] - started if stamps else end - started,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "e2e": end - started, "tokens": tokens}


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    errors = sorted({r["error"] for r in results if "error" in r})[:5]
    return {"requests": len(results), "failures": len(results) - len(ok), "errors": errors,
            "wall_s": round(wall, 3), "completion_tokens": tokens, "throughput_tok_s": round(tokens / wall, 2),
            "ttft_p50_s": pct([r["ttft"] for r in ok], 50), "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "e2e_p50_s": pct([r["e2e"] for r in ok], 50), "e2e_p99_s": pct([r["e2e"] for r in ok], 99)}


async def run_load(send, jobs: list[dict], concurrency: int, warmup: list[dict]) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(body):
        async with sem:
            return await send(body)

    await asyncio.gather(*(guarded(b) for b in warmup))  # every adapter of the mix used once first
    started = time.perf_counter()
    results = await asyncio.gather(*(guarded(b) for b in jobs))
    return summarize(results, time.perf_counter() - started)


async def cold_vs_warm(gw: Gateway, client: httpx.AsyncClient, warm: list[str], cold: list[str], texts: list[str],
                       concurrency: int, max_tokens: int) -> dict:
    """TTFT of the first request to a pinned, not-resident version vs a resident alias: idle, then under load."""
    send = lambda body: one_http(client, gw.url, body)  # noqa: E731
    half = len(cold) // 2
    idle_cold, idle_warm = [], []
    for k, name in enumerate(cold[:half]):
        w = await send(jobs_for([warm[k % len(warm)]], texts, 1, 8, offset=1000 + k)[0])
        c = await send(jobs_for([f"{name}@1"], texts, 1, 8, offset=2000 + k)[0])
        idle_warm.append(w)
        idle_cold.append(c)

    # Under load: the 8-alias mix at `concurrency`, and a cold request every 0.5 s on top of it.
    stop = asyncio.Event()
    background: list[dict] = []

    async def loader(i: int):
        n = 0
        while not stop.is_set():
            body = jobs_for(warm[:8], texts, 1, max_tokens, offset=10_000 + i * 1000 + n)[0]
            body["model"] = warm[(i + n) % min(8, len(warm))]
            r = await send(body)
            r["at"] = time.perf_counter()
            background.append(r)
            n += 1

    tasks = [asyncio.create_task(loader(i)) for i in range(concurrency)]
    await asyncio.sleep(3)
    loaded_cold = []
    window_start = time.perf_counter()
    for k, name in enumerate(cold[half:]):
        loaded_cold.append(await send(jobs_for([f"{name}@1"], texts, 1, 8, offset=3000 + k)[0]))
        await asyncio.sleep(0.5)
    window_end = time.perf_counter()
    stop.set()
    await asyncio.gather(*tasks)
    loaded_warm = [r for r in background if "error" not in r and window_start <= r["at"] - r["e2e"] <= window_end]

    def stats(rows):
        ok = [r["ttft"] for r in rows if "error" not in r]
        return {"n": len(rows), "failures": len(rows) - len(ok), "ttft_p50_s": pct(ok, 50), "ttft_p99_s": pct(ok, 99)}

    out = {"idle": {"cold": stats(idle_cold), "warm": stats(idle_warm)},
           "under_load": {"cold": stats(loaded_cold), "warm": stats(loaded_warm)}}
    for where in out.values():
        c, w = where["cold"]["ttft_p99_s"], where["warm"]["ttft_p99_s"]
        where["p99_ratio"] = round(c / w, 3) if c and w else None
    return out


async def run_mixes(send, aliases: list[str], texts: list[str], args, pinned: bool = False, ops=None) -> dict:
    """Base-only, each mix of N distinct patches, then base-only again (the machine's drift shows between the two)."""
    out = {}
    for n in [0, *args.mixes, 0]:
        models = [BASE_MODEL] if n == 0 else [f"{m}@1" if pinned else m for m in aliases[:n]]
        jobs = jobs_for(models, texts, args.requests, args.max_tokens)
        warmup = jobs_for(models, texts, max(len(models), args.concurrency), 4, offset=50_000)
        label = str(n) if n else ("base" if "base" not in out else "base-end")
        before = ops() if ops else None
        log(f"  mix {label}: {len(jobs)} requests over {len(models)} model(s)")
        r = await run_load(send, jobs, args.concurrency, warmup)
        if ops:
            r["adapter_ops_during"] = ops() - before  # loads + unloads by the gateway's pool
        out[label] = r
        log(f"    {r['throughput_tok_s']:.1f} tok/s, TTFT p50 {ms(r['ttft_p50_s'])} ms, failures {r['failures']}")
    return out


def http_client(args) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=args.concurrency * 4, max_keepalive_connections=args.concurrency * 4)
    return httpx.AsyncClient(timeout=600, limits=limits)


async def bench_gateway(gw: Gateway, aliases: list[str], cold: list[str], texts: list[str], args) -> dict:
    out: dict = {}
    async with http_client(args) as client:
        send = lambda body: one_http(client, gw.url, body)  # noqa: E731
        ops = lambda: gw.metric("patchserve_adapter_operation_duration_seconds_count")  # noqa: E731
        out["mixes"] = await run_mixes(send, aliases, texts, args, pinned=args.address != "alias", ops=ops)
        if cold and args.address != "inactive":  # inactive: nothing is warm
            log(f"  cold vs warm: {len(cold)} fresh versions, pinned")
            out["cold_vs_warm"] = await cold_vs_warm(gw, client, aliases, cold, texts, args.concurrency,
                                                     args.max_tokens)
    return out


async def bench_vllm_serve(kit: Path, dirs: dict[str, Path], aliases: list[str], texts: list[str], args,
                           max_loras: int) -> dict:
    """vLLM's own OpenAI server, every patch given with --lora-modules: the same HTTP load with no gateway."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(kit / "base-v1"),
           "--port", str(port), "--host", "127.0.0.1", "--served-model-name", BASE_MODEL, "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "256", "--enable-lora", "--max-lora-rank", "16",
           "--max-loras", str(max_loras), "--max-cpu-loras", str(max(max_loras, len(aliases))), "--seed", "0",
           "--disable-log-stats", "--lora-modules", *(f"{a}={dirs[a]}" for a in aliases)]
    log_path = RESULTS / "adapters-vllm-serve.log"
    proc = subprocess.Popen(cmd, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=log_path.open("w"))
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not up: {log_path.read_text()[-3000:]}")
            await asyncio.sleep(1)
        async with http_client(args) as client:
            return {"mixes": await run_mixes(lambda body: one_http(client, url, body), aliases, texts, args)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- vLLM alone (no gateway) ----------------------------------------------------------------------
async def bench_direct(kit: Path, dirs: dict[str, Path], aliases: list[str], texts: list[str], args,
                       max_loras: int) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs.engine import tokens_input
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    base = kit / "base-v1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine_args = AsyncEngineArgs(model=str(base), dtype="float32", enforce_eager=True, enable_lora=True,
                                  max_lora_rank=16, max_loras=max_loras, max_model_len=256, seed=0,
                                  disable_log_stats=True, use_tqdm_on_load=False,
                                  max_cpu_loras=args.direct_cpu_loras or None)
    llm = AsyncLLM.from_engine_args(engine_args)
    tok = AutoTokenizer.from_pretrained(str(base))
    loras = {name: LoRARequest(name, i + 1, str(dirs[name])) for i, name in enumerate(aliases)}
    counter = iter(range(10**9))

    async def send(body: dict) -> dict:
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=1.0, seed=body["seed"], ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        started = time.perf_counter()
        stamps, tokens = [], 0
        try:
            async for o in llm.generate(tokens_input(tok(body["prompt"])["input_ids"]), params,
                                        f"r{next(counter)}", lora_request=loras.get(body["model"])):
                new = len(o.outputs[0].token_ids)
                if new:
                    stamps.append(time.perf_counter())
                    tokens += new
        except Exception as exc:  # counted as a failure
            return {"error": repr(exc)[:200], "model": body["model"]}
        end = time.perf_counter()
        return {"ttft": stamps[0] - started if stamps else end - started,
                "itl": [b - a for a, b in zip(stamps, stamps[1:])], "e2e": end - started, "tokens": tokens}

    out: dict = {"mixes": {}, "max_cpu_loras": llm.vllm_config.lora_config.max_cpu_loras}
    try:
        for name in aliases:
            await llm.add_lora(loras[name])
        out["mixes"] = await run_mixes(send, aliases, texts, args)
    finally:
        llm.shutdown()
        llm = None  # noqa: F841 — `send` holds the cell: the client goes now, not in __del__ at interpreter exit
    return out


# -- report ---------------------------------------------------------------------------------------
def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def add_ratios(run: dict) -> None:
    bases = [run["mixes"][b]["throughput_tok_s"] for b in ("base", "base-end") if b in run["mixes"]]
    base = sum(bases) / len(bases)  # base-only before and after the mixes: the machine may drift between
    run["base_tok_s_mean"] = round(base, 2)
    for r in run["mixes"].values():
        r["ratio_to_base"] = round(r["throughput_tok_s"] / base, 3) if base else None


def table(results: dict) -> str:
    lines = [f"{'run':28s} {'N':>8s} {'tok/s':>8s} {'ratio':>6s} {'TTFT p50':>9s} {'p99':>8s} "
             f"{'ITL p50':>8s} {'p99':>7s} {'fail':>4s} {'loads':>5s}"]
    for label, run in results["runs"].items():
        for n, r in run["mixes"].items():
            lines.append(f"{label:28s} {n:>8s} {r['throughput_tok_s']:8.1f} {r['ratio_to_base']:6.2f} "
                         f"{ms(r['ttft_p50_s']):>9s} {ms(r['ttft_p99_s']):>8s} {ms(r['itl_p50_s']):>8s} "
                         f"{ms(r['itl_p99_s']):>7s} {r['failures']:4d} "
                         f"{r.get('adapter_ops_during', float('nan')):5.0f}")
        if cw := run.get("cold_vs_warm"):
            for where, c in cw.items():
                lines.append(f"{label:28s} cold vs warm TTFT ({where}): cold p50 {ms(c['cold']['ttft_p50_s'])} "
                             f"p99 {ms(c['cold']['ttft_p99_s'])} ms (n={c['cold']['n']}, "
                             f"fail {c['cold']['failures']}); "
                             f"warm p50 {ms(c['warm']['ttft_p50_s'])} p99 {ms(c['warm']['ttft_p99_s'])} ms "
                             f"(n={c['warm']['n']}); p99 ratio {c['p99_ratio']}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in results["runs"].items():
        ns = [int(n) for n in run["mixes"] if n.isdigit()]
        ax.plot(ns, [run["mixes"][str(n)]["ratio_to_base"] for n in ns], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.plot([8], [0.8], "k^", label="target N=8 (≥0.8)")
    ax.plot([32], [0.6], "kv", label="target N=32 (≥0.6)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct patches in the mix (N)")
    ax.set_ylabel("throughput / base-only (same run)")
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=7)
    ax.set_title(f"{results['settings']['requests']} req, {results['settings']['concurrency']} concurrent, "
                 f"{results['settings']['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    parser.add_argument("--engine", choices=["vllm", "transformers", "both", "none"], default="vllm")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--transformers-requests", type=int, default=None,
                        help="requests per mix for the transformers engine (default: --requests)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--mixes", default=",".join(map(str, MIXES)), help="distinct patches per mix")
    parser.add_argument("--cold", type=int, default=16, help="fresh versions for cold TTFT (half idle, half loaded)")
    parser.add_argument("--max-loras", default="", help="PATCHSERVE_MAX_LORAS values to run (default: settings')")
    parser.add_argument("--address", choices=["alias", "pinned", "inactive"], default="alias",
                        help="name each mix's patches by alias, or pinned name@1 (active, so kept resident), or "
                             "pinned to versions no alias points to (inactive: loaded on demand, unloaded when idle)")
    parser.add_argument("--direct", action="store_true", help="also measure vLLM's AsyncLLM alone (no gateway)")
    parser.add_argument("--vllm-serve", action="store_true",
                        help="also measure vLLM's own OpenAI server with every patch as --lora-modules (no gateway)")
    parser.add_argument("--direct-cpu-loras", type=int, default=0, help="max_cpu_loras for --direct (0: vLLM's)")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the gateway")
    parser.add_argument("--out", type=Path, default=RESULTS / "adapters.json")
    parser.add_argument("--merge", action="store_true", help="keep the runs already in --out")
    args = parser.parse_args()
    args.mixes = [int(x) for x in args.mixes.split(",") if x]
    kit = args.kit.resolve()
    RESULTS.mkdir(parents=True, exist_ok=True)
    engines = {"both": ["vllm", "transformers"], "none": []}.get(args.engine, [args.engine])
    max_loras = [int(x) for x in args.max_loras.split(",") if x] or [None]
    extra = dict(kv.split("=", 1) for kv in args.env)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    aliases = [f"syn-{i:02d}" for i in range(args.patches)]
    cold = [f"cold-{k:02d}" for k in range(args.cold)]
    if engines:
        check_kit(kit)
    texts = prompts(kit)
    workdir = Path(tempfile.mkdtemp(prefix="bench-adapters-files-"))
    results: dict = {"runs": {}}
    try:
        log(f"building {len(aliases) + len(cold)} synthetic adapters in {workdir}")
        dirs = make_patches(kit, workdir, aliases + cold, seed=18)
        for engine in engines:
            for ml in max_loras:
                env = dict(extra)
                if ml is not None:
                    env["PATCHSERVE_MAX_LORAS"] = str(ml)
                label = engine + (f" max_loras={ml}" if ml is not None else "") + \
                    ("" if args.address == "alias" else f" {args.address}") + \
                    "".join(f" {k.removeprefix('PATCHSERVE_').lower()}={v}" for k, v in extra.items())
                sub = argparse.Namespace(**vars(args))
                if engine == "transformers" and args.transformers_requests:
                    sub.requests = args.transformers_requests
                log(f"{label}: starting the gateway")
                gw = Gateway(kit, engine, RESULTS, env)
                try:
                    gw.start()
                    started = time.perf_counter()
                    with gw.admin() as admin:
                        for i, name in enumerate(aliases):
                            gw.upload(admin, name, dirs[name], activate=args.address != "inactive")
                            if (i + 1) % 16 == 0:
                                log(f"  uploaded and activated {i + 1}/{len(aliases)}")
                        for name in cold:
                            gw.upload(admin, name, dirs[name], activate=False)
                    upload_s = time.perf_counter() - started
                    log(f"  {len(aliases)} aliases + {len(cold)} cold versions in {upload_s:.1f} s")
                    run = asyncio.run(bench_gateway(gw, aliases, cold, texts, sub))
                    run["upload_and_activate_s"] = round(upload_s, 2)
                    run["requests"] = sub.requests
                    run["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # other work on the machine shows here
                finally:
                    gw.stop()
                add_ratios(run)
                results["runs"][label] = run
        if args.direct:
            for ml in max_loras:
                ml = ml or 8
                label = f"vllm-direct max_loras={ml}" + (f" cpu_loras={args.direct_cpu_loras}"
                                                         if args.direct_cpu_loras else "")
                log(f"{label}: vLLM AsyncLLM in this process, no gateway")
                run = asyncio.run(bench_direct(kit, dirs, aliases, texts, args, ml))
                add_ratios(run)
                results["runs"][label] = run
        if args.vllm_serve:
            for ml in max_loras:
                ml = ml or 8
                label = f"vllm-serve max_loras={ml}"
                log(f"{label}: vLLM's OpenAI server, no gateway")
                run = asyncio.run(bench_vllm_serve(kit, dirs, aliases, texts, args, ml))
                add_ratios(run)
                results["runs"][label] = run
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    results["settings"] = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                           "patches": args.patches, "mixes": args.mixes, "address": args.address,
                           "cpu_count": os.cpu_count(), "kit": str(kit),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.merge and args.out.exists():
        previous = json.loads(args.out.read_text())
        results["runs"] = {**previous.get("runs", {}), **results["runs"]}
        results["settings_by_invocation"] = [*previous.get("settings_by_invocation", [previous.get("settings")]),
                                             results["settings"]]
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"wrote {args.out}")
    png = args.out.with_suffix(".png")
    if plot(results, png):
        print(f"wrote {png}")
    else:
        print("matplotlib is not importable: no plot")


if __name__ == "__main__":
    main()
