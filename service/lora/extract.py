"""Fine-tuning transfer: a full fine-tuned checkpoint of a base, turned into a LoRA patch of that base.

For every linear layer LoRA can carry, ΔW = W_tuned − W_base is factored by truncated SVD,
ΔW ≈ U_r diag(S_r) V_rᵀ, and stored as B = U_r diag(S_r), A = V_rᵀ with lora_alpha = r (scaling 1),
so the patch adds exactly the rank-r part of the difference. "Energy kept" is Σ S_r² / Σ S² — the
share of the difference's squared Frobenius norm the patch keeps. Parameters LoRA cannot carry
(embeddings, norms, the LM head) are reported with their relative change, not silently dropped.
The adapter is written by PEFT itself, so it is loaded like any uploaded patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adapters_store.validation import LORA_MODULES

_UNCHANGED = 1e-7  # relative change below which a layer counts as untouched by the fine-tune


@dataclass
class Extraction:
    rank: int
    energy_kept: float  # over every carried layer
    modules: dict[str, float] = field(default_factory=dict)  # layer → energy kept
    not_carried: dict[str, float] = field(default_factory=dict)  # parameter → ‖ΔW‖ / ‖W‖


def extract_lora(base_dir: Path, tuned_dir: Path, rank: int, out_dir: Path,
                 progress: Callable[[float, str], None] = lambda p, s: None) -> Extraction:
    """Write to `out_dir` the rank-`rank` LoRA patch of base_dir that best approximates tuned_dir."""
    if rank < 1:
        raise ValueError("rank must be at least 1")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).state_dict()
    own = base.state_dict()
    if set(own) != set(tuned) or any(own[k].shape != tuned[k].shape for k in own):
        raise ValueError("the checkpoint is not a fine-tune of this base: parameter names or shapes differ")

    linear = {name: m for name, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_MODULES}
    factors, kept_sq, total_sq, modules, not_carried = {}, 0.0, 0.0, {}, {}
    for i, (name, module) in enumerate(linear.items()):
        delta = tuned[f"{name}.weight"] - module.weight.detach()
        if delta.norm() <= _UNCHANGED * module.weight.norm():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        b = torch.zeros(delta.shape[0], rank)
        a = torch.zeros(rank, delta.shape[1])
        b[:, :r], a[:r] = u[:, :r] * s[:r], vh[:r]
        factors[name] = (a, b)
        energy = (s**2).sum().item()
        kept = (s[:r] ** 2).sum().item()
        kept_sq, total_sq = kept_sq + kept, total_sq + energy
        modules[name] = kept / energy
        progress(80 * (i + 1) / len(linear), f"SVD of {name}")
    for key, value in own.items():
        is_carried = key.endswith(".weight") and key[: -len(".weight")] in factors
        change = (tuned[key] - value).norm() / value.norm().clamp_min(1e-12)
        if not is_carried and change > _UNCHANGED:
            not_carried[key] = round(change.item(), 6)
    if not factors:
        raise ValueError("the checkpoint does not differ from the base in any layer a LoRA patch can carry")

    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    peft = get_peft_model(base, config)
    with torch.no_grad():
        for name, module in peft.base_model.model.named_modules():
            if name in linear and hasattr(module, "lora_A"):
                if name in factors:
                    module.lora_A["default"].weight.copy_(factors[name][0])
                    module.lora_B["default"].weight.copy_(factors[name][1])
                else:  # a layer of a targeted kind that the fine-tune left alone
                    module.lora_B["default"].weight.zero_()
    progress(90, "writing the patch")
    peft.save_pretrained(out_dir, safe_serialization=True)
    (Path(out_dir) / "README.md").unlink(missing_ok=True)  # a patch is config + weights only
    return Extraction(rank=rank, energy_kept=kept_sq / total_sq, modules=modules, not_carried=not_carried)
