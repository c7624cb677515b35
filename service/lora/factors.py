"""Weight deltas in and out of LoRA form: read a PEFT adapter's ΔW per layer; write ΔWs back as a PEFT
adapter of a given rank by truncated SVD (the best rank-r approximation), reporting the energy kept."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapters_store.validation import CONFIG_FILE, WEIGHTS_FILE


@dataclass
class LowRank:
    rank: int
    energy_kept: float  # over every layer: Σ kept σ² / Σ σ²
    modules: dict[str, float] = field(default_factory=dict)  # layer → energy kept


def adapter_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW = scale · B·A of every layer a PEFT LoRA adapter changes, by the layer's module path in the model."""
    config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    weights = load_file(str(Path(adapter_dir) / WEIGHTS_FILE))
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        # "base_model.model.<module path>.lora_A.weight" → "<module path>", as in the base model
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        deltas[module] = scale * (b.float() @ a.float())
    return deltas


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, kept σ², total σ²) with B·A the best rank-`rank` approximation of `delta` (zero-padded to `rank`)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    b = torch.zeros(delta.shape[0], rank)
    a = torch.zeros(rank, delta.shape[1])
    b[:, :r], a[:r] = u[:, :r] * s[:r], vh[:r]
    return a, b, (s[:r] ** 2).sum().item(), (s**2).sum().item()


def write_adapter(base_dir: Path, deltas: Mapping[str, torch.Tensor], rank: int, out_dir: Path,
                  also: Iterable[str] = ()) -> LowRank:
    """Write the deltas (module path → ΔW) to `out_dir` as a rank-`rank` PEFT LoRA adapter of the base.

    `also`: more module paths to target with a ΔW of zero (PEFT's init: B zero, A random, so training
    can grow them), for an adapter that will be trained beyond the deltas it starts from.
    """
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    factors, modules, kept_sq, total_sq = {}, {}, 0.0, 0.0
    for name, delta in deltas.items():
        a, b, kept, total = low_rank(delta, rank)
        factors[name] = (a, b)
        modules[name] = kept / total if total else 1.0
        kept_sq, total_sq = kept_sq + kept, total_sq + total
    targets = sorted({name.rsplit(".", 1)[-1] for name in [*factors, *also]})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    peft = get_peft_model(base, config)
    with torch.no_grad():
        for name, module in peft.base_model.model.named_modules():
            if hasattr(module, "lora_A"):
                if name in factors:
                    module.lora_A["default"].weight.copy_(factors[name][0])
                    module.lora_B["default"].weight.copy_(factors[name][1])
                else:  # a layer of a targeted kind that no delta touches
                    module.lora_B["default"].weight.zero_()
    peft.save_pretrained(out_dir, safe_serialization=True)
    (Path(out_dir) / "README.md").unlink(missing_ok=True)  # a patch is config + weights only
    unpin_base(Path(out_dir))
    return LowRank(rank=rank, energy_kept=kept_sq / total_sq if total_sq else 1.0, modules=modules)


def unpin_base(adapter_dir: Path) -> None:
    """Drop the base path PEFT wrote into the adapter's config: it is the directory the adapter was computed
    on (a worker's or a build's temporary path), and the registry names the base."""
    config_file = adapter_dir / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": None},
                                      indent=2, sort_keys=True) + "\n")
