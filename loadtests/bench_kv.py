"""KV-cache policies on the kit: bytes per token held, every task's score, in-context recall by needle position,
decode throughput, and how many 192-token sequences fit in a fixed KV budget.

    .venv/bin/python loadtests/bench_kv.py [--kit .patchserve/kit] [--budget-gib 1] [--vllm auto|on|off] [--threads 2]

Each policy (service/kv) runs through the same compressed cache layer the transformers engine serves with:
every kit task's evaluation set is answered greedily by its patch on base-v1 (the base alone on facts-v1),
scored by exact match, and compared item by item with the uncompressed cache (NFR/PFR, agreement — the
numbers the policy job gates on). Bytes per token are read from the cache's own tensors after the recall
prompts (≥ 192-token contexts), and the ratio is given against 16-bit (what vLLM's bf16 cache would hold) and
the engine's fp32. Throughput: greedy decode steps per second for a batch of recall prompts of one length.
With --vllm (default auto: where the CPU has AVX-512 or AMX), vLLM's fp8 cache against its fp32 one: tokens in
the same memory and greedy agreement on every set. Writes loadtests/results/kv.json and kv_score_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.evaluation.generation import greedy_generate  # noqa: E402
from service.evaluation.report import compare  # noqa: E402
from service.evaluation.scoring import answer_text  # noqa: E402
from service.kit.tasks import recall_variant  # noqa: E402
from service.kv.cache import QueryTap, cache_nbytes, compressed_cache, prefill  # noqa: E402
from service.kv.policy import KVPolicy  # noqa: E402
from service.kv.vllm_mapping import fp8_supported  # noqa: E402

POLICIES = [
    KVPolicy(),
    KVPolicy(quant="fp16"),
    KVPolicy(quant="int8", group=32, residual=16),
    KVPolicy(quant="int4", group=32, residual=16),
    KVPolicy(quant="int4", group=64, residual=8),
    KVPolicy(quant="int4", group=64, residual=0, sinks=0),
    KVPolicy(quant="int2", group=32, residual=16, rotate=True),
    KVPolicy(quant="int2", group=64, residual=0, sinks=0, rotate=True),
    KVPolicy(evict="streaming", budget=0.5),
    KVPolicy(evict="snapkv", budget=0.5),
    KVPolicy(evict="expected_attention", budget=0.5),
    KVPolicy(quant="int4", group=64, residual=0, sinks=0, evict="expected_attention", budget=0.75),
    KVPolicy(quant="int4", group=64, residual=8, evict="expected_attention", budget=0.5),
    KVPolicy(quant="int2", group=64, residual=8, rotate=True, evict="expected_attention", budget=0.5),
    KVPolicy(quant="int2", group=64, residual=8, rotate=True, evict="snapkv", budget=0.5),
    KVPolicy(quant="int2", group=64, residual=0, sinks=0, rotate=True, evict="snapkv", budget=0.5),
]
TASKS = ("sentiment", "reverse", "qa", "recall")
SEQ = 192  # the concurrent-sequences figure: sequences of this many tokens in the budget


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answers(model, tok, rows: list[dict], policy: KVPolicy) -> list[str]:
    cache = (lambda: compressed_cache(policy, model.config)) if not policy.is_identity else None
    return [answer_text(tok, t) for t in greedy_generate(model, tok, [r["prompt"] for r in rows], 16, cache=cache)]


@torch.inference_mode()
def bytes_per_token(model, tok, prompts: list[str], policy: KVPolicy, length: int | None = None) -> float:
    """Bytes the cache's tensors hold per token after reading each prompt (cut to `length` tokens if given)."""
    held = tokens = 0
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"][:length]])
        out = prefill(model, ids, compressed_cache(policy, model.config))
        held += cache_nbytes(out.past_key_values)
        tokens += ids.shape[1]
    return held / tokens


@torch.inference_mode()
def decode_rate(model, tok, prompts: list[str], policy: KVPolicy, steps: int = 32, repeats: int = 3) -> float:
    """Greedy decode steps per second × rows, for one batch of prompts of one length (prefill not counted)."""
    by_len = defaultdict(list)
    for p in prompts:
        by_len[len(tok(p)["input_ids"])].append(p)
    batch = max(by_len.values(), key=len)[:16]
    ids = torch.tensor([tok(p)["input_ids"] for p in batch])
    best = 0.0
    for _ in range(repeats):
        out = prefill(model, ids, compressed_cache(policy, model.config))
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        started = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        best = max(best, steps * len(batch) / (time.perf_counter() - started))
    return best


def vllm_fp8(kit: Path, sets: dict[str, list[dict]], patches: dict[str, Path]) -> dict:
    """vLLM's fp8 cache against its fp32 one, each engine alone in turn: capacity and greedy agreement."""
    import asyncio
    import uuid

    from service.engines.protocol import AdapterRef, GenerationRequest, SamplingConfig
    from service.engines.vllm_engine import VLLMEngine
    from service.settings import Settings

    async def run(policy: KVPolicy) -> tuple[dict, dict]:
        engine = VLLMEngine(str(kit / "base-v1"), Settings(engine="vllm"))
        engine.initial_kv_policy(policy)
        await engine.start()
        outs = {}
        try:
            for name, rows in sets.items():
                adapter = AdapterRef(f"{name}@1", str(patches[name])) if name in patches else None
                async def one(prompt: str, adapter=adapter) -> str:
                    request = GenerationRequest(uuid.uuid4().hex, engine.tokenizer(prompt)["input_ids"],
                                                SamplingConfig(max_tokens=16, temperature=0.0), adapter)
                    text = ""
                    async for event in engine.generate(request):
                        text += "".join(d.text for d in event.deltas)
                    return text.split("\n", 1)[0]
                outs[name] = await asyncio.gather(*(one(r["prompt"]) for r in rows))
            return engine.kv_report(policy), outs
        finally:
            await engine.stop()

    full_report, full = asyncio.run(run(KVPolicy()))
    fp8_report, fp8 = asyncio.run(run(KVPolicy(quant="fp8", residual=0, sinks=0)))
    agreement = {name: sum(a.strip() == b.strip() for a, b in zip(full[name], fp8[name])) / len(full[name])
                 for name in sets}
    return {"fp32": full_report, "fp8": fp8_report, "agreement": agreement,
            "capacity_ratio": fp8_report["capacity_tokens"] / full_report["capacity_tokens"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for task, marker in zip([*TASKS, "facts-v1"], "osD^v"):
        ax.scatter([r["bytes_per_token"] for r in rows], [r["scores"][task] for r in rows], marker=marker,
                   label=task)
    for r in rows:
        ax.annotate(r["policy"], (r["bytes_per_token"], r["scores"]["recall"]), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes per token held (measured, recall prompts)")
    ax.set_ylabel("exact match")
    ax.set_title("kit: score against KV bytes per token, by policy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    parser.add_argument("--budget-gib", type=float, default=1.0)
    parser.add_argument("--vllm", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with others)")
    parser.add_argument("--policy", action="append", type=json.loads, default=None,
                        help='a policy to run instead of the list (JSON, repeatable); the default is always run first')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = json.loads((args.kit / "manifest.json").read_text())
    base_dir = args.kit / "base-v1"
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    QueryTap(base)
    sets = {task: jsonl(args.kit / manifest["eval_sets"][task]) for task in TASKS}
    sets["facts-v1"] = jsonl(args.kit / manifest["eval_sets"]["facts-v1"])
    patches = {task: args.kit / manifest["patches"][task]["path"] for task in TASKS}
    model = PeftModel.from_pretrained(base, patches[TASKS[0]], adapter_name=TASKS[0])
    for task in TASKS[1:]:
        model.load_adapter(patches[task], adapter_name=task)

    def run_on(task: str):
        if task == "facts-v1":
            return model.disable_adapter()
        model.set_adapter(task)
        return contextlib.nullcontext()

    recall = [r["prompt"] for r in sets["recall"]]
    full_bpt = 2 * base.config.num_hidden_layers * base.config.num_key_value_heads * base.config.head_dim * 4
    budget = int(args.budget_gib * (1 << 30))
    baseline: dict[str, list[str]] = {}
    results = []
    policies = [KVPolicy(), *map(KVPolicy.from_dict, args.policy)] if args.policy else POLICIES
    with run_on("recall"):  # a first decode is slow (allocator, kernels): not the uncompressed row's figure
        decode_rate(model, tok, recall, KVPolicy(), repeats=1)
    for policy in policies:
        started = time.perf_counter()
        row = {"policy": policy.describe(), "spec": policy.as_dict(), "scores": {}, "nfr": {}, "pfr": {},
               "agreement": {}, "recall_by_position": {}}
        for task, rows in sets.items():
            with run_on(task):
                out = answers(model, tok, rows, policy)
            baseline.setdefault(task, out)
            report = compare(policy.describe(), "none", "base-v1", "exact_match", rows, baseline[task], out, 1, 1)
            row["scores"][task] = round(report.score_new, 4)
            row["nfr"][task], row["pfr"][task] = round(report.nfr, 4), round(report.pfr, 4)
            row["agreement"][task] = round(report.agreement, 4)
            if task == "recall":
                by = defaultdict(list)
                for item in report.items:
                    position, order = recall_variant(item["prompt"])
                    by[position].append(item["s_new"])
                    by[order].append(item["s_new"])
                row["recall_by_position"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by.items())}
        with run_on("recall"):
            bpt = bytes_per_token(model, tok, recall, policy)
            bpt192 = bytes_per_token(model, tok, recall, policy, length=SEQ)
            row["decode_tokens_per_s"] = round(decode_rate(model, tok, recall, policy), 1)
        row["bytes_per_token"] = round(bpt, 1)
        row["ratio_vs_16bit"] = round(full_bpt / 2 / bpt, 2)
        row["ratio_vs_fp32"] = round(full_bpt / bpt, 2)
        row["ideal_ratio_vs_16bit"] = round(policy.ideal_ratio(), 2)
        row["sequences_in_budget"] = int(budget // (bpt192 * SEQ))
        row["seconds"] = round(time.perf_counter() - started, 1)
        results.append(row)
        print(f"{row['policy']:<42} {row['bytes_per_token']:>7} B/tok {row['ratio_vs_16bit']:>5}× vs 16-bit  "
              + "  ".join(f"{t} {s:.3f}" for t, s in row["scores"].items())
              + f"  recall {row['recall_by_position']}  {row['decode_tokens_per_s']} tok/s", flush=True)
    none = results[0]
    for row in results:
        row["loss_points"] = {t: round(100 * (none["scores"][t] - s), 1) for t, s in row["scores"].items()}
        row["worst_loss_points"] = max(row["loss_points"].values())
        row["worst_nfr"] = max(row["nfr"].values())
        row["throughput_vs_none"] = round(row["decode_tokens_per_s"] / none["decode_tokens_per_s"], 2)
        row["sequences_vs_none"] = round(row["sequences_in_budget"] / none["sequences_in_budget"], 2)
    vllm = {"fp8_hardware": fp8_supported()}
    if args.vllm == "on" or (args.vllm == "auto" and fp8_supported()):
        vllm.update(vllm_fp8(args.kit, sets, patches))
    elif not fp8_supported():
        vllm["note"] = "vLLM's fp8 KV cache needs AVX-512 or AMX; this CPU has neither (refused at start)"
    out_dir = REPO / "loadtests" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"kit_hash": manifest["kit_hash"], "budget_gib": args.budget_gib, "full_bytes_per_token": full_bpt,
              "policies": results, "vllm": vllm, "cpu_threads": torch.get_num_threads()}
    name = "kv" if not args.policy else "kv-extra"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(results, out_dir / f"{name}_score_vs_bytes.png")
    print()
    header = (f"{'policy':<42} {'B/tok':>7} {'×16b':>5} {'×fp32':>5} " + " ".join(f"{t[:7]:>7}" for t in sets)
              + f" {'early':>6} {'middle':>6} {'late':>6} {'q-first':>7} {'NFR':>5} {'tok/s':>7} {'×tput':>5} "
              f"{'seqs':>7} {'×seqs':>5}")
    print(header)
    for r in results:
        p = r["recall_by_position"]
        print(f"{r['policy']:<42} {r['bytes_per_token']:>7} {r['ratio_vs_16bit']:>5} {r['ratio_vs_fp32']:>5} "
              + " ".join(f"{r['scores'][t]:>7.3f}" for t in sets)
              + f" {p.get('early', 0):>6.3f} {p.get('middle', 0):>6.3f} {p.get('late', 0):>6.3f}"
              f" {p.get('question-first', 0):>7.3f} {r['worst_nfr']:>5.3f} {r['decode_tokens_per_s']:>7} "
              f"{r['throughput_vs_none']:>5} {r['sequences_in_budget']:>7} {r['sequences_vs_none']:>5}")
    print(f"\nvLLM: {json.dumps(vllm)}")
    print(f"wrote {out_dir / f'{name}.json'} and {out_dir / f'{name}_score_vs_bytes.png'}")


if __name__ == "__main__":
    main()
