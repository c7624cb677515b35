"""A real-size upload: a rank-64 adapter on every linear layer of a 7B-shaped Llama, while the gateway serves.

    .venv/bin/python loadtests/bench_upload.py [--engine vllm|transformers] [--rank 64] [--dtype F32]

Starts a gateway on the kit (default settings: the 2 GiB upload limit), registers a base of
Llama-2-7B's shape (its config only: an upload is checked against the base's shapes, never loaded
into an engine until activated), writes a synthetic adapter of that shape, and uploads it while 4
clients keep calling the kit's base. Samples the gateway's API process RSS every 50 ms. Writes
loadtests/results/upload.json and prints: upload size and time, RSS growth, inference latency
before and during the upload.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.gateway_server import GatewayProcess  # noqa: E402

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "torch_dtype": "float16"}
MODULES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
           "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}  # (in, out)
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def write_adapter(out: Path, rank: int, dtype: str) -> int:
    """A PEFT LoRA adapter of the 7B shape at `out`; returns the weights file's size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(LLAMA_7B["num_hidden_layers"]):
        for module, (fan_in, fan_out) in MODULES.items():
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in) * 0.01).to(DTYPES[dtype])
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(fan_out, rank, dtype=DTYPES[dtype])
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(MODULES),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))
    return (out / "adapter_model.safetensors").stat().st_size


class Load:
    """Clients calling the base non-stop; each call's latency with the time it ended."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.clients = url, clients
        self.samples: list[tuple[float, float]] = []
        self.failed = 0
        self._stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                r = client.post(f"{self.url}/v1/completions",
                                json={"model": "tiny", "prompt": "The", "max_tokens": 16, "temperature": 0,
                                      "ignore_eos": True})
                if r.status_code != 200:
                    self.failed += 1
                self.samples.append((time.perf_counter(), time.perf_counter() - started))

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def between(self, start: float, end: float) -> list[float]:
        return [lat for at, lat in self.samples if start <= at <= end]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", default="F32", choices=sorted(DTYPES))
    parser.add_argument("--baseline-s", type=float, default=10.0)
    args = parser.parse_args()

    from service.cli import ensure_kit
    from service.settings import get_settings

    kit_dir = get_settings().kit_path
    ensure_kit(kit_dir, get_settings().kit_seed)
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        root = Path(tmp)
        base_dir = root / "llama-7b-shape"
        base_dir.mkdir()
        (base_dir / "config.json").write_text(json.dumps(LLAMA_7B))
        print(f"writing a rank-{args.rank} {args.dtype} adapter of Llama-2-7B's shape …", flush=True)
        size = write_adapter(root / "adapter", args.rank, args.dtype)
        print(f"  {size / 1e6:.0f} MB", flush=True)
        gw = GatewayProcess(kit_dir, args.engine, root, PATCHSERVE_MAX_LORA_RANK=str(max(16, args.rank)))
        gw.start()
        try:
            with gw.admin() as admin:
                r = admin.post("/admin/bases", json={"name": "llama-7b-shape", "version": "shape-only",
                                                     "path": str(base_dir)})
                r.raise_for_status()
                gw.wait_job(r.headers["location"])
                # A small upload first: the first one imports what validation needs (PEFT's config
                # fields, safetensors), which is not what this measures.
                kit_patch = kit_dir / "patches" / "sentiment"
                r = admin.post("/admin/patches/warm-up/versions",
                               files=[("files", (f.name, f.read_bytes())) for f in kit_patch.iterdir()])
                r.raise_for_status()
            process = psutil.Process(gw.proc.pid)
            rss: list[tuple[float, int]] = []
            with Load(gw.url) as load:
                time.sleep(args.baseline_s)
                baseline_rss = process.memory_info().rss
                sampling = threading.Event()

                def sample() -> None:
                    while not sampling.is_set():
                        rss.append((time.perf_counter(), process.memory_info().rss))
                        time.sleep(0.05)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                upload_started = time.perf_counter()
                with (root / "adapter" / "adapter_model.safetensors").open("rb") as weights, \
                        (root / "adapter" / "adapter_config.json").open("rb") as config, gw.admin() as admin:
                    admin.timeout = httpx.Timeout(600)
                    r = admin.post("/admin/patches/big-7b/versions", data={"base": "llama-7b-shape"},
                                   files=[("files", ("adapter_config.json", config)),
                                          ("files", ("adapter_model.safetensors", weights))])
                upload_ended = time.perf_counter()
                sampling.set()
                sampler.join()
                time.sleep(2)
            assert r.status_code == 201, r.text
            before = load.between(upload_started - args.baseline_s, upload_started)
            during = load.between(upload_started, upload_ended)
            peak = max(v for _, v in rss)
            result = {
                "engine": args.engine, "rank": args.rank, "dtype": args.dtype, "upload_bytes": size,
                "upload_s": round(upload_ended - upload_started, 2),
                "upload_mb_per_s": round(size / 1e6 / (upload_ended - upload_started), 1),
                "gateway_rss_baseline_mb": round(baseline_rss / 1e6, 1),
                "gateway_rss_peak_mb": round(peak / 1e6, 1),
                "gateway_rss_growth_mb": round((peak - baseline_rss) / 1e6, 1),
                "gateway_rss_series_mb": [(round(at - upload_started, 2), round(v / 1e6)) for at, v in rss[::10]],
                "latency_before": {"n": len(before), "p50_ms": round(statistics.median(before) * 1000, 1),
                                   "p99_ms": round(pct(before, 0.99) * 1000, 1)},
                "latency_during": {"n": len(during), "p50_ms": round(statistics.median(during) * 1000, 1),
                                   "p99_ms": round(pct(during, 0.99) * 1000, 1)},
                "failed_requests": load.failed, "version": r.json()["ref"],
            }
        finally:
            gw.stop()
    out = REPO / "loadtests" / "results" / "upload.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"upload {size / 1e6:.0f} MB in {result['upload_s']} s; gateway RSS +{result['gateway_rss_growth_mb']} MB; "
          f"base p50 {result['latency_before']['p50_ms']} → {result['latency_during']['p50_ms']} ms during it "
          f"({result['failed_requests']} failed); written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
